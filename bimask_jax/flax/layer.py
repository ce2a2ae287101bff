"""Framework-free per-layer computations: masks of a layer kernel, the sparse products that replace
``lax.dot_general``/``lax.conv_general_dilated`` inside Flax layers, and the per-layer refresh.

A layer kernel has the input axes first and the output axes last. It is read as the matrix
``(K, C)``: ``C`` is the product of the output axes, ``K`` of the input axes (row-major flatten;
for a conv, window axes then ``Cin``). Kernels stacked by ``nn.scan``/``nnx.vmap`` carry extra
leading axes; their permutations carry the same leading axes, ``perm.shape == (*stack, C)``.

The Bi-Mask state of a layer is a *record*: a dict of arrays, one per field, defined in one place
(:func:`new_record`); linen keeps it in the ``"bimask"`` collection at the layer's path, nnx in
:class:`~bimask_jax.flax.nnx.BimaskState` variables of the layer's op.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bimask_jax.masks import layer_masks
from bimask_jax.ops import sparse_conv, sparse_dense
from bimask_jax.permutation import search_permutation


def new_record(cfg, method: str, stack: tuple[int, ...], c: int) -> dict:
    """The initial Bi-Mask state of one sparse layer with ``C = c`` output columns, stacked
    ``stack`` times (``nn.scan``/``nnx.vmap``). Every field of the per-layer state is defined here
    (name, shape, dtype, initial value); the rest of the wrapper creates, checks, refreshes and
    checkpoints whatever this returns. ``cfg`` (:class:`SparseConfig`) and ``method`` (the layer's
    effective method) are for fields that only some methods need.

    Fields: ``perm`` int32 ``(*stack, C)``, the column permutation of the backward mask (identity);
    ``refreshes`` int32 ``stack``, the number of refreshes applied to the layer.
    """
    del cfg, method  # every method has the same fields for now
    return {"perm": jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (*stack, c)),
            "refreshes": jnp.zeros(stack, jnp.int32)}


def check_record(path: str, record: dict, cfg, method: str, kernel_shape, stack, c: int) -> None:
    """Raises ValueError (naming the layer and the rule) unless ``record`` fits the layer: every
    field of :func:`new_record` present with its shape and dtype kind (static, so also under jit),
    and, where its value is concrete, ``perm`` a permutation of ``range(C)`` along its last axis."""
    k = math.prod(kernel_shape[len(stack):]) // max(c, 1)
    for name, want in jax.eval_shape(lambda: new_record(cfg, method, tuple(stack), c)).items():
        got = record.get(name)
        if got is None:
            raise ValueError(f"layer {path!r}: its Bi-Mask state has no {name!r} field")
        shape, dtype = tuple(np.shape(got)), jnp.result_type(got)
        if shape != want.shape or getattr(dtype, "kind", 0) != getattr(want.dtype, "kind", 1):
            raise ValueError(
                f"layer {path!r}: Bi-Mask state {name!r} is {dtype}{list(shape)}, but this layer "
                f"(kernel {tuple(kernel_shape)}, read as the ({k}, {c}) matrix"
                f"{f' stacked {tuple(stack)}' if stack else ''}) needs {want.dtype}"
                f"{list(want.shape)}: the state does not fit the layer (from another model?)"
            )
    perm = record["perm"]
    if not isinstance(perm, jax.core.Tracer):
        p = np.asarray(perm).reshape(-1, c)
        bad = np.flatnonzero((np.sort(p, axis=-1) != np.arange(c)).any(-1))
        if bad.size:
            raise ValueError(
                f"layer {path!r}: Bi-Mask state 'perm' must hold a permutation of 0..{c - 1} "
                f"(each column index once), got {p[bad[0]].tolist()}"
            )


def safe_perm(perm):
    """``perm`` (int ``(..., C)``) where each row is a permutation of ``range(C)``, else the
    identity: the defined fallback for invalid incumbents that cannot be checked (traced)."""
    c = perm.shape[-1]
    ident = jnp.arange(c, dtype=perm.dtype)
    ok = jnp.all(jnp.sort(perm, axis=-1) == ident, axis=-1, keepdims=True)
    return jnp.where(ok, perm, ident)


def sparse_dot_general(cfg, resolve, lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None, **kwargs):
    """Drop-in ``lax.dot_general`` of a Dense/DenseGeneral/Linear/LinearGeneral layer.

    ``resolve(kernel_shape, in_channels, C, reason) -> (method, perm)`` is the front end's hook:
    it applies the selection rule (``reason``: why the product cannot be sparse, or ``""``) and
    returns the layer's method (``"dense"``: the plain product) and permutation (``(C,)`` or None).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    n_in = len(rc)
    c = math.prod(rhs.shape[n_in:])
    bad = lb or rb or tuple(rc) != tuple(range(n_in))
    reason = f"unsupported dot_general dimension numbers {dimension_numbers}" if bad else ""
    method, perm = resolve(rhs.shape, rhs.shape[n_in - 1], c, reason)
    if method == "dense":
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    fwd, bwd = kernel_masks(rhs, c, cfg.n, cfg.m, method, perm if method == "bimask" else None)
    y = dense_general_product(lhs, rhs, lc, fwd, bwd, cfg.decay, precision=precision,
                              perm=perm if cfg.backend != "xla" else None, backend=cfg.backend)
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def sparse_conv_general(cfg, resolve, lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        precision=None, preferred_element_type=None, **kwargs):
    """Drop-in ``lax.conv_general_dilated`` of a Conv layer; ``resolve`` as in
    :func:`sparse_dot_general` (only channels-last, ungrouped convs can be sparse)."""
    ok = feature_group_count == 1 and is_channels_last(dimension_numbers, lhs.ndim)
    reason = "" if ok else "unsupported conv configuration"
    method, perm = resolve(rhs.shape, rhs.shape[-2], rhs.shape[-1], reason)
    if method == "dense":
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs,
        )
    fwd, bwd = kernel_masks(rhs, rhs.shape[-1], cfg.n, cfg.m, method,
                            perm if method == "bimask" else None)
    y = sparse_conv(
        lhs, rhs, fwd, bwd, cfg.decay, strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation if lhs_dilation is not None else 1,
        rhs_dilation=rhs_dilation if rhs_dilation is not None else (1,) * (lhs.ndim - 2),
        perm=perm if cfg.backend != "xla" else None, precision=precision,
        backend=cfg.backend,
    )
    return y if preferred_element_type is None else y.astype(preferred_element_type)


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


def is_channels_last(dn, ndim: int) -> bool:
    """Whether conv dimension numbers are Flax's channels-last ones (NHWC, HWIO, NHWC)."""
    sp = tuple(range(1, ndim - 1))
    want = ((0, ndim - 1, *sp), (ndim - 1, ndim - 2, *range(ndim - 2)), (0, ndim - 1, *sp))
    return isinstance(dn, lax.ConvDimensionNumbers) and tuple(map(tuple, dn)) == want


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
