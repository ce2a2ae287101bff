"""Framework-free per-layer computations: masks of a layer kernel, the sparse products that replace
``lax.dot_general``/``lax.conv_general_dilated`` inside Flax layers, and the per-layer refresh.

A layer kernel has the input axes first and the output axes last. It is read as the matrix
``(K, C)``: ``C`` is the product of the output axes, ``K`` of the input axes (row-major flatten;
for a conv, window axes then ``Cin``). Kernels stacked by ``nn.scan``/``nnx.vmap`` carry extra
leading axes; their permutations carry the same leading axes, ``perm.shape == (*stack, C)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from bimask_jax.masks import layer_masks
from bimask_jax.ops import sparse_dense
from bimask_jax.permutation import search_permutation


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def kernel_masks(kernel, out_size: int, n: int, m: int, method: str, perm=None):
    """``(fwd, bwd)`` bool masks of ``kernel.shape`` from the matrix view ``(K, out_size)``.

    ``kernel``: floating ``(*in_axes, *out_axes)`` with ``prod(out_axes) == out_size`` and no stack
    axes; ``perm``: int ``(out_size,)`` or None (identity). Jitted (one compile per shape when called
    eagerly, e.g. in ``model.init``; inlined under an outer ``jit``).
    """
    w2 = kernel.reshape(-1, out_size)
    fwd, bwd = layer_masks(w2, n, m, method, perm)
    return fwd.reshape(kernel.shape), bwd.reshape(kernel.shape)


def stacked_masks(kernel, perm, n: int, m: int, method: str):
    """:func:`kernel_masks` over stacked layers: ``kernel (*stack, *kshape)``, ``perm (*stack, C)``.

    Returns ``(fwd, bwd)`` of ``kernel.shape`` (vmapped over the stack axes).
    """
    c = perm.shape[-1]

    def one(k, p):
        return kernel_masks(k, c, n, m, method, p)

    fn = one
    for _ in range(perm.ndim - 1):
        fn = jax.vmap(fn)
    return fn(kernel, perm)


def dense_general_product(
    x, kernel, lhs_contract, fwd, bwd, decay, *, perm=None, precision=None, backend="xla"
):
    """``lax.dot_general(x, kernel, ((lhs_contract, range(n_in)), ((), ())))`` through
    :func:`sparse_dense`.

    Args:
      x: floating, any shape; ``lhs_contract`` lists its contracted axes, paired in order with the
        first ``n_in = len(lhs_contract)`` axes of ``kernel``.
      kernel: ``(*in_axes, *out_axes)``; ``fwd``, ``bwd``: bool masks of its shape.

    Returns:
      ``(*free axes of x in order, *out_axes)``, as ``lax.dot_general`` orders them.
    """
    n_in = len(lhs_contract)
    k = math.prod(kernel.shape[:n_in])
    c = math.prod(kernel.shape[n_in:])
    nd = x.ndim
    xm = jnp.moveaxis(x, tuple(lhs_contract), tuple(range(nd - n_in, nd)))
    free = xm.shape[: nd - n_in]
    y = sparse_dense(
        xm.reshape(*free, k), kernel.reshape(k, c), fwd.reshape(k, c), bwd.reshape(k, c), decay,
        perm=perm, precision=precision, backend=backend,
    )
    return y.reshape(*free, *kernel.shape[n_in:])


def is_channels_last(dimension_numbers, ndim: int) -> bool:
    """Whether conv dimension numbers are Flax's channels-last ones (NHWC, HWIO, NHWC)."""
    if dimension_numbers is None:
        return False
    spatial = tuple(range(1, ndim - 1))
    want = lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )
    dn = dimension_numbers
    if not isinstance(dn, lax.ConvDimensionNumbers):
        return False
    return tuple(map(tuple, dn)) == tuple(map(tuple, want))


# Budget for the gathered int8 forward masks of one vmapped chunk of a refresh group (bytes).
_GROUP_CHUNK_BYTES = 64 * 2**20


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def search_stacked(keys, kernels, perms, n: int, m: int, num_candidates: int, chunk_size=None,
                   search: str = "random", iterations: int = 64):
    """``search_permutation`` vmapped over ``S`` same-shape layers.

    Args:
      keys: ``(S,)`` PRNG keys; kernels: floating ``(S, K, C)``; perms: int32 ``(S, C)`` incumbents.
      chunk_size: candidates per chunk; None: keep ``S * chunk * K * C`` bytes <= 64 MiB.
      search, iterations: ``search_permutation``'s ``method`` and (local searches) ``iterations``.

    Returns:
      int32 ``(S, C)``.
    """
    s, k, c = kernels.shape
    if chunk_size is None:
        chunk_size = max(1, min(max(num_candidates, 1), _GROUP_CHUNK_BYTES // max(1, s * k * c)))

    def one(kk, w, p):
        if num_candidates == 0:  # the no-permutation ablation, whatever the search method
            return p
        if search != "random":
            return search_permutation(kk, w, n, m, init=p, method=search, iterations=iterations)
        return search_permutation(kk, w, n, m, num_candidates, init=p, chunk_size=chunk_size)

    return jax.vmap(one)(keys, kernels, perms).astype(jnp.int32)


def refresh_layers(key, layers, n: int, m: int, num_candidates: int, chunk_size=None,
                   search: str = "random", iterations: int = 64):
    """One refresh of several (possibly stacked) layers: ``search_permutation`` on every kernel
    with its current permutation as incumbent. Layers whose matrices have the same ``(K, C)`` are
    searched together in one vmapped call (one compile per distinct shape).

    Args:
      key: PRNG key. Layer ``i`` uses ``fold_in(key, i)``; a stacked layer splits that key over
        its stack (``(*stack)`` row-major).
      layers: sequence of ``(kernel (*stack, *kshape), perm (*stack, C))``.

    Returns:
      list of new permutations, int32, shaped like the ``perm`` inputs.
    """
    flat = []  # per layer: (keys (S,), kernels (S, K, C), perms (S, C))
    for i, (kernel, perm) in enumerate(layers):
        c = perm.shape[-1]
        stack = perm.shape[:-1]
        size = math.prod(stack)
        lk = jax.random.fold_in(key, i)
        keys = jax.random.split(lk, size) if stack else lk[None]
        w = kernel.reshape(size, -1, c)
        flat.append((keys, w, perm.reshape(size, c)))
    groups: dict[tuple, list[int]] = {}
    for i, (_, w, _) in enumerate(flat):
        groups.setdefault((w.shape[1:], w.dtype), []).append(i)
    out: list = [None] * len(flat)
    for idx in groups.values():
        keys = jnp.concatenate([flat[i][0] for i in idx])
        ws = jnp.concatenate([flat[i][1] for i in idx])
        ps = jnp.concatenate([flat[i][2] for i in idx])
        new = search_stacked(keys, ws, ps, n, m, num_candidates, chunk_size, search, iterations)
        start = 0
        for i in idx:
            size = flat[i][2].shape[0]
            out[i] = new[start:start + size].reshape(layers[i][1].shape)
            start += size
    return out
