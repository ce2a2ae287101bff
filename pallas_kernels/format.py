"""The 2:4 compressed format: ``compress`` / ``decompress`` and the 2-of-4 selection rules.

Format of ``values, metadata = compress(w, axis)`` for ``w`` 2:4 sparse along ``axis`` (length K,
K % 4 == 0; the other axes are untouched and keep their order):

* groups: entries ``4g, 4g+1, 4g+2, 4g+3`` of ``axis`` form group ``g`` (g = 0 .. K/4 - 1).
* ``values``: same dtype as ``w``, shape of ``w`` with ``axis`` of length K/2. Entry ``2g + j``
  (j = 0, 1) is the j-th kept entry of group g, kept entries in ascending position order.
* ``metadata``: ``uint8``, shape of ``w`` with ``axis`` of length ceil(K/8). Byte ``r`` holds group
  ``2r`` in bits 0-3 and group ``2r+1`` in bits 4-7. A group's nibble is ``i0 | i1 << 2`` with
  ``i0 < i1`` the in-group positions (0..3) of its two kept entries (the PTX / CUTLASS sparse-MMA
  nibble convention). When K % 8 == 4 the last byte's high nibble is the pad nibble ``0b0100``.
* a group with fewer than 2 nonzeros is padded with zero-valued slots at the lowest unused
  positions, so the two positions are always distinct (never the undefined nibbles 0000, 0101, ...).
* bytes for bf16 at K % 8 == 0: K/2 * 2 + K/8 = 1.125 K per column against 2 K dense, i.e. 0.5625 x.

Everything is plain ``jnp`` (jit-able, no gathers: selections are ``where`` sums over the 4 group
positions), so the same rules run inside the Pallas kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PAD_NIBBLE = 0b0100  # positions (0, 1): the nibble used for padding groups


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _norm_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def magnitude(x: jax.Array) -> jax.Array:
    """The ranking key of a weight: ``|x|`` with NaN mapped to ``+inf`` (so ``-0.0`` and ``0.0``
    tie). The same rule as ``bimask_jax.masks``: a NaN weight is always kept, never hidden."""
    a = jnp.abs(x)
    return jnp.where(jnp.isnan(a), jnp.inf, a)


def top2_of_4(scores: list[jax.Array]) -> list[jax.Array]:
    """Keep flags for the 2 largest of 4 same-shape score arrays (ties: lower position wins).

    ``scores[p]`` is the score of position p in each group, e.g. ``magnitude(w)`` (NaN-free: a NaN
    score would compare as neither greater nor equal). Returns 4 bool arrays, exactly two of which
    are True at every element.
    """
    keep = []
    for p in range(4):
        rank = None
        for q in range(4):
            if q != p:
                beats = (scores[q] > scores[p] if q > p else scores[q] >= scores[p]).astype(jnp.int32)
                rank = beats if rank is None else rank + beats
        keep.append(rank < 2)
    return keep


def _exactly_two(keep: list[jax.Array]) -> list[jax.Array]:
    """Drop all but the first two True flags, then add the lowest False positions until two."""
    out, count = [], jnp.zeros(keep[0].shape, jnp.int32)
    for p in range(4):
        k = keep[p] & (count < 2)
        out.append(k)
        count = count + k.astype(jnp.int32)
    for p in range(4):
        add = ~out[p] & (count < 2)
        out[p] = out[p] | add
        count = count + add.astype(jnp.int32)
    return out


def slots_from_keep(keep: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """From 4 keep flags (at most 2 True per element) the two distinct positions ``i0 < i1``.

    Missing kept positions are filled with the lowest unused positions. Returns int32 arrays.
    """
    full = _exactly_two(keep)
    big = jnp.int32(4)
    i0 = big
    for p in (3, 2, 1, 0):
        i0 = jnp.where(full[p], jnp.int32(p), i0)
    i1 = jnp.int32(-1)
    for p in range(4):
        i1 = jnp.where(full[p], jnp.int32(p), i1)
    return i0, i1


def select(parts: list[jax.Array], idx: jax.Array) -> jax.Array:
    """``parts[idx]`` elementwise for a list of 4 same-shape arrays (a ``where`` chain, no gather)."""
    out = jnp.zeros(parts[0].shape, parts[0].dtype)
    for p in range(4):
        out = jnp.where(idx == p, parts[p], out)
    return out


def nibble(i0: jax.Array, i1: jax.Array) -> jax.Array:
    """The 4-bit code ``i0 | i1 << 2`` as int32."""
    return i0.astype(jnp.int32) | (i1.astype(jnp.int32) << 2)


def _groups_first(w: jax.Array, axis: int) -> jax.Array:
    """(..., K, ...) -> (K/4, 4, rest) with rest = the other axes flattened in order."""
    w = jnp.moveaxis(w, axis, 0)
    return w.reshape(w.shape[0] // 4, 4, -1)


def _check_24(kept_count: jax.Array, axis: int, what: str) -> None:
    if _is_concrete(kept_count):
        bad = np.asarray(kept_count) > 2
        if bad.any():
            g, col = np.argwhere(bad)[0]
            raise ValueError(
                f"w is not 2:4 sparse along axis {axis}: group {g} (entries {4 * g}..{4 * g + 3}) "
                f"of flattened column {col} has {int(np.asarray(kept_count)[g, col])} {what} "
                "(at most 2 allowed)"
            )


def compress(w: jax.Array, axis: int = 0, mask: jax.Array | None = None):
    """Compress ``w``, 2:4 sparse along ``axis``, to ``(values, metadata)`` (layout: module doc).

    Args:
      w: float array, any rank >= 1; ``w.shape[axis] % 4 == 0``.
      axis: the 2:4 axis (for a Flax kernel ``(K, C)`` used as ``x @ W``: axis 0, the reduction).
      mask: optional bool array of ``w``'s shape, at most 2 True per group. When given, the kept
        positions are the True ones (so exact zeros of ``w`` under the mask are kept as zeros and
        entries outside the mask are dropped); otherwise the nonzeros of ``w`` are kept.

    Returns:
      values: ``w.dtype``, ``w.shape`` with ``axis`` of length K/2.
      metadata: ``uint8``, ``w.shape`` with ``axis`` of length ceil(K/8).

    Raises:
      ValueError: bad axis, K % 4 != 0, mask shape mismatch, or (for concrete inputs) a group with
        more than 2 nonzeros (more than 2 True mask entries). Traced inputs are not checked: extra
        entries beyond the first two kept positions would be silently dropped.
    """
    w = jnp.asarray(w)
    if w.ndim < 1:
        raise ValueError("w must have rank >= 1")
    axis = _norm_axis(axis, w.ndim)
    k = w.shape[axis]
    if k % 4:
        raise ValueError(f"w axis {axis} of size {k} is not divisible by m=4 (2:4 groups)")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != w.shape:
            raise ValueError(f"mask shape {mask.shape} must equal w shape {w.shape}")
        kept = mask.astype(bool)
        what = "True mask entries"
    else:
        kept = w != 0
        what = "nonzeros"
    values, meta, counts = _compress_core(w, kept, axis, mask is not None)
    _check_24(counts, axis, what)
    return values, meta


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compress_core(w, kept, axis, masked):
    k = w.shape[axis]
    g = _groups_first(w, axis)  # (G, 4, R)
    kg = _groups_first(kept, axis)
    counts = kg.sum(axis=1, dtype=jnp.int32)
    parts = [g[:, p] for p in range(4)]
    i0, i1 = slots_from_keep([kg[:, p] for p in range(4)])
    v0, v1 = select(parts, i0), select(parts, i1)
    if masked:  # a padded slot outside the mask must hold zero
        kparts = [kg[:, p] for p in range(4)]
        v0 = jnp.where(select(kparts, i0), v0, jnp.zeros_like(v0))
        v1 = jnp.where(select(kparts, i1), v1, jnp.zeros_like(v1))
    values = jnp.stack([v0, v1], axis=1).reshape(k // 2, -1)  # row 2g + j
    nib = nibble(i0, i1)  # (G, R)
    if nib.shape[0] % 2:
        nib = jnp.concatenate([nib, jnp.full((1, nib.shape[1]), PAD_NIBBLE, jnp.int32)], axis=0)
    nib = nib.reshape(nib.shape[0] // 2, 2, -1)
    meta = (nib[:, 0] | (nib[:, 1] << 4)).astype(jnp.uint8)
    rest = tuple(s for i, s in enumerate(w.shape) if i != axis)
    values = jnp.moveaxis(values.reshape(k // 2, *rest), 0, axis)
    meta = jnp.moveaxis(meta.reshape(meta.shape[0], *rest), 0, axis)
    return values, meta, counts


def unpack_metadata(metadata: jax.Array, k: int, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """Metadata bytes -> positions ``(i0, i1)``, int32, shape of metadata with ``axis`` K/4 long."""
    metadata = jnp.asarray(metadata)
    axis = _norm_axis(axis, metadata.ndim)
    m = jnp.moveaxis(metadata, axis, 0).astype(jnp.int32)
    nib = jnp.stack([m & 15, m >> 4], axis=1).reshape(2 * m.shape[0], *m.shape[1:])[: k // 4]
    i0, i1 = nib & 3, nib >> 2
    return jnp.moveaxis(i0, 0, axis), jnp.moveaxis(i1, 0, axis)


def decompress(values: jax.Array, metadata: jax.Array, axis: int = 0) -> jax.Array:
    """Inverse of ``compress``: the dense array, ``values.shape`` with ``axis`` doubled.

    Raises:
      ValueError: if ``metadata``'s shape does not match ``values`` (axis length ceil(K/8)).
    """
    values, metadata = jnp.asarray(values), jnp.asarray(metadata)
    if values.ndim < 1:
        raise ValueError("values must have rank >= 1")
    axis = _norm_axis(axis, values.ndim)
    k = 2 * values.shape[axis]
    want = list(values.shape)
    want[axis] = -(-k // 8)
    if list(metadata.shape) != want:
        raise ValueError(
            f"metadata shape {metadata.shape} does not match values shape {values.shape} along "
            f"axis {axis}: expected {tuple(want)} (ceil(K/8) bytes per column, K = {k})"
        )
    if metadata.dtype != jnp.uint8:
        raise ValueError(f"metadata dtype must be uint8, got {metadata.dtype}")
    return _decompress_core(values, metadata, axis)


@functools.partial(jax.jit, static_argnums=(2,))
def _decompress_core(values, metadata, axis):
    k = 2 * values.shape[axis]
    i0, i1 = unpack_metadata(metadata, k, axis)
    v = jnp.moveaxis(values, axis, 0).reshape(k // 4, 2, -1)
    i0 = jnp.moveaxis(i0, axis, 0).reshape(k // 4, -1)
    i1 = jnp.moveaxis(i1, axis, 0).reshape(k // 4, -1)
    zero = jnp.zeros_like(v[:, 0])
    parts = [jnp.where(i0 == p, v[:, 0], jnp.where(i1 == p, v[:, 1], zero)) for p in range(4)]
    dense = jnp.stack(parts, axis=1).reshape(k, *[s for i, s in enumerate(values.shape) if i != axis])
    return jnp.moveaxis(dense, 0, axis)


def top2_mask(w: jax.Array, axis: int = 0) -> jax.Array:
    """Bool mask keeping the 2 largest |w| of every 4 consecutive entries along ``axis``.

    Ties go to the lower index; NaN ranks as ``+inf`` (``magnitude``), as in ``bimask_jax.masks``.
    ``w.shape[axis] % 4 == 0`` required (ValueError otherwise).
    """
    w = jnp.asarray(w)
    axis = _norm_axis(axis, w.ndim)
    if w.shape[axis] % 4:
        raise ValueError(f"w axis {axis} of size {w.shape[axis]} is not divisible by m=4")
    return _top2_core(w, axis)


@functools.partial(jax.jit, static_argnums=(1,))
def _top2_core(w, axis):
    g = magnitude(_groups_first(w, axis))
    keep = jnp.stack(top2_of_4([g[:, p] for p in range(4)]), axis=1)
    moved = jnp.moveaxis(w, axis, 0).shape
    return jnp.moveaxis(keep.reshape(moved), 0, axis)
