"""Framework-free per-layer computations: masks of a layer kernel, the sparse products that replace
``lax.dot_general``/``lax.conv_general_dilated`` inside Flax layers, and the per-layer refresh.

A layer kernel has the input axes first and the output axes last. It is read as the matrix
``(K, C)`` (:func:`layer_matrix`): ``C`` is the product of the output axes, ``K`` of the input axes,
rows in ``k_order`` (``"hwi"``: row-major, for a conv window axes then ``Cin``; ``"ihw"``, the
reference implementation's: a conv's ``Cin`` then window axes). Kernels stacked by
``nn.scan``/``nnx.vmap`` carry extra leading axes; their permutations carry the same leading axes,
``perm.shape == (*stack, C)``.

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
from bimask_jax.permutation import default_chunk_size, search_permutation
from bimask_jax.sste import soft_threshold, sste_weight


def new_record(cfg, method: str, stack: tuple[int, ...], c: int, kernel=None) -> dict:
    """The initial Bi-Mask state of one sparse layer with ``C = c`` output columns, stacked
    ``stack`` times (``nn.scan``/``nnx.vmap``). Every field of the per-layer state is defined here
    (name, shape, dtype, initial value); the rest of the wrapper creates, checks, refreshes and
    checkpoints whatever this returns. ``cfg`` (:class:`SparseConfig`) and ``method`` (the layer's
    effective method) are for fields that only some methods need; ``kernel`` (the layer's
    ``(*stack, *kshape)`` kernel, or a ``jax.ShapeDtypeStruct`` of it) for fields derived from it
    (needed by those fields; linen passes it at ``init``, nnx at :func:`bimask_jax.sparse`).

    Fields: ``perm`` int32 ``(*stack, C)``, the column permutation of the backward mask (identity);
    ``refreshes`` int32 ``stack``, the number of refreshes applied to the layer; and

    * ``sste_scale`` float32 ``stack`` (``method="sste"``): S-STE's per-tensor scale
      ``<w, S(w)> / <S(w), S(w)>`` of the kernel when the state is created, fixed afterwards, as
      Hu et al.'s code sets it once at model construction (:func:`bimask_jax.sste.sste_scale`;
      :func:`~bimask_jax.flax.state.reset_sste_scales` recomputes it, e.g. after loading weights).
    * ``wgrad_key`` uint32 ``(*stack, 2)`` (``cfg.wgrad="mvue"``, not ``"dense"``): the raw PRNG key
      of the layer's MVUE weight-gradient draw, zeros until
      :func:`~bimask_jax.flax.state.set_wgrad_key` writes this step's key.
    * ``mask`` bool ``(*stack, *kshape)`` (``method="transposable"`` with
      ``cfg.mask_update="refresh"``): the transposable mask the layer uses (forward and
      backward-data products, masked decay), initially the mask of the initial kernel and
      recomputed from the current kernel only by :func:`~bimask_jax.flax.state.refresh_state`
      (Hu et al.'s periodic update).
    * ``prev_fwd`` bool ``(*stack, *kshape)`` (``cfg.track_flips``): the forward mask at the last
      :func:`~bimask_jax.flax.state.track_flips` (initially the kernel's own).
    """
    rec = {"perm": jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (*stack, c)),
           "refreshes": jnp.zeros(stack, jnp.int32)}
    needs_kernel = method == "sste" or cfg.track_flips or stores_mask(cfg, method)
    if needs_kernel and kernel is None:
        raise ValueError(f"new_record: method={method!r} / track_flips={cfg.track_flips} / "
                         f"mask_update={cfg.mask_update!r} need the layer's kernel for their "
                         "initial state")
    if method == "sste":
        rec["sste_scale"] = stacked_sste_scales(kernel, c, cfg.n, cfg.m, cfg.k_order, len(stack))
    if cfg.wgrad == "mvue" and method != "dense":
        rec["wgrad_key"] = jnp.zeros((*stack, 2), jnp.uint32)
    if stores_mask(cfg, method):
        rec["mask"] = stacked_masks(kernel, rec["perm"], cfg.n, cfg.m, method, cfg.k_order)[0]
    if cfg.track_flips:
        perm = rec["perm"]
        rec["prev_fwd"] = (rec["mask"] if "mask" in rec else
                           stacked_masks(kernel, perm, cfg.n, cfg.m, method, cfg.k_order)[0])
    return rec


def stores_mask(cfg, method: str) -> bool:
    """Whether a layer of effective ``method`` keeps its mask in its record (``mask``): a
    ``"transposable"`` layer with ``cfg.mask_update="refresh"`` (an ``"srste"`` fallback does not)."""
    return method == "transposable" and cfg.mask_update == "refresh"


def transposable_ok(mask, c: int, n: int, m: int, k_order: str = "hwi", n_stack: int = 0):
    """bool ``stack``: whether each stacked ``mask (*stack, *kshape)`` is a transposable N:M mask
    of its layer matrix (:func:`layer_matrix`, ``K % m == C % m == 0``): in every ``m x m`` block,
    every row and every column keeps exactly ``n`` entries (``m <= 4``, what the exact pattern
    search gives) or at most ``n`` (``m > 4``, the greedy approximation of
    :func:`bimask_jax.transposable_mask`)."""
    w = layer_matrix(mask, c, k_order, n_stack).astype(jnp.int32)
    stack, k = w.shape[:n_stack], w.shape[-2]
    b = w.reshape(*stack, k // m, m, c // m, m)
    cols, rows = jnp.sum(b, axis=-3), jnp.sum(b, axis=-1)
    ok = (lambda x: x == n) if m <= 4 else (lambda x: x <= n)
    return jnp.all(ok(cols), axis=(-3, -2, -1)) & jnp.all(ok(rows), axis=(-3, -2, -1))


def safe_stored_mask(cfg, mask, kernel, c: int, fresh, n_stack: int = 0):
    """The stored ``mask`` (bool ``(*stack, *kshape)``) where it is a transposable N:M mask
    (:func:`transposable_ok`), else ``fresh()`` (the kernel's current mask, of the same shape):
    the defined fallback for a stored mask that cannot be checked (traced). ``fresh`` runs only
    when some stacked mask is invalid (``lax.cond``)."""
    ok = transposable_ok(mask, c, cfg.n, cfg.m, cfg.k_order, n_stack)
    bcast = ok.reshape(ok.shape + (1,) * (mask.ndim - n_stack))
    if not isinstance(ok, jax.core.Tracer):  # concrete (eager): decide in Python
        return mask if bool(jnp.all(ok)) else jnp.where(bcast, mask, fresh())
    return lax.cond(jnp.all(ok), lambda: mask, lambda: jnp.where(bcast, mask, fresh()))


def record_masks(cfg, method: str, kernel, record):
    """``(fwd, bwd)`` bool masks of ``kernel.shape`` (``(*stack, *kshape)``) that a (possibly
    stacked) sparse layer's products use: its stored ``mask`` twice when it keeps one
    (:func:`stores_mask`; an invalid one replaced by the kernel's, :func:`safe_stored_mask`),
    else :func:`stacked_masks` of the kernel with the record's ``perm``."""
    perm = record["perm"]

    def fresh():
        return stacked_masks(kernel, perm, cfg.n, cfg.m, method, cfg.k_order)

    if "mask" not in record:
        return fresh()
    t = safe_stored_mask(cfg, record["mask"], kernel, perm.shape[-1], lambda: fresh()[0],
                         perm.ndim - 1)
    return t, t


def record_needed(cfg, method: str) -> bool:
    """Whether a layer's products read its record (else a linen apply may run without one)."""
    return (method in ("bimask", "sste") or cfg.backend != "xla" or cfg.wgrad != "dense"
            or cfg.track_flips or stores_mask(cfg, method))


def check_record(path: str, record: dict, cfg, method: str, kernel_shape, stack, c: int) -> None:
    """Raises ValueError (naming the layer and the rule) unless ``record`` fits the layer: every
    field of :func:`new_record` present with its shape and dtype kind (static, so also under jit),
    and, where its value is concrete, ``perm`` a permutation of ``range(C)`` along its last axis."""
    k = math.prod(kernel_shape[len(stack):]) // max(c, 1)
    shape = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    for name, want in jax.eval_shape(
            lambda w: new_record(cfg, method, tuple(stack), c, kernel=w), shape).items():
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
    mask = record.get("mask")
    if stores_mask(cfg, method) and not isinstance(mask, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # concrete, also inside a trace (a closed-over state)
            ok = np.asarray(transposable_ok(jnp.asarray(mask), c, cfg.n, cfg.m, cfg.k_order,
                                            len(stack))).reshape(-1)
        if not ok.all():
            rule = "exactly" if cfg.m <= 4 else "at most"
            raise ValueError(
                f"layer {path!r}: Bi-Mask state 'mask' must be a transposable {cfg.n}:{cfg.m} "
                f"mask ({rule} {cfg.n} kept entries in every row and every column of every "
                f"{cfg.m}x{cfg.m} block of the ({k}, {c}) layer matrix); stacked layer "
                f"{int(np.flatnonzero(~ok)[0])} is not"
            )


def safe_perm(perm):
    """``perm`` (int ``(..., C)``) where each row is a permutation of ``range(C)``, else the
    identity: the defined fallback for invalid incumbents that cannot be checked (traced)."""
    c = perm.shape[-1]
    ident = jnp.arange(c, dtype=perm.dtype)
    ok = jnp.all(jnp.sort(perm, axis=-1) == ident, axis=-1, keepdims=True)
    return jnp.where(ok, perm, ident)


def default_masks(cfg, kernel, c: int, method: str, perm):
    """The ``(fwd, bwd)`` masks a sparse product uses unless given its own ``masks`` hook:
    :func:`kernel_masks` of ``kernel`` (no stack axes) with ``cfg``'s N:M and ``k_order``;
    ``perm`` (int ``(C,)``) is used by ``"bimask"`` only."""
    return kernel_masks(kernel, c, cfg.n, cfg.m, method, perm if method == "bimask" else None,
                        cfg.k_order)


def sparse_dot_general(cfg, resolve, lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None, *, masks=None, **kwargs):
    """Drop-in ``lax.dot_general`` of a Dense/DenseGeneral/Linear/LinearGeneral layer.

    ``resolve(kernel_shape, in_channels, C, reason) -> (method, record)`` is the front end's hook:
    it applies the selection rule (``reason``: why the product cannot be sparse, or ``""``) and
    returns the layer's method (``"dense"``: the plain product) and record (:func:`new_record`,
    unstacked; None when absent and not :func:`record_needed`). ``cfg.dense_products``: the plain
    product of every layer (the record was still resolved, so checked).
    ``masks(kernel, C, method, perm) -> (fwd, bwd)`` (keyword only; default
    :func:`default_masks` with ``cfg``) computes the bool masks of ``kernel.shape`` from the
    method and the record's ``perm``: the hook for a front end that computes them elsewhere (e.g.
    under ``shard_map`` where a sharded kernel lives); it must return what :func:`default_masks`
    would.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    n_in = len(rc)
    c = math.prod(rhs.shape[n_in:])
    bad = lb or rb or tuple(rc) != tuple(range(n_in))
    reason = f"unsupported dot_general dimension numbers {dimension_numbers}" if bad else ""
    method, record = resolve(rhs.shape, rhs.shape[n_in - 1], c, reason)
    if method == "dense" or cfg.dense_products:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    rhs, fwd, bwd, decay, perm, extra = _operands(cfg, method, rhs, c, record, masks)
    y = dense_general_product(lhs, rhs, lc, fwd, bwd, decay, precision=precision,
                              perm=perm if cfg.backend != "xla" else None, backend=cfg.backend,
                              **extra)
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def sparse_conv_general(cfg, resolve, lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        precision=None, preferred_element_type=None, *, masks=None, **kwargs):
    """Drop-in ``lax.conv_general_dilated`` of a Conv layer; ``resolve`` and ``masks`` as in
    :func:`sparse_dot_general` (only channels-last, ungrouped convs can be sparse)."""
    ok = feature_group_count == 1 and is_channels_last(dimension_numbers, lhs.ndim)
    reason = "" if ok else "unsupported conv configuration"
    method, record = resolve(rhs.shape, rhs.shape[-2], rhs.shape[-1], reason)
    if method == "dense" or cfg.dense_products:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs,
        )
    rhs, fwd, bwd, decay, perm, extra = _operands(cfg, method, rhs, rhs.shape[-1], record, masks)
    y = sparse_conv(
        lhs, rhs, fwd, bwd, decay, strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation if lhs_dilation is not None else 1,
        rhs_dilation=rhs_dilation if rhs_dilation is not None else (1,) * (lhs.ndim - 2),
        perm=perm if cfg.backend != "xla" else None, precision=precision,
        backend=cfg.backend, **extra,
    )
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def _operands(cfg, method: str, kernel, c: int, record, masks=None):
    """``(kernel, fwd, bwd, decay, perm, extra)`` of a sparse product: the kernel it multiplies
    (``"sste"``: ``sste_scale * S(kernel)``, straight-through), its masks (the record's stored
    ``mask`` twice when :func:`stores_mask`, :func:`safe_stored_mask`; else the ``masks`` hook,
    default :func:`default_masks`), SR-STE decay (0 for ``"sste"``), permutation, and ``extra`` keyword
    arguments of the op (the MVUE ``wgrad``)."""
    perm = None if record is None else record["perm"]
    masks = masks or functools.partial(default_masks, cfg)
    if record is not None and stores_mask(cfg, method):
        fwd = bwd = safe_stored_mask(cfg, record["mask"], kernel, c,
                                     lambda: masks(kernel, c, method, perm)[0])
    else:
        fwd, bwd = masks(kernel, c, method, perm)
    decay = cfg.decay
    if method == "sste":
        kernel = sste_kernel(kernel, record["sste_scale"], c, cfg.n, cfg.m, cfg.k_order)
        decay = 0.0
    extra = {}
    if cfg.wgrad == "mvue":
        extra = dict(wgrad="mvue", key=record["wgrad_key"], wgrad_nm=(cfg.n, cfg.m))
    return kernel, fwd, bwd, decay, perm, extra


def _soft_threshold_matrix(w2, n: int, m: int, k_order: str, fn):
    """``fn(groups, axis)`` on the S-STE groups of a ``(..., K, C)`` layer matrix: ``"hwi"``: ``m``
    consecutive rows (axis -2, as :func:`bimask_jax.masks.forward_mask`); ``"ihw"``: ``m``
    consecutive entries of each column's flattened ``(C, K)`` (the reference's forward groups)."""
    if k_order == "hwi":
        return fn(w2, w2.ndim - 2)
    t = jnp.swapaxes(w2, -1, -2)
    out = fn(t.reshape(*t.shape[:-2], -1, m), t.ndim - 1)
    return jnp.swapaxes(out.reshape(t.shape), -1, -2)


def sste_kernel(kernel, scale, c: int, n: int, m: int, k_order: str = "hwi"):
    """S-STE's weight ``scale * S(kernel)`` of an unstacked layer kernel ``(*in_axes, *out_axes)``
    with ``c`` outputs (groups as :func:`_soft_threshold_matrix`), straight-through in ``kernel``
    (:func:`bimask_jax.sste.sste_weight`); ``scale`` float32 scalar. Same shape and dtype."""
    w2 = layer_matrix(kernel, c, k_order)
    out = _soft_threshold_matrix(
        w2, n, m, k_order, lambda g, axis: sste_weight(g, scale, n, m, axis=axis))
    return from_layer_matrix(out, kernel.shape, c, k_order)


def stacked_sste_scales(kernel, c: int, n: int, m: int, k_order: str = "hwi", n_stack: int = 0):
    """float32 ``stack``: :func:`bimask_jax.sste.sste_scale` of each stacked layer's matrix."""
    w2 = layer_matrix(kernel, c, k_order, n_stack)

    def one(w):
        s = _soft_threshold_matrix(w, n, m, k_order,
                                   lambda g, axis: soft_threshold(g, n, m, axis=axis))
        w, s = w.astype(jnp.float32).ravel(), s.astype(jnp.float32).ravel()
        den = jnp.vdot(s, s)
        return jnp.where(den > 0, jnp.vdot(w, s) / jnp.where(den > 0, den, 1.0), 1.0)

    fn = one
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn(w2).astype(jnp.float32)


def _reads_ihw(inner, c: int, k_order: str) -> bool:
    # "ihw" moves Cin in front of the window axes of a kernel (*window, Cin, C) with >= 1 window
    # axis; a Dense kernel (K, C), or one with several output axes, is the same in both orders.
    return k_order == "ihw" and len(inner) > 2 and inner[-1] == c


def layer_matrix(kernel, c: int, k_order: str = "hwi", n_stack: int = 0):
    """The ``(*stack, K, C)`` matrix of a kernel ``(*stack, *in_axes, *out_axes)`` whose output
    axes hold ``c`` entries, rows in ``k_order`` (the module docstring); ``n_stack`` leading axes
    are stack axes. :func:`from_layer_matrix` is its inverse."""
    stack = kernel.shape[:n_stack]
    if _reads_ihw(kernel.shape[n_stack:], c, k_order):
        kernel = jnp.moveaxis(kernel, -2, n_stack)
    return kernel.reshape(*stack, -1, c)


def from_layer_matrix(mat, shape, c: int, k_order: str = "hwi", n_stack: int = 0):
    """The array of kernel shape ``shape`` whose :func:`layer_matrix` is ``mat``."""
    inner = tuple(shape[n_stack:])
    if _reads_ihw(inner, c, k_order):
        moved = (*shape[:n_stack], inner[-2], *inner[:-2], inner[-1])
        return jnp.moveaxis(mat.reshape(moved), n_stack, -2)
    return mat.reshape(shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 6))
def kernel_masks(kernel, out_size: int, n: int, m: int, method: str, perm=None,
                 k_order: str = "hwi"):
    """``(fwd, bwd)`` bool masks of ``kernel.shape`` from its :func:`layer_matrix` ``(K, out_size)``.

    ``kernel``: floating ``(*in_axes, *out_axes)`` with ``prod(out_axes) == out_size`` and no stack
    axes; ``perm``: int ``(out_size,)`` or None (identity); ``k_order``: ``"hwi"`` or ``"ihw"``
    (``layer_masks``' groups on the matrix). Jitted (one compile per shape when called eagerly,
    e.g. in ``model.init``; inlined under an outer ``jit``).
    """
    w2 = layer_matrix(kernel, out_size, k_order)
    # No checkify report: its effect would send every train step through Python dispatch; the
    # layers' permutations come from the searches or from checked state (safe fallback kept).
    fwd, bwd = layer_masks(w2, n, m, method, perm, k_order=k_order, checkify_perm=False)
    return tuple(from_layer_matrix(x, kernel.shape, out_size, k_order) for x in (fwd, bwd))


def stacked_masks(kernel, perm, n: int, m: int, method: str, k_order: str = "hwi"):
    """:func:`kernel_masks` over stacked layers: ``kernel (*stack, *kshape)``, ``perm (*stack, C)``.

    Returns ``(fwd, bwd)`` of ``kernel.shape`` (vmapped over the stack axes).
    """
    c = perm.shape[-1]

    def one(k, p):
        return kernel_masks(k, c, n, m, method, p, k_order)

    fn = one
    for _ in range(perm.ndim - 1):
        fn = jax.vmap(fn)
    return fn(kernel, perm)


def dense_general_product(
    x, kernel, lhs_contract, fwd, bwd, decay, *, perm=None, precision=None, backend="xla",
    **wgrad
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
        perm=perm, precision=precision, backend=backend, **wgrad,
    )
    return y.reshape(*free, *kernel.shape[n_in:])


def is_channels_last(dn, ndim: int) -> bool:
    """Whether conv dimension numbers are Flax's channels-last ones (NHWC, HWIO, NHWC)."""
    sp = tuple(range(1, ndim - 1))
    want = ((0, ndim - 1, *sp), (ndim - 1, ndim - 2, *range(ndim - 2)), (0, ndim - 1, *sp))
    return isinstance(dn, lax.ConvDimensionNumbers) and tuple(map(tuple, dn)) == want


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8, 9, 10))
def search_stacked(keys, kernels, perms, n: int, m: int, num_candidates: int, chunk_size=None,
                   search: str = "random", iterations: int = 64, k_order: str = "hwi",
                   keep_incumbent: bool = True):
    """``search_permutation`` vmapped over ``S`` same-shape layers.

    Args:
      keys: ``(S,)`` PRNG keys; kernels: floating ``(S, K, C)`` matrices (rows in ``k_order``);
      perms: int32 ``(S, C)`` incumbents.
      chunk_size: candidates per chunk; None: ``permutation.default_chunk_size`` for the ``S``
        searches at once.
      search, iterations: ``search_permutation``'s ``method`` and (local searches) ``iterations``.
      keep_incumbent: ``search_permutation``'s refresh policy (``"random"``).

    Returns:
      int32 ``(S, C)``.
    """
    s, k, c = kernels.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(k, c, num_candidates, stack=s)

    def one(kk, w, p):
        if num_candidates == 0:  # the no-permutation ablation, whatever the search method
            return p
        if search != "random":
            return search_permutation(kk, w, n, m, init=p, method=search, iterations=iterations,
                                      k_order=k_order, checkify_perm=False)
        return search_permutation(kk, w, n, m, num_candidates, init=p, chunk_size=chunk_size,
                                  k_order=k_order, keep_incumbent=keep_incumbent,
                                  checkify_perm=False)

    return jax.vmap(one)(keys, kernels, perms).astype(jnp.int32)


def refresh_layers(key, layers, n: int, m: int, num_candidates: int, chunk_size=None,
                   iterations: int = 64, k_order: str = "hwi", keep_incumbent: bool = True):
    """One refresh of several (possibly stacked) layers: ``search_permutation`` on every kernel
    with its current permutation as incumbent. Layers whose matrices have the same ``(K, C)`` and
    search method are searched together in one vmapped call (one compile per distinct shape).

    Args:
      key: PRNG key. Layer ``i`` uses ``fold_in(key, i)``; a stacked layer splits that key over
        its stack (``(*stack)`` row-major).
      layers: sequence of ``(kernel (*stack, *kshape), perm (*stack, C), search)``, ``search`` the
        layer's ``search_permutation`` method.
      k_order: how kernels are read as matrices (:func:`layer_matrix`).
      keep_incumbent: the ``"random"`` search's refresh policy (``search_permutation``).

    Returns:
      list of new permutations, int32, shaped like the ``perm`` inputs.
    """
    flat = []  # per layer: (keys (S,), matrices (S, K, C), perms (S, C), search)
    for i, (kernel, perm, search) in enumerate(layers):
        c = perm.shape[-1]
        stack = perm.shape[:-1]
        size = math.prod(stack)
        lk = jax.random.fold_in(key, i)
        keys = jax.random.split(lk, size) if stack else lk[None]
        w = layer_matrix(kernel, c, k_order, len(stack)).reshape(size, -1, c)
        flat.append((keys, w, perm.reshape(size, c), search))
    groups: dict[tuple, list[int]] = {}
    for i, (_, w, _, search) in enumerate(flat):
        groups.setdefault((w.shape[1:], w.dtype, search), []).append(i)
    out: list = [None] * len(flat)
    for (_, _, search), idx in groups.items():
        keys = jnp.concatenate([flat[i][0] for i in idx])
        ws = jnp.concatenate([flat[i][1] for i in idx])
        ps = jnp.concatenate([flat[i][2] for i in idx])
        new = search_stacked(keys, ws, ps, n, m, num_candidates, chunk_size, search, iterations,
                             k_order, keep_incumbent)
        start = 0
        for i in idx:
            size = flat[i][2].shape[0]
            out[i] = new[start:start + size].reshape(layers[i][1].shape)
            start += size
    return out
