"""Independent NumPy statements of the Bi-Mask rules, written loop-by-loop for clarity (slow; small
inputs only). Tests compare the JAX implementation against these."""

import functools

import numpy as np


def magnitude(x):
    a = np.abs(np.asarray(x, np.float64))
    return np.where(np.isnan(a), np.inf, a)


def nm_mask(x, n, m, axis=-1):
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.zeros(x.shape, bool)
    mag = magnitude(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = mag[idx]
        for g in range(0, row.shape[0], m):
            order = sorted(range(m), key=lambda i, g=g: (-row[g + i], i))
            for i in order[:n]:
                out[idx + (g + i,)] = True
    return np.moveaxis(out, -1, axis)


def backward_mask(kernel, fwd, perm, n, m):
    c = kernel.shape[-1]
    w = magnitude(np.asarray(kernel).reshape(-1, c))
    f = np.asarray(fwd).reshape(-1, c)
    perm = np.asarray(perm)
    out = np.zeros(w.shape, bool)
    for r in range(w.shape[0]):
        for g in range(0, c, m):
            cols = perm[g : g + m]
            # forward-kept first, then larger |w|, then lower permuted position
            order = sorted(
                range(m), key=lambda i, cols=cols: (not f[r, cols[i]], -w[r, cols[i]], i)
            )
            for i in order[:n]:
                if f[r, cols[i]]:
                    out[r, cols[i]] = True
    return out.reshape(kernel.shape)


def is_nm(mask, n, m, axis):
    """True where every group of m along axis holds at most n True."""
    mt = np.moveaxis(np.asarray(mask), axis, -1)
    g = mt.reshape(*mt.shape[:-1], mt.shape[-1] // m, m)
    return bool(np.all(g.sum(-1) <= n))


@functools.cache
def valid_block_patterns(n, m):
    """Brute force over all 2^(m*m) 0/1 matrices: those with exactly n ones in every row and column,
    as (P, m, m)."""
    bits = (np.arange(2 ** (m * m))[:, None] >> np.arange(m * m)) & 1
    a = bits.reshape(-1, m, m)
    ok = np.all(a.sum(1) == n, axis=1) & np.all(a.sum(2) == n, axis=1)
    return a[ok]


def best_block_value(block, n):
    """The largest sum of |block| kept by any pattern with exactly n ones per row and column."""
    pats = valid_block_patterns(n, block.shape[0])
    return float((np.abs(block)[None] * pats).sum((1, 2)).max())


def top2_of_4(w, axis):
    """Vectorized 2:4 rule: keep the 2 largest |w| of every 4 consecutive entries along axis; ties:
    lower index."""
    a = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    g = np.abs(a.reshape(*a.shape[:-1], -1, 4))
    order = np.argsort(-g, axis=-1, kind="stable")[..., :2]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(a.shape), -1, axis)
