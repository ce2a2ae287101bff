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


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def refresh_layer(key, kernel, perm, refreshes, n: int, m: int, num_candidates: int,
                  chunk_size=None):
    """One refresh of one (possibly stacked) layer: ``search_permutation`` on every stacked kernel
    with its current permutation as incumbent.

    Args:
      key: PRNG key for this layer; split over the stack axes.
      kernel: floating ``(*stack, *kshape)``; perm: int32 ``(*stack, C)``; refreshes: int32 ``stack``.

    Returns:
      ``(new_perm, refreshes + 1)`` with the input shapes.
    """
    c = perm.shape[-1]
    stack = perm.shape[:-1]
    w = kernel.reshape(*stack, -1, c)
    size = math.prod(stack)
    keys = jax.random.split(key, size) if stack else key

    def one(kk, wk, pk):
        return search_permutation(kk, wk, n, m, num_candidates, init=pk, chunk_size=chunk_size)

    if stack:
        new = jax.vmap(one)(keys, w.reshape(size, *w.shape[-2:]), perm.reshape(size, c))
        new = new.reshape(perm.shape)
    else:
        new = one(keys, w, perm)
    return new.astype(jnp.int32), refreshes + 1
