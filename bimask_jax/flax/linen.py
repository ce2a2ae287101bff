"""Bi-Mask for unmodified linen models: a wrapper module that intercepts Dense, DenseGeneral and
Conv calls (``nn.intercept_methods``) and swaps their ``dot_general``/``conv_general_dilated`` for
the sparse products, so every other detail of the layer (padding modes, dtype promotion, bias,
batch flattening, ``mask``) stays Flax's own code.

State: collection ``"bimask"``, per sparse layer at the layer's own path, ``perm`` (int32 ``(C,)``)
and ``refreshes`` (int32 scalar, the number of refreshes applied to it). The wrapper shares its
scope with the wrapped model (``nn.share_scope``), so ``params`` (and every other collection) has
exactly the unwrapped model's tree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta
from jax import lax

from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import dense_general_product, is_channels_last, kernel_masks
from bimask_jax.flax.selection import Decision, name_skip_reason, shape_decision
from bimask_jax.ops import BACKENDS as _CONV_BACKENDS
from bimask_jax.ops import sparse_conv

COLLECTION = "bimask"
_DOT_TYPES = (nn.Dense, nn.DenseGeneral)
_CONV_TYPES = (nn.Conv,)


class LayerRecorder:
    """Per-layer selection decisions seen while tracing the model (``init``/``apply``), keyed by
    layer path, in call order. Shared by the wrapper and its clones (identity hash/eq)."""

    def __init__(self):
        self.layers: dict[str, dict[str, Any]] = {}

    def record(self, path: str, kind: str, kernel_shape, decision: Decision):
        self.layers[path] = dict(
            kind=kind,
            kernel_shape=tuple(int(s) for s in kernel_shape) if kernel_shape is not None else None,
            sparse=decision.sparse,
            method=decision.method,
            reason=decision.reason,
        )


class Sparse(nn.Module):
    """A linen model whose selected Dense/DenseGeneral/Conv layers train with N:M masks.

    Built by :func:`bimask_jax.sparse`; call it exactly like the wrapped model (``__call__`` is
    forwarded with all arguments). ``init`` adds the ``"bimask"`` collection; ``apply`` needs it
    (it need not be mutable: masks are recomputed from the kernels at every call).
    """

    module: nn.Module
    config: SparseConfig
    recorder: LayerRecorder = dataclasses.field(
        default_factory=LayerRecorder, compare=False, hash=False
    )

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        interceptor = functools.partial(_intercept, self.config, self.recorder)
        with nn.intercept_methods(interceptor):
            return self.module(*args, **kwargs)


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


def _intercept(cfg: SparseConfig, rec: LayerRecorder, next_fun, args, kwargs, ctx):
    mod = ctx.module
    if ctx.method_name != "__call__" or not isinstance(mod, _DOT_TYPES + _CONV_TYPES):
        return next_fun(*args, **kwargs)
    path, kind = _path(mod), type(mod).__name__
    reason = name_skip_reason(cfg, path, mod) or _structure_skip_reason(mod)
    if reason:
        rec.record(path, kind, None, Decision(False, "", reason))
        return next_fun(*args, **kwargs)
    if isinstance(mod, _CONV_TYPES):
        attr, op = "conv_general_dilated", functools.partial(_conv_op, cfg, rec, mod, path, kind)
    else:
        attr, op = "dot_general", functools.partial(_dot_op, cfg, rec, mod, path, kind)
    # Modules are frozen dataclasses: swap the op attribute for this call only, then restore it.
    saved = getattr(mod, attr)
    object.__setattr__(mod, attr, op)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(mod, attr, saved)


def _layer_state(mod, path: str, c: int, needed: bool):
    """The layer's permutation (int32 ``(C,)``), created at init; None if absent and not needed."""
    if mod.is_initializing() and not mod.is_mutable_collection(COLLECTION):
        raise ValueError(
            f"layer {path!r}: the {COLLECTION!r} collection cannot be created here. If this layer "
            f"is inside nn.scan/nn.vmap, add {COLLECTION!r} to its variable_axes, e.g. "
            f"variable_axes={{'params': 0, {COLLECTION!r}: 0}} (or {{True: 0}})"
        )
    if not mod.has_variable(COLLECTION, "perm") and not mod.is_mutable_collection(COLLECTION):
        if needed:
            raise ValueError(
                f"layer {path!r} has no Bi-Mask state: pass the {COLLECTION!r} collection returned "
                f"by model.init(...) to model.apply (if inside nn.scan/nn.vmap, add {COLLECTION!r} "
                f"to its variable_axes)"
            )
        return None
    perm = mod.variable(COLLECTION, "perm", lambda: jnp.arange(c, dtype=jnp.int32))
    mod.variable(COLLECTION, "refreshes", lambda: jnp.zeros((), jnp.int32))
    return perm.value


def _masks(cfg: SparseConfig, mod, path: str, kernel, c: int, method: str):
    """Creates/reads the layer state; returns ``(fwd, bwd, perm for the product or None)``."""
    needed = method == "bimask" or cfg.backend != "xla"
    perm = _layer_state(mod, path, c, needed)
    if method == "dense":
        return None, None, None
    fwd, bwd = kernel_masks(kernel, c, cfg.n, cfg.m, method, perm if method == "bimask" else None)
    return fwd, bwd, (perm if cfg.backend != "xla" else None)


def _dot_op(cfg, rec, mod, path, kind, lhs, rhs, dimension_numbers, precision=None,
            preferred_element_type=None, **kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    n_in = len(rc)
    c = math.prod(rhs.shape[n_in:])
    dec = shape_decision(cfg, rhs.shape[n_in - 1], c)
    if lb or rb or tuple(rc) != tuple(range(n_in)):  # not produced by Dense/DenseGeneral w/o batch
        dec = Decision(False, "", f"unsupported dot_general dimension numbers {dimension_numbers}")
    rec.record(path, kind, rhs.shape, dec)
    if dec.sparse:  # creates the state at init for every sparse layer, "dense" method included
        fwd, bwd, perm = _masks(cfg, mod, path, rhs, c, dec.method)
    if not dec.sparse or dec.method == "dense":
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    y = dense_general_product(lhs, rhs, lc, fwd, bwd, cfg.decay, perm=perm, precision=precision,
                              backend=cfg.backend)
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def _conv_op(cfg, rec, mod, path, kind, lhs, rhs, window_strides, padding, lhs_dilation=None,
             rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None,
             preferred_element_type=None, **kwargs):
    c = rhs.shape[-1]
    dec = shape_decision(cfg, rhs.shape[-2], c)
    if feature_group_count != 1 or not is_channels_last(dimension_numbers, lhs.ndim):
        dec = Decision(False, "", "unsupported conv configuration")
    rec.record(path, kind, rhs.shape, dec)
    if dec.sparse:
        fwd, bwd, perm = _masks(cfg, mod, path, rhs, c, dec.method)
    if not dec.sparse or dec.method == "dense":
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs,
        )
    nsp = lhs.ndim - 2
    y = sparse_conv(
        lhs, rhs, fwd, bwd, cfg.decay, strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation if lhs_dilation is not None else 1,
        rhs_dilation=rhs_dilation if rhs_dilation is not None else (1,) * nsp,
        perm=perm, precision=precision,
        backend=cfg.backend if cfg.backend in _CONV_BACKENDS else "xla",
    )
    return y if preferred_element_type is None else y.astype(preferred_element_type)


# ------------------------------------------------------------------ state access for refresh etc.


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def layer_entries(model: Sparse, variables) -> list[dict]:
    """Sparse layers of a linen ``Sparse`` model from its variables, sorted by path.

    Each entry: ``path`` (tuple of names), ``kernel`` (unboxed, ``(*stack, *kshape)``), ``perm``
    (``(*stack, C)``), ``refreshes`` (``stack``).
    """
    if COLLECTION not in variables:
        raise ValueError(
            f"variables have no {COLLECTION!r} collection: pass the full variables returned by "
            f"model.init(...) of the wrapped model"
        )
    out = []

    def walk(node, path):
        if "perm" in node and not isinstance(node["perm"], dict):
            kernel = meta.unbox(_get(variables["params"], path)["kernel"])
            out.append(dict(path=path, kernel=kernel, perm=node["perm"],
                            refreshes=node["refreshes"]))
            return
        for k in sorted(node):
            walk(node[k], (*path, k))

    walk(variables[COLLECTION], ())
    return out


def write_state(variables, updates: dict) -> dict:
    """A new ``"bimask"`` collection with ``updates[path] = (perm, refreshes)`` applied."""

    def rebuild(node, path):
        if "perm" in node and not isinstance(node["perm"], dict):
            perm, refreshes = updates.get(path, (node["perm"], node["refreshes"]))
            return {**node, "perm": perm, "refreshes": refreshes}
        return {k: rebuild(v, (*path, k)) for k, v in node.items()}

    return rebuild(variables[COLLECTION], ())


def export_variables(variables, masked: dict) -> dict:
    """Variables without ``"bimask"`` whose ``params`` kernels at ``masked[path]`` are replaced
    (boxed kernels keep their metadata)."""

    def rebuild(node, path):
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k == "kernel" and path in masked:
                out[k] = v.replace_boxed(masked[path]) if isinstance(v, meta.AxisMetadata) \
                    else masked[path]
            else:
                out[k] = rebuild(v, (*path, k))
        return out

    res = {k: v for k, v in variables.items() if k != COLLECTION}
    res["params"] = rebuild(variables["params"], ())
    return res
