"""Re-sparsify kernel: dense kernel ``W`` (K, C) + permutation -> both 2:4 compressed operands.

One pass over ``W``: each program of the grid ``(K / block_k, C / block_c)`` reads the tile of rows
``i*block_k ..`` and *permuted* columns ``perm[j*block_c ..]`` (gathered loads), as 64 phase tiles
``T[a][b]`` of shape ``(block_k/8, block_c/8)``, ``T[a][b][r, s] = W[i*bk + 8r + a,
perm[j*bc + 8s + b]]``, and computes

* the forward mask ``Mf``: in every group of 4 consecutive rows, the 2 largest ``|W|`` (NaN ranks
  as ``+inf``, ``format.magnitude``; ties: lower row); the forward operand
  ``compress(W*Mf, axis=0)`` -> ``fwd_values`` (K/2, C),
  ``fwd_meta`` (K/8, C) (written back to the original columns ``perm[...]``, scattered stores);
* the backward mask ``Mb`` in permuted column order: in every group of 4 consecutive permuted columns
  of a row, the 2 largest ``|W*Mf|`` (ties: lower permuted index), AND ``Mf``; the backward operand
  ``compress(((W*Mb)[:, perm]).T, axis=0)`` -> ``bwd_values`` (C/2, K), ``bwd_meta`` (C/8, K), as
  ``spmm_bwd_data`` takes it;
* ``fwd_mask`` = ``Mf`` (K, C) bool (the decay term of the kernel gradient needs it).

K and C are zero-padded to the tile sizes (the padding is sliced off; padded groups get the pad
nibble ``0b0100`` exactly as ``compress`` does, so ``K % 8 == 4`` matches ``compress`` byte for byte).
Metadata positions of a group whose kept entries are partly zero follow the top-2 rule, not the
nonzero pattern; ``decompress`` gives the same dense array either way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.format import _is_concrete, magnitude, nibble, select, top2_of_4
from pallas_kernels.sparse_matmul import _next_pow2, _pad_to, _round_up, default_interpret


class Resparsified(NamedTuple):
    fwd_values: jax.Array  # (K/2, C)
    fwd_meta: jax.Array  # (ceil(K/8), C) uint8
    bwd_values: jax.Array  # (C/2, K)
    bwd_meta: jax.Array  # (ceil(C/8), K) uint8
    fwd_mask: jax.Array  # (K, C) bool


def _unstack8(x):
    """(..., 8) -> 8 arrays (...,) (equal power-of-2 splits: lowers to Triton)."""
    return [jnp.squeeze(t, -1) for t in jnp.split(x, 8, axis=-1)]


def _stack8(ts):
    """8 arrays (...,) -> (..., 8) with [..., i] = ts[i], built from 2-way last-axis stacks."""
    l1 = [jnp.stack([ts[k], ts[k + 4]], -1) for k in range(4)]  # last axis: bit 2
    l2 = [jnp.stack([l1[k], l1[k + 2]], -1) for k in range(2)]  # (bit 2, bit 1)
    out = jnp.stack(l2, -1)  # (bit 2, bit 1, bit 0): row-major order = natural order
    return out.reshape(*out.shape[:-3], 8)


def _slots(keep):
    """First and last kept position (exactly 2 kept): int32 tiles i0 < i1."""
    i0 = jnp.where(keep[0], 0, jnp.where(keep[1], 1, 2)).astype(jnp.int32)
    i1 = jnp.where(keep[3], 3, jnp.where(keep[2], 2, 1)).astype(jnp.int32)
    return i0, i1


def _resparsify_kernel(w_ref, perm_ref, *refs, bk, bc):
    fv_ref, fm_ref, bv_ref, bm_ref, mf_ref = refs[-5:]  # (aliased initial outputs come first)
    i, j = pl.program_id(0), pl.program_id(1)
    qk, qc = bk // 8, bc // 8
    shape3 = (qk, qc, 8)
    r3 = lax.broadcasted_iota(jnp.int32, shape3, 0)  # r: row group-pair index in the tile
    s3 = lax.broadcasted_iota(jnp.int32, shape3, 1)  # s: column group-pair index in the tile
    ph3 = lax.broadcasted_iota(jnp.int32, shape3, 2)  # the phase stacked on the last axis
    pcols = jnp.broadcast_to(perm_ref[pl.ds(j * bc, bc)].reshape(1, qc, 8), shape3)  # perm[.. 8s+b]
    # t[a][b][r, s] = W[i*bk + 8r + a, perm[j*bc + 8s + b]]: 8 gathered loads, split over b
    t = [_unstack8(w_ref[i * bk + 8 * r3 + a, pcols]) for a in range(8)]

    # forward: groups of 4 rows (a = 4e + p) in each column
    wf = [[None] * 8 for _ in range(8)]  # W*Mf tiles [a][b]
    mf = [[None] * 8 for _ in range(8)]  # Mf tiles [a][b]
    fv = [[None] * 8 for _ in range(4)]  # [2e + jj][b]
    fm = [None] * 8  # [b]
    for b in range(8):
        nibs = []
        for e in range(2):
            parts = [t[4 * e + p][b] for p in range(4)]
            keep = top2_of_4([magnitude(x) for x in parts])
            i0, i1 = _slots(keep)
            fv[2 * e][b], fv[2 * e + 1][b] = select(parts, i0), select(parts, i1)
            nibs.append(nibble(i0, i1))
            for p in range(4):
                mf[4 * e + p][b] = keep[p]
                wf[4 * e + p][b] = jnp.where(keep[p], parts[p], jnp.zeros_like(parts[p]))
        fm[b] = (nibs[0] | (nibs[1] << 4)).astype(jnp.uint8)
    for ej in range(4):  # values row 2g + jj of group g = i*bk/4 + 2r + e
        fv_ref[i * (bk // 2) + 4 * r3 + ej, pcols] = _stack8(fv[ej])
    fm_ref[i * qk + r3, pcols] = _stack8(fm)
    for a in range(8):
        mf_ref[i * bk + 8 * r3 + a, pcols] = _stack8(mf[a])

    # backward: groups of 4 permuted columns (b = 4e + p) of W*Mf in each row; stored transposed,
    # stacked over the row phase a: K index i*bk + 8r + a
    kcols = i * bk + 8 * r3 + ph3
    bv = [[None] * 8 for _ in range(4)]  # [2e + jj][a]
    bm = [None] * 8
    for a in range(8):
        nibs = []
        for e in range(2):
            parts = [wf[a][4 * e + p] for p in range(4)]
            i0, i1 = _slots(top2_of_4([magnitude(x) for x in parts]))
            bv[2 * e][a], bv[2 * e + 1][a] = select(parts, i0), select(parts, i1)
            nibs.append(nibble(i0, i1))
        bm[a] = (nibs[0] | (nibs[1] << 4)).astype(jnp.uint8)
    for ej in range(4):  # values row 2G + jj of permuted group G = j*bc/4 + 2s + e
        bv_ref[j * (bc // 2) + 4 * s3 + ej, kcols] = _stack8(bv[ej])
    bm_ref[j * qc + s3, kcols] = _stack8(bm)


@functools.partial(jax.jit, static_argnames=("bk", "bc", "interpret", "num_warps"))
def _resparsify_padded(w, perm, out_init, *, bk, bc, interpret, num_warps):
    kp, cp = w.shape
    full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    out_shapes = (
        jax.ShapeDtypeStruct((kp // 2, cp), w.dtype),
        jax.ShapeDtypeStruct((kp // 8, cp), jnp.uint8),
        jax.ShapeDtypeStruct((cp // 2, kp), w.dtype),
        jax.ShapeDtypeStruct((cp // 8, kp), jnp.uint8),
        jax.ShapeDtypeStruct((kp, cp), jnp.bool_),
    )
    args, in_specs = [w, perm], [full((kp, cp)), full((cp,))]
    if out_init is not None:  # alias the outputs to given initial buffers (tests poison them)
        args += list(out_init)
        in_specs += [full(s.shape) for s in out_shapes]
    return pl.pallas_call(
        functools.partial(_resparsify_kernel, bk=bk, bc=bc),
        out_shape=out_shapes,
        grid=(kp // bk, cp // bc),
        in_specs=in_specs,
        out_specs=tuple(full(s.shape) for s in out_shapes),
        input_output_aliases={2 + i: i for i in range(5)} if out_init is not None else {},
        interpret=interpret,
        compiler_params=None if interpret else pltr.CompilerParams(num_warps=num_warps),
        name="resparsify24",
    )(*args)


def resparsify(w, perm, *, block_k: int = 64, block_c: int = 64, interpret: bool | None = None,
               num_warps: int = 4, poison: bool = False) -> Resparsified:
    """Both Bi-Mask 2:4 operands of a dense kernel in one pass (rules: module doc).

    Args:
      w: (K, C) float32 or bfloat16, K % 4 == 0 and C % 4 == 0 (conv kernels: flatten to
        ``(prod(window)*Cin, C)`` first).
      perm: int (C,), a permutation of ``range(C)`` (``ValueError`` when concrete and not one;
        under ``jit`` a non-permutation is replaced by the identity, as in ``bimask_jax``).
      block_k, block_c: tile sizes, multiples of 8 (powers of two on GPU); shrunk for small inputs.
      interpret: Pallas interpret mode; default: True unless the default backend is a GPU.
      num_warps: Triton compiler parameter (GPU only).
      poison: for tests: alias the outputs to buffers pre-filled with NaN values, the invalid
        metadata byte 0 and True mask entries, so an unwritten element shows.

    Returns:
      ``Resparsified(fwd_values, fwd_meta, bwd_values, bwd_meta, fwd_mask)``; feed
      ``(fwd_values, fwd_meta)`` to ``spmm`` and ``(bwd_values, bwd_meta, perm)`` to
      ``spmm_bwd_data``.
    """
    w, perm = jnp.asarray(w), jnp.asarray(perm)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (K, C), got shape {w.shape}")
    k, c = w.shape
    if k % 4 or c % 4:
        raise ValueError(f"w shape {w.shape}: K and C must both be divisible by m=4")
    if perm.shape != (c,) or not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(f"perm must be an int array of shape ({c},), got {perm.dtype} {perm.shape}")
    if _is_concrete(perm):
        if not np.array_equal(np.sort(np.asarray(perm)), np.arange(c)):
            raise ValueError(f"perm must be a permutation of range({c})")
    else:  # traced: a non-permutation would leave output columns unwritten; use the identity
        ident = jnp.arange(c, dtype=perm.dtype)
        perm = jnp.where(jnp.all(jnp.sort(perm) == ident), perm, ident)
    for name, b in (("block_k", block_k), ("block_c", block_c)):
        if not isinstance(b, int) or b <= 0 or b % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {b!r}")
    if interpret is None:
        interpret = default_interpret()
    fit = (lambda n, b: min(b, _round_up(n, 8))) if interpret else (
        lambda n, b: min(b, max(8, _next_pow2(n))))
    bk, bc = fit(k, block_k), fit(c, block_c)
    kp, cp = _round_up(k, bk), _round_up(c, bc)
    wp = _pad_to(w, (kp, cp))
    pp = jnp.concatenate([perm.astype(jnp.int32), jnp.arange(c, cp, dtype=jnp.int32)])
    out_init = None
    if poison:
        out_init = (jnp.full((kp // 2, cp), jnp.nan, w.dtype), jnp.zeros((kp // 8, cp), jnp.uint8),
                    jnp.full((cp // 2, kp), jnp.nan, w.dtype), jnp.zeros((cp // 8, kp), jnp.uint8),
                    jnp.ones((kp, cp), bool))
    fv, fm, bv, bm, mf = _resparsify_padded(wp, pp, out_init, bk=bk, bc=bc,
                                            interpret=bool(interpret), num_warps=num_warps)
    return Resparsified(fv[: k // 2, :c], fm[: -(-k // 8), :c], bv[: c // 2, :k],
                        bm[: -(-c // 8), :k], mf[:k, :c])


def resparsify_reference(w, perm) -> Resparsified:
    """jnp reference of ``resparsify`` built from ``format.top2_mask`` and ``format.compress``."""
    from pallas_kernels.format import compress, top2_mask

    w, perm = jnp.asarray(w), jnp.asarray(perm)
    mf = top2_mask(w, axis=0)
    wf = jnp.where(mf, w, jnp.zeros_like(w))
    wfp = wf[:, perm]
    mbp = top2_mask(wfp, axis=1)
    fv, fm = compress(wf, axis=0, mask=mf)
    bv, bm = compress(wfp.T, axis=0, mask=mbp.T)
    return Resparsified(fv, fm, bv, bm, mf)
