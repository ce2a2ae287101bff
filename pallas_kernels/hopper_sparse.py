"""Hopper (sm_90a) 2:4 sparse tensor-core path: ``wgmma.mma_async.sp`` through Mosaic GPU.

UNVERIFIED ON HARDWARE. This module lowers for ``cuda`` on a CPU-only jaxlib 0.10.2 (tested); it has
never run on a GPU. The metadata word layout (``pack_sm90_metadata``) is *derived* (from CUTLASS's
CuTe description of the sparse ``wgmma`` operands), because the PTX ISA gives it only as a
figure; a wrong layout gives wrong numbers, not a crash. ``benchmarks/kernels.py --sm90`` checks
the result against the dense product in the same run.

Only operand A of the instruction may be sparse (compressed M x K/2 in SMEM plus metadata in one
32-bit register per thread per instruction). So the kernel computes ``out = expand(A) @ B^T``
(``spmm_t_sm90``), tile by tile, with B dense and K-major, and ``spmm_sm90`` computes
``y = x @ W`` as ``(W^T @ x^T)^T`` -- A = W^T (2:4 along K), B = x -- paying one transpose of the
compressed values (K/2 x N) and one of the output (XLA) around the kernel.

Import-safe: the Mosaic GPU modules are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SWIZZLE = 128  # bytes; bf16: 64 elements per swizzled row


# ------------------------------------------------------------------------------------ metadata


def pack_sm90_metadata(metadata: jax.Array) -> jax.Array:
    """Our metadata of A (M, K) compressed along axis 1 -> per-thread wgmma.sp words.

    Args:
      metadata: uint8 (M, K/8) from ``compress(a, axis=1)``; M % 64 == 0, K % 32 == 0.

    Returns:
      uint32 (M/64, K/32, 128): word ``[mi, ks, t]`` is the ``sp-meta`` register of thread
      ``t = 32w + 4g + 2d + h`` (warp w, lane 4g + 2d + h) for the m64nNk32 instruction covering rows
      ``64mi ..`` and logical K ``32ks ..``. Derived layout (unverified): bits ``4c .. 4c+3`` hold the
      nibble of row ``64mi + 16w + g``, group at K ``32ks + 16h + 4c``; bits ``16 + 4c ..`` the same
      for row ``+ 8``; lanes with d = 1 copy d = 0 (so sp-sel 0 and 1 read the same data). Our
      nibble code ``i0 | i1 << 2`` is the instruction's, so a word is just two little-endian
      16-bit pairs of our metadata bytes.
    """
    metadata = jnp.asarray(metadata)
    m, kb = metadata.shape
    if metadata.dtype != jnp.uint8 or m % 64 or kb % 4:
        raise ValueError(
            f"metadata must be uint8 (M, K/8) with M % 64 == 0 and K % 32 == 0, got "
            f"{metadata.dtype} {metadata.shape}")
    b = metadata.astype(jnp.uint32)
    half = b[:, 0::2] | (b[:, 1::2] << 8)  # (M, K/16): 4 groups = 16 logical K per entry
    # row = 64 mi + 16 w + 8 rh + g ; column = 2 ks + h
    half = half.reshape(m // 64, 4, 2, 8, kb // 4, 2)  # (mi, w, rh, g, ks, h)
    word = half[:, :, 0] | (half[:, :, 1] << 16)  # (mi, w, g, ks, h)
    word = word.transpose(0, 3, 1, 2, 4)  # (mi, ks, w, g, h)
    word = jnp.broadcast_to(word[:, :, :, :, None, :], (m // 64, kb // 4, 4, 8, 2, 2))
    return word.reshape(m // 64, kb // 4, 128)


def unpack_sm90_metadata(words: jax.Array) -> jax.Array:
    """Inverse of ``pack_sm90_metadata`` (reads the d = 0 lanes): (M/64, K/32, 128) -> (M, K/8)."""
    words = jnp.asarray(words, jnp.uint32)
    mt, ks, _ = words.shape
    w = words.reshape(mt, ks, 4, 8, 2, 2)[:, :, :, :, 0, :]  # (mi, ks, w, g, h)
    halves = jnp.stack([w & 0xFFFF, w >> 16], axis=3)  # (mi, ks, w, rh, g, h)
    halves = halves.transpose(0, 2, 3, 4, 1, 5).reshape(mt * 64, ks * 2)  # (row, 2ks + h)
    out = jnp.stack([halves & 0xFF, halves >> 8], axis=-1).reshape(mt * 64, ks * 4)
    return out.astype(jnp.uint8)


# ------------------------------------------------------------------------------ the instruction


def _emit_wgmma_sp(acc_regs, a_desc, b_desc, meta, n, trans_b):
    """One ``wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.bf16.bf16`` (SS form, sp-sel 0).

    acc_regs: the n/2 ``vector<1xf32>`` accumulator registers of this 64-row group (read and
    written: tied constraints); a_desc, b_desc: i64 SMEM descriptors; meta: i32 metadata word.
    """
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    nacc = n // 2
    if len(acc_regs) != nacc:
        raise ValueError(f"expected {nacc} accumulator registers for n={n}, got {len(acc_regs)}")
    i32 = ir.IntegerType.get_signless(32)

    def imm(v):
        return llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, v)).result

    # operands after the nacc outputs and nacc tied inputs:
    #   a-desc, b-desc, meta, sp-sel, scale-d, scale-a, scale-b, trans-a, trans-b
    first = 2 * nacc
    names = [f"${first + i}" for i in range(9)]
    a_op, b_op, meta_op, sel_op, scd_op, sca_op, scb_op, ta_op, tb_op = names
    acc = "{" + ",".join(f"${i}" for i in range(nacc)) + "}"
    asm = (
        "{\n.reg .pred p;\n"
        f"setp.ne.b32 p, {scd_op}, 0;\n"
        f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.bf16.bf16 {acc}, {a_op}, {b_op}, "
        f"{meta_op}, {sel_op}, p, {sca_op}, {scb_op}, {ta_op}, {tb_op};\n}}\n"
    )
    constraints = ",".join(
        ["=f"] * nacc + [str(i) for i in range(nacc)] + ["l", "l", "r"] + ["n"] * 6)
    reg_ty = acc_regs[0].type
    result = llvm.inline_asm(
        llvm.StructType.get_literal([reg_ty] * nacc),
        [*acc_regs, a_desc, b_desc, meta,
         imm(0), imm(1), imm(1), imm(1), imm(0), imm(int(trans_b))],
        asm, constraints, has_side_effects=True, asm_dialect=0)
    return [llvm.extractvalue(reg_ty, result, [i]) for i in range(nacc)]


def _step_offset(step, tiling, strides):
    """Byte offset of instruction ``step`` within an MMA group (Mosaic's desc_k_tiling/strides)."""
    coords = []
    for t in tiling:
        coords.append(step // t)
        step %= t
    coords.append(step)
    return sum(c * s for c, s in zip(coords, strides, strict=True))


def sparse_wgmma(acc, a_smem, b_smem, meta_word):
    """acc += expand(A) @ B for one pipeline stage (Mosaic GPU level; all threads of a warpgroup).

    acc: ``WGMMAAccumulator`` (M, N) f32. a_smem: compressed A, tiled memref of logical shape
    (M, Kc) = (M, K/2), K-major, tiling (8, 64), 128 B swizzle. b_smem: tiled memref of logical
    (K, N) (a ``memref_transpose`` view of an (N, K) K-major tile). meta_word(mi, ks): i32 word of
    this thread for 64-row group mi and k32 step ks. Issues the instructions; the caller commits
    and waits.
    """
    import importlib

    import numpy as np
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import mma_utils, utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    fa = importlib.import_module("jax.experimental.mosaic.gpu.fragmented_array")
    (k, n), b_ty = mma_utils.tiled_memref_shape(b_smem)
    (m, kc), a_ty = mma_utils.tiled_memref_shape(a_smem)
    if a_ty != ir.BF16Type.get() or b_ty != ir.BF16Type.get():
        raise NotImplementedError("only bf16 operands (f32 accumulation)")
    if 2 * kc != k or m % 64 or n % 8 or n > 256 or k % 128:
        raise ValueError(f"bad sparse wgmma shapes: A ({m}, {kc}) compressed, B ({k}, {n})")
    a_grp = SWIZZLE // 2  # compressed elements per A group (one 128 B swizzled row)
    per_grp = a_grp // 16  # k32 instructions per group (16 compressed elements each)
    (a_base, (a_tiling, a_strides)), (a_m_stride, a_k_stride), _ = mma_utils.create_descriptor(
        a_smem, swizzle=SWIZZLE, group_size=(64, a_grp), logical_k_major=False)
    (b_base, (b_tiling, b_strides)), (_, b_k_stride), b_fast = mma_utils.create_descriptor(
        b_smem, swizzle=SWIZZLE, group_size=(2 * a_grp, n), logical_k_major=True,
        mma_bytewidth_k=64)
    trans_b = b_fast != mma_utils.Dim.K
    i64 = ir.IntegerType.get_signless(64)

    def advance(desc, nbytes):
        return llvm.add(desc, utils.c(nbytes >> 4, i64),
                        overflow_flags=llvm.IntegerOverflowFlags.none)

    regs = acc._value.registers.copy()
    for mi in range(m // 64):
        cur = list(regs[mi:mi + 1].flat)
        for kg in range(k // (2 * a_grp)):
            for s in range(per_grp):
                a_desc = advance(a_base, mi * a_m_stride + kg * a_k_stride
                                 + _step_offset(s, a_tiling, a_strides))
                b_desc = advance(b_base, kg * b_k_stride + _step_offset(s, b_tiling, b_strides))
                cur = _emit_wgmma_sp(cur, a_desc, b_desc, meta_word(mi, kg * per_grp + s), n,
                                     trans_b)
        regs[mi:mi + 1] = np.array(cur, dtype=object).reshape(regs[mi:mi + 1].shape)
    value = fa.FragmentedArray(_registers=regs, _layout=acc._value.layout, _is_signed=None)
    return mgpu.WGMMAAccumulator(_value=value, _original_layout=acc._original_layout, _sync=False)


# ---------------------------------------------------------------------------------- the kernel


def _transforms():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))


def _stage_fn(tile_m, tile_n):
    """inline_mgpu step: (A_c smem, B smem, words smem, acc) -> acc + expand(A_c) @ B^T."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref, nvvm

    tr = _transforms()

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(tr), plgpu.RefType(tr), plgpu.RefType(), plgpu.Layout.WGMMA),
        return_type=plgpu.ShapeDtypeStruct((tile_m, tile_n), jnp.float32,
                                           layout=plgpu.Layout.WGMMA))
    def stage(ctx, a_smem, b_smem, w_smem, acc):
        del ctx
        index, i32 = ir.IndexType.get(), ir.IntegerType.get_signless(32)
        tid = arith.index_cast(index, arith.remui(mgpu.thread_idx(), utils.c(128, i32)))

        def meta_word(mi, ks):
            return memref.load(w_smem, [utils.c(mi, index), utils.c(ks, index), tid])

        b_kn = mgpu.memref_transpose(b_smem, (1, 0, 3, 2))  # (N, K) K-major -> logical (K, N)
        acc = mgpu.WGMMAAccumulator.from_registers(acc)  # fences
        acc = sparse_wgmma(acc, a_smem, b_kn, meta_word)
        nvvm.wgmma_commit_group_sync_aligned()
        nvvm.wgmma_wait_group_sync_aligned(0)  # registers leave as plain values: wait here
        return acc.value

    return stage


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "tile_k", "max_concurrent_steps"))
def spmm_t_sm90(a_values, words, b, *, tile_m: int = 128, tile_n: int = 128, tile_k: int = 128,
                max_concurrent_steps: int = 2):
    """``out = expand(A) @ B^T`` on Hopper sparse tensor cores (UNVERIFIED on hardware).

    Args:
      a_values: bf16 (M, K/2), the values of ``compress(A, axis=1)``.
      words: uint32 (M/64, K/32, 128) = ``pack_sm90_metadata(metadata of A)``.
      b: bf16 (N, K), K-major (for ``x @ W``: ``b = x``).
      tile_m (multiple of 64), tile_n (multiple of 8, <= 256), tile_k (multiple of 128): tiles; the
        shapes must divide (no padding here).

    Returns:
      f32 (M, N).
    """
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, kc = a_values.shape
    n, k = b.shape
    if 2 * kc != k or words.shape != (m // 64, k // 32, 128):
        raise ValueError(f"inconsistent shapes: A values {a_values.shape}, words {words.shape}, "
                         f"B {b.shape}")
    if m % tile_m or n % tile_n or k % tile_k or tile_m % 64 or tile_k % 128 or tile_n % 8:
        raise ValueError(f"(M, N, K) = {(m, n, k)} must divide by tiles {(tile_m, tile_n, tile_k)}"
                         " (tile_m % 64 == 0, tile_n % 8 == 0, tile_k % 128 == 0)")
    tr = _transforms()
    stage = _stage_fn(tile_m, tile_n)

    def body(a_gmem, w_gmem, b_gmem, o_gmem, o_smem):
        mi, ni = lax.axis_index("m"), lax.axis_index("n")
        acc0 = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32), plgpu.Layout.WGMMA)

        def pipe_body(_, a_smem, b_smem, w_smem, acc):
            return stage(a_smem, b_smem, w_smem, acc)

        acc = plgpu.emit_pipeline(
            pipe_body,
            grid=(k // tile_k,),
            in_specs=[
                plgpu.BlockSpec((tile_m, tile_k // 2), lambda kk: (0, kk), transforms=tr),
                plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk), transforms=tr),
                plgpu.BlockSpec((tile_m // 64, tile_k // 32, 128), lambda kk: (0, kk, 0)),
            ],
            max_concurrent_steps=max_concurrent_steps,
            init_carry=acc0,
        )(a_gmem.at[pl.ds(mi * tile_m, tile_m)], b_gmem.at[pl.ds(ni * tile_n, tile_n)],
          w_gmem.at[pl.ds(mi * (tile_m // 64), tile_m // 64)])
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * tile_m, tile_m),
                                                  pl.ds(ni * tile_n, tile_n)])
        plgpu.wait_smem_to_gmem(0)

    def kernel_body(a_gmem, w_gmem, b_gmem, o_gmem, o_smem):
        body(a_gmem, w_gmem, b_gmem, o_gmem, o_smem)

    f = plgpu.kernel(
        kernel_body,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
        scratch_types=[plgpu.SMEM((tile_m, tile_n), jnp.float32)],
        grid=(m // tile_m, n // tile_n),
        grid_names=("m", "n"),
    )
    # argument order of the pipeline specs: A, B, words
    return f(a_values, words, b)


def spmm_sm90(x, values, metadata, **tiles):
    """``y = x @ W`` for W (K, N) given as ``compress(W, axis=0)``, via ``spmm_t_sm90``.

    x: bf16 (M, K). Costs, besides the kernel: the transposes ``values.T``, ``metadata.T`` (small,
    per weight) and of the (N, M) result. Returns f32 (M, N). UNVERIFIED on hardware.
    """
    words = pack_sm90_metadata(jnp.asarray(metadata).T)
    return spmm_t_sm90(jnp.asarray(values).T, words, x, **tiles).T


def spmm_bwd_data_sm90(g, values_t, metadata_t, perm, **tiles):
    """``dx = g @ (W*Mb)^T`` from the ``spmm_bwd_data`` operand, via ``spmm_t_sm90``.

    ``values_t`` (C/2, K), ``metadata_t`` (C/8, K) compress ``((W*Mb)[:, perm]).T`` along C, so
    A = its transpose (K, C) is 2:4 along the MMA's K (= C) and B = ``g[:, perm]`` (one XLA gather).
    g: bf16 (M, C). Returns f32 (M, K). UNVERIFIED on hardware.
    """
    words = pack_sm90_metadata(jnp.asarray(metadata_t).T)
    gp = jnp.take(jnp.asarray(g), jnp.asarray(perm), axis=1)
    return spmm_t_sm90(jnp.asarray(values_t).T, words, gp, **tiles).T
