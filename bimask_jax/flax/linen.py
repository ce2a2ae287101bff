"""Bi-Mask for unmodified linen models: a wrapper module that intercepts Dense, DenseGeneral and
Conv calls (``nn.intercept_methods``) and swaps their ``dot_general``/``conv_general_dilated`` for
the sparse products, so every other detail of the layer (padding modes, dtype promotion, bias,
batch flattening, ``mask``) stays Flax's own code.

State: collection ``"bimask"``, per sparse layer at the layer's own path, the fields of
:func:`~bimask_jax.flax.layer.new_record`. The wrapper shares its scope with the wrapped model
(``nn.share_scope``), so ``params`` (and every other collection) has exactly the unwrapped model's
tree. This module also reads and writes that state for :mod:`bimask_jax.flax.state`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
from flax.core import meta

from bimask_jax.flax import layer as _layer
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import check_record, sparse_conv_general, sparse_dot_general
from bimask_jax.flax.selection import Layer, decide, name_skip_reason, no_sparse_message

COLLECTION = "bimask"
_DOT_TYPES = (nn.Dense, nn.DenseGeneral)
_CONV_TYPES = (nn.Conv,)


class Sparse(nn.Module):
    """A linen model whose selected Dense/DenseGeneral/Conv layers train with N:M masks.

    Built by :func:`bimask_jax.sparse`; call it exactly like the wrapped model (``__call__`` is
    forwarded with all arguments). ``init`` adds the ``"bimask"`` collection (and raises a
    ValueError listing every layer's reason when no layer can be sparse); ``apply`` needs it (it
    need not be mutable: masks are recomputed from the kernels at every call, or read from it
    under ``mask_update="refresh"``, and only the refresh changes it).
    """

    module: nn.Module
    config: SparseConfig

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        return self.traced(None, *args, **kwargs)

    def traced(self, seen: dict | None, *args, **kwargs):
        """``__call__`` that records every candidate layer's :class:`Layer` in ``seen`` (by path,
        in call order) instead of raising at init when none is sparse."""
        out = {} if seen is None else seen
        with nn.intercept_methods(functools.partial(_intercept, self.config, out)):
            y = self.module(*args, **kwargs)
        if seen is None and self.is_initializing() and not any(x.sparse for x in out.values()):
            raise ValueError(no_sparse_message(self.config, list(out.values())))
        return y


def _path(mod) -> str:
    return "/".join(str(p) for p in mod.path)


def _structure_skip_reason(mod) -> str:
    """Rule 2 of :mod:`bimask_jax.flax.selection` for a linen layer."""
    if isinstance(mod, _CONV_TYPES):
        if mod.conv_general_dilated is not None or mod.conv_general_dilated_cls is not None:
            return "custom conv_general_dilated"
        if mod.feature_group_count != 1:
            return f"grouped/depthwise conv (feature_group_count={mod.feature_group_count})"
        return ""
    if mod.dot_general is not None or mod.dot_general_cls is not None:
        return "custom dot_general"
    if isinstance(mod, nn.DenseGeneral) and mod.batch_dims:
        return f"DenseGeneral with batch_dims={mod.batch_dims}"
    return ""


def _intercept(cfg: SparseConfig, seen: dict, next_fun, args, kwargs, ctx):
    mod = ctx.module
    if ctx.method_name != "__call__" or not isinstance(mod, _DOT_TYPES + _CONV_TYPES):
        return next_fun(*args, **kwargs)
    path, kind = _path(mod), type(mod).__name__
    reason = name_skip_reason(cfg, path, mod) or _structure_skip_reason(mod)
    if reason:
        seen[path] = Layer(path, kind, None, False, "", reason)
        return next_fun(*args, **kwargs)

    def resolve(kernel_shape, cin, c, reason):
        seen[path] = layer = decide(cfg, path, kind, tuple(kernel_shape), cin, c, reason)
        if not layer.sparse:
            return "dense", None
        return layer.method, _record(cfg, mod, layer, c, kernel.get("rhs"))

    kernel = {}  # the op's kernel, for the state created at init (read by resolve)

    conv = isinstance(mod, _CONV_TYPES)
    attr = "conv_general_dilated" if conv else "dot_general"
    product = sparse_conv_general if conv else sparse_dot_general

    def op(lhs, rhs, *a, **k):
        kernel["rhs"] = rhs
        return product(cfg, resolve, lhs, rhs, *a, **k)

    # Modules are frozen dataclasses: swap the op attribute for this call only, then restore it.
    saved = getattr(mod, attr)
    object.__setattr__(mod, attr, op)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(mod, attr, saved)


def _record(cfg: SparseConfig, mod, layer: Layer, c: int, kernel):
    """Creates (at init, from ``kernel``) or reads and checks the layer's record; returns it (None
    when the record is absent and the product does not use it)."""
    path = layer.path
    if mod.is_initializing() and not mod.is_mutable_collection(COLLECTION):
        raise ValueError(
            f"layer {path!r}: the {COLLECTION!r} collection cannot be created here. If this layer "
            f"is inside nn.scan/nn.vmap, add {COLLECTION!r} to its variable_axes, e.g. "
            f"variable_axes={{'params': 0, {COLLECTION!r}: 0}} (or {{True: 0}})"
        )
    if not mod.has_variable(COLLECTION, "perm") and not mod.is_mutable_collection(COLLECTION):
        if not _layer.record_needed(cfg, layer.method):
            return None
        raise ValueError(
            f"layer {path!r} has no Bi-Mask state: pass the {COLLECTION!r} collection returned "
            f"by model.init(...) to model.apply (if inside nn.scan/nn.vmap, add {COLLECTION!r} "
            f"to its variable_axes)"
        )
    init = functools.cache(lambda: _layer.new_record(cfg, layer.method, (), c, kernel=kernel))
    names = jax.eval_shape(lambda w: _layer.new_record(cfg, layer.method, (), c, kernel=w),
                           jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    # A field absent from a given (immutable) state is left out, for check_record to name it.
    record = {k: mod.variable(COLLECTION, k, lambda k=k: init()[k]).value for k in names
              if mod.is_mutable_collection(COLLECTION) or mod.has_variable(COLLECTION, k)}
    check_record(path, record, cfg, layer.method, layer.kernel_shape, (), c)
    return record


# ------------------------------------------------------------ state access (bimask_jax.flax.state)


def config(model: Sparse) -> SparseConfig:
    return model.config


def _is_record(node) -> bool:
    return isinstance(node, dict) and "perm" in node and not isinstance(node["perm"], dict)


def read(model: Sparse, variables):
    """``(records, kernels)`` of the sparse layers: ``{path tuple: record}`` from the ``"bimask"``
    collection and ``{path tuple: kernel}`` (unboxed, with stack axes) from ``params``."""
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be the dict returned by model.init(...) (with 'params' "
                         "and, for a sparse model, 'bimask')")
    records = {}

    def walk(node, path):
        if _is_record(node):
            records[path] = dict(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))

    walk(variables.get(COLLECTION, {}), ())
    params = variables["params"]
    kernels = {}
    for path in records:
        node = params
        for k in path:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or "kernel" not in node:
            raise ValueError(f"layer {'/'.join(path)!r} has Bi-Mask state but variables['params'] "
                             "has no kernel there: the state is from another model")
        kernels[path] = meta.unbox(node["kernel"])
    return records, kernels


def write_state(model: Sparse, variables, records: dict) -> dict:
    """The new ``"bimask"`` collection holding ``records``."""

    def rebuild(node, path):
        if _is_record(node):
            return {**node, **records.get(path, {})}
        return {k: rebuild(v, (*path, k)) for k, v in node.items()}

    return rebuild(variables[COLLECTION], ())


def write_kernels(model: Sparse, variables, kernels: dict) -> dict:
    """Variables without ``"bimask"`` whose ``params`` kernels at ``kernels[path]`` are replaced
    (boxed kernels keep their metadata)."""

    def rebuild(node, path):
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            new = kernels.get(path) if k == "kernel" else None
            if new is None:
                out[k] = rebuild(v, (*path, k))
            else:
                out[k] = v.replace_boxed(new) if isinstance(v, meta.AxisMetadata) else new
        return out

    res = {k: v for k, v in variables.items() if k != COLLECTION}
    res["params"] = rebuild(variables["params"], ())
    return res


def layers(model: Sparse, variables=None, sample_args=None, sample_kwargs=None) -> list | None:
    """Every candidate layer in call order, from an abstract trace of ``model.init`` on the
    sample inputs (None without them: the selection of a linen model is known only from a trace)."""
    if sample_args is None:
        return None
    seen: dict = {}
    jax.eval_shape(lambda: model.init(jax.random.key(0), seen, *sample_args,
                                      method=Sparse.traced, **(sample_kwargs or {})))
    params = variables.get("params", {}) if isinstance(variables, dict) else {}
    out = []
    for x in seen.values():  # kernel shapes as stored (with the stack axes of scanned layers)
        node = params
        for k in (x.path.split("/") if x.path else []):
            node = node.get(k, {}) if isinstance(node, dict) else {}
        kernel = node.get("kernel") if isinstance(node, dict) else None
        shape = x.kernel_shape if kernel is None else tuple(meta.unbox(kernel).shape)
        out.append(dataclasses.replace(x, kernel_shape=shape))
    return out
