"""Pallas 2:4 sparse matmuls: ``spmm`` (forward) and ``spmm_bwd_data`` (Bi-Mask backward-data).

Kernel (one body for the Triton GPU backend and for interpret mode on CPU):

* grid over output tiles ``(M / block_m, N / block_n)``; inside, a ``fori_loop`` over the reduction
  in steps of ``block_k`` (a multiple of 8: 2 groups per metadata byte x 4 positions);
* each step loads the compressed tile (``block_k/2 x block_n`` values + ``block_k/8 x block_n``
  metadata bytes) and expands it on chip into 8 "phase" tiles ``D[e, p]`` of shape
  ``(block_k/8, block_n)``: ``D[e, p][r] = W[k0 + 8r + 4e + p]`` (``e`` = which nibble of the byte,
  ``p`` = position in the group), each a ``where`` of the two kept values on the nibble's indices;
* the matching columns of ``x`` are the stride-8 slices ``x[:, k0 + 4e + p :: 8]``; the step adds
  ``sum_{e,p} x_{e,p} @ D[e, p]`` into an fp32 accumulator. Dense ``W`` never exists in HBM.

Ragged edges: ``M``, ``N`` and ``K`` are zero-padded up to the tile sizes in the wrapper (a no-op
when they divide; on GPU ``block_k`` is lowered to the power of two >= 128 that pads K least, e.g.
K = 1152 runs with 128; K = 64 or 576 are still padded, which copies x); padded metadata uses the
valid nibble ``0b0100`` with zero values.
On GPU (``interpret=False``) the call passes the Triton ``CompilerParams`` explicitly, so it lowers
through Pallas' Triton backend (a plain ``pallas_call`` would go to Mosaic GPU); block sizes must then
be powers of two and ``block_k >= 128`` (Triton's ``dot`` needs a reduction dim >= 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.format import PAD_NIBBLE

PAD_BYTE = PAD_NIBBLE | (PAD_NIBBLE << 4)


def default_interpret() -> bool:
    """Interpret mode unless the default backend is a GPU."""
    return jax.default_backend() != "gpu"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_to(a: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
    pads = [(0, t - s) for s, t in zip(a.shape, shape, strict=True)]
    if all(p == (0, 0) for p in pads):
        return a
    return jnp.pad(a, pads, constant_values=jnp.asarray(value, a.dtype))


def _check_blocks(block_m: int, block_n: int, block_k: int) -> None:
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if not isinstance(b, int) or b <= 0:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    if block_k % 8:
        raise ValueError(f"block_k={block_k} must be a multiple of 8 (2 groups of 4 per byte)")


def _effective_blocks(m, n, k, block_m, block_n, block_k, interpret):
    """Shrink tiles for small problems (kept powers of two >= Triton's minimums on GPU)."""
    if interpret:
        return (min(block_m, _round_up(m, 8)), min(block_n, _round_up(n, 8)),
                min(block_k, _round_up(k, 8)))
    bk = min(block_k, max(128, _next_pow2(k)))
    # a smaller power-of-two block_k (>= 128) that pads K less avoids copying x into a wider array
    cands = [b for b in (bk >> i for i in range(8)) if b >= 128] or [bk]
    bk = min(cands, key=lambda b: (_round_up(k, b), -b))
    return (min(block_m, max(16, _next_pow2(m))), min(block_n, max(16, _next_pow2(n))), bk)


def _deinterleave(a, n, axis):
    """Parts ``a[i::n]`` along ``axis`` (i = 0..n-1) by reshape + equal splits (lowers to Triton)."""
    shp = a.shape
    a = a.reshape(*shp[:axis], shp[axis] // n, n, *shp[axis + 1:])
    return [jnp.squeeze(t, axis + 1) for t in jnp.split(a, n, axis=axis + 1)]


def _expand_phases(v_ref, m_ref, kk, bk, loads):
    """Yield ``(e, p, D[e, p])`` for reduction step ``kk`` (see module doc)."""
    q = bk // 8
    meta = m_ref[pl.ds(kk * q, q), :].astype(jnp.int32)  # (q, bn): byte r = groups 2r, 2r+1
    if loads == "split":  # one contiguous (bk/2, bn) load, rows 4r + c split in registers
        vparts = _deinterleave(v_ref[pl.ds(kk * (bk // 2), bk // 2), :], 4, 0)
    else:  # four stride-4 row loads
        vparts = [v_ref[pl.ds(kk * (bk // 2) + c, q, stride=4), :] for c in range(4)]
    for e in range(2):
        nib = (meta >> (4 * e)) & 15
        i0, i1 = nib & 3, nib >> 2
        v0, v1 = vparts[2 * e], vparts[2 * e + 1]
        zero = jnp.zeros_like(v0)
        for p in range(4):
            yield e, p, jnp.where(i0 == p, v0, jnp.where(i1 == p, v1, zero))


def _spmm_kernel(*refs, bk: int, nk: int, gather: bool, aliased: bool, loads: str,
                 precision=None):
    if gather:
        x_ref, v_ref, m_ref, perm_ref, *rest = refs
    else:
        x_ref, v_ref, m_ref, *rest = refs
    o_ref = rest[-1]
    bm, bn = o_ref.shape
    q = bk // 8

    def x_parts(kk):
        """The 8 column phases x[:, kk*bk + 8r + 4e + p], indexed [4e + p]."""
        if loads == "split":
            if gather:
                cols = perm_ref[pl.ds(kk * bk, bk)]
                rows = lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
                tile = x_ref[rows, jnp.broadcast_to(cols[None, :], (bm, bk))]
            else:
                tile = x_ref[:, pl.ds(kk * bk, bk)]
            return _deinterleave(tile, 8, 1)
        parts = []
        for ph in range(8):
            start = kk * bk + ph
            if gather:  # columns perm[start::8] of this row block
                cols = perm_ref[pl.ds(start, q, stride=8)]
                rows = lax.broadcasted_iota(jnp.int32, (bm, q), 0)
                parts.append(x_ref[rows, jnp.broadcast_to(cols[None, :], (bm, q))])
            else:
                parts.append(x_ref[:, pl.ds(start, q, stride=8)])
        return parts

    def body(kk, acc):
        xs = x_parts(kk)
        for e, p, d in _expand_phases(v_ref, m_ref, kk, bk, loads):
            acc = acc + jnp.dot(xs[4 * e + p], d, precision=precision,
                                preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("bm", "bn", "bk", "interpret", "num_warps", "num_stages", "out_dtype",
                     "loads", "precision"))
def _spmm_padded(x, values, metadata, perm, out_init, *, bm, bn, bk, interpret, num_warps,
                 num_stages, out_dtype, loads, precision):
    """x (Mp, Kp), values (Kp/2, Np), metadata (Kp/8, Np), perm (Kp,) int32 or None; all divide."""
    mp, kp = x.shape
    np_ = values.shape[1]
    gather = perm is not None
    aliased = out_init is not None
    in_specs = [
        pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((kp // 2, bn), lambda i, j: (0, j)),
        pl.BlockSpec((kp // 8, bn), lambda i, j: (0, j)),
    ]
    args = [x, values, metadata]
    if gather:
        in_specs.append(pl.BlockSpec((kp,), lambda i, j: (0,)))
        args.append(perm)
    if aliased:
        in_specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
        args.append(out_init)
    kernel = functools.partial(_spmm_kernel, bk=bk, nk=kp // bk, gather=gather, aliased=aliased,
                               loads=loads, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        input_output_aliases={len(args) - 1: 0} if aliased else {},
        interpret=interpret,
        compiler_params=None if interpret else pltr.CompilerParams(
            num_warps=num_warps, num_stages=num_stages),
        name="spmm24_gather" if gather else "spmm24",
    )(*args)


def _spmm_impl(x, values, metadata, perm, *, block_m, block_n, block_k, interpret, num_warps,
               num_stages, out_dtype, out_init, loads, precision):
    x, values, metadata = jnp.asarray(x), jnp.asarray(values), jnp.asarray(metadata)
    _check_blocks(block_m, block_n, block_k)
    if loads not in ("strided", "split"):
        raise ValueError(f"loads must be 'strided' or 'split', got {loads!r}")
    if x.ndim < 1 or values.ndim != 2 or metadata.ndim != 2:
        raise ValueError(
            f"expected x (..., K), values (K/2, N), metadata (ceil(K/8), N); got shapes "
            f"{x.shape}, {values.shape}, {metadata.shape}")
    k = x.shape[-1]
    n = values.shape[1]
    if k % 4 or values.shape[0] * 2 != k:
        raise ValueError(
            f"x last axis K={k} must be divisible by 4 and equal 2 * values.shape[0] "
            f"(values shape {values.shape})")
    if metadata.shape != (-(-k // 8), n) or metadata.dtype != jnp.uint8:
        raise ValueError(
            f"metadata must be uint8 of shape {(-(-k // 8), n)} (ceil(K/8), N); got "
            f"{metadata.dtype} {metadata.shape}")
    if perm is not None:
        perm = jnp.asarray(perm)
        if perm.shape != (k,) or not jnp.issubdtype(perm.dtype, jnp.integer):
            raise ValueError(f"perm must be an int array of shape ({k},), got {perm.dtype} "
                             f"{perm.shape}")
    if interpret is None:
        interpret = default_interpret()
    dtype = jnp.result_type(x.dtype, values.dtype)
    out_dtype = jnp.dtype(out_dtype or dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(dtype)
    m = x2.shape[0]
    bm, bn, bk = _effective_blocks(m, n, k, block_m, block_n, block_k, interpret)
    mp, np_, kp = _round_up(max(m, 1), bm), _round_up(n, bn), _round_up(k, bk)
    x2 = _pad_to(x2, (mp, kp))
    v = _pad_to(values.astype(dtype), (kp // 2, np_))
    md = _pad_to(_pad_to(metadata, (kp // 8, n), PAD_BYTE), (kp // 8, np_), PAD_BYTE)
    if perm is not None:  # padded reduction entries read the zero padding of x
        perm = jnp.concatenate([perm.astype(jnp.int32), jnp.arange(k, kp, dtype=jnp.int32)])
    if out_init is not None:
        out_init = _pad_to(jnp.asarray(out_init, out_dtype).reshape(-1, n), (mp, np_))
    y = _spmm_padded(x2, v, md, perm, out_init, bm=bm, bn=bn, bk=bk, interpret=bool(interpret),
                     num_warps=num_warps, num_stages=num_stages, out_dtype=out_dtype, loads=loads,
                     precision=precision)
    return y[:m, :n].reshape(*lead, n)


def spmm(x, values, metadata, *, block_m: int = 64, block_n: int = 64, block_k: int = 256,
         interpret: bool | None = None, num_warps: int = 4, num_stages: int = 3,
         out_dtype=None, out_init=None, loads: str = "strided", precision=None):
    """``y = x @ W`` for ``W`` (K, N) given as ``compress(W, axis=0)``.

    Args:
      x: (..., K) float32 or bfloat16; any leading shape (flattened to M rows, ragged M is padded).
      values: (K/2, N), metadata: (ceil(K/8), N) uint8 -- the 2:4 format of ``pallas_kernels.format``.
      block_m, block_n, block_k: tile sizes (shrunk for small problems; ``block_k % 8 == 0``).
      interpret: run the kernel in Pallas interpret mode; default: True unless the default backend
        is a GPU.
      num_warps, num_stages: Triton compiler parameters (GPU only).
      out_dtype: result dtype; default ``result_type(x, values)``. Accumulation is always fp32.
      out_init: optional (..., N) array the output buffer is aliased to before the call (tests pass
        NaNs to prove every element is written).
      loads: how the kernel reads the phase slices: ``"strided"`` (stride-8 column loads of x,
        stride-4 row loads of values) or ``"split"`` (contiguous tile loads, split in registers by
        reshape + equal splits). Same result; which is faster on a GPU is not measured yet.
      precision: ``lax.Precision`` of the in-kernel dots. On GPU with fp32 inputs the default lets
        Triton use TF32 (as XLA does); ``HIGHEST`` asks for IEEE fp32.

    Returns:
      (..., N) array.
    """
    return _spmm_impl(x, values, metadata, None, block_m=block_m, block_n=block_n,
                      block_k=block_k, interpret=interpret, num_warps=num_warps,
                      num_stages=num_stages, out_dtype=out_dtype, out_init=out_init, loads=loads,
                      precision=precision)


def spmm_bwd_data(g, values_t, metadata_t, perm, *, gather: str = "xla", block_m: int = 64,
                  block_n: int = 64, block_k: int = 256, interpret: bool | None = None,
                  num_warps: int = 4, num_stages: int = 3, out_dtype=None, out_init=None,
                  loads: str = "strided", precision=None):
    """Bi-Mask backward-data product ``dx = g @ (W*Mb)^T``.

    The operand is ``B = ((W*Mb)[:, perm]).T`` of shape (C, K), 2:4 along axis 0 (the output
    channels in permuted order), given as ``compress(B, axis=0)`` -> ``values_t`` (C/2, K),
    ``metadata_t`` (ceil(C/8), K). Since ``g @ (W*Mb)^T = g[..., perm] @ B``:

    * ``gather="xla"`` (default): one XLA gather ``g[..., perm]`` then ``spmm``;
    * ``gather="kernel"``: no gather pass; the kernel reads ``g``'s columns ``perm[k0 + 8r + 4e + p]``
      directly (gathered loads inside the reduction loop).

    Args:
      g: (..., C) output cotangent, float32 or bfloat16. perm: int (C,), the permutation.
      Other arguments as in ``spmm``.

    Returns:
      (..., K) array.
    """
    if gather not in ("xla", "kernel"):
        raise ValueError(f"gather must be 'xla' or 'kernel', got {gather!r}")
    g = jnp.asarray(g)
    perm = jnp.asarray(perm)
    c = g.shape[-1]
    if perm.shape != (c,):
        raise ValueError(f"perm must have shape ({c},) (g's last axis), got {perm.shape}")
    kw = dict(block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret,
              num_warps=num_warps, num_stages=num_stages, out_dtype=out_dtype, out_init=out_init,
              loads=loads, precision=precision)
    if gather == "xla":
        return _spmm_impl(jnp.take(g, perm, axis=-1), values_t, metadata_t, None, **kw)
    return _spmm_impl(g, values_t, metadata_t, perm, **kw)


def spmm_reference(x, values, metadata):
    """jnp reference: ``x @ decompress(values, metadata)`` with fp32 accumulation."""
    from pallas_kernels.format import decompress

    w = decompress(values, metadata, axis=0)
    dtype = jnp.result_type(x.dtype, values.dtype)
    return jnp.dot(x.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32).astype(dtype)
