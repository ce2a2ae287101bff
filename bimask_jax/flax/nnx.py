"""Bi-Mask for nnx models: :func:`sparsify` replaces, in place, the ``dot_general`` of selected
``nnx.Linear``/``nnx.LinearGeneral`` layers and the ``conv_general_dilated`` of selected ``nnx.Conv``
layers with small nnx modules (:class:`SparseDotGeneral`, :class:`SparseConvGeneral`) that run the
sparse products and hold the layer's state in :class:`BimaskState` variables (``perm``,
``refreshes``). Parameters keep their paths; the state appears at ``<layer>/<op attr>/perm``.
Optimizers must update ``nnx.Param`` only (``nnx.Optimizer(model, tx, wrt=nnx.Param)``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jax import lax

from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import dense_general_product, is_channels_last, kernel_masks
from bimask_jax.flax.selection import Decision, name_skip_reason, shape_decision
from bimask_jax.ops import BACKENDS as _CONV_BACKENDS
from bimask_jax.ops import sparse_conv

SKIP_ATTR = "bimask_skipped"  # static str attribute set on candidate layers that stay dense


class BimaskState(nnx.Variable):
    """Bi-Mask state of a sparse layer (never a ``nnx.Param``): int32 permutation / counter."""


class _SparseOp(nnx.Module):
    """Common state of the op modules: static ``config``, ``method``, ``note``, ``kind``; per layer
    ``perm`` (int32 ``(*stack, C)``) and ``refreshes`` (int32 ``stack``) as :class:`BimaskState`."""

    def __init__(self, config: SparseConfig, kind: str, method: str, note: str, c: int,
                 stack: tuple[int, ...]):
        self.config = config
        self.kind = kind
        self.method = method
        self.note = note
        self.perm = BimaskState(jnp.tile(jnp.arange(c, dtype=jnp.int32), (*stack, 1)))
        self.refreshes = BimaskState(jnp.zeros(stack, jnp.int32))

    def _masks(self, kernel, c: int):
        perm = self.perm[...]
        p = perm if self.method == "bimask" else None
        fwd, bwd = kernel_masks(kernel, c, self.config.n, self.config.m, self.method, p)
        return fwd, bwd, (perm if self.config.backend != "xla" else None)


class SparseDotGeneral(_SparseOp):
    """Drop-in ``dot_general`` of a Linear/LinearGeneral layer (no batch axes)."""

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        (lc, rc), _ = dimension_numbers
        n_in = len(rc)
        if self.method == "dense":
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
        fwd, bwd, perm = self._masks(rhs, math.prod(rhs.shape[n_in:]))
        y = dense_general_product(lhs, rhs, lc, fwd, bwd, self.config.decay, perm=perm,
                                  precision=precision, backend=self.config.backend)
        return y if preferred_element_type is None else y.astype(preferred_element_type)


class SparseConvGeneral(_SparseOp):
    """Drop-in ``conv_general_dilated`` of a Conv layer (``feature_group_count == 1``)."""

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 preferred_element_type=None, out_sharding=None):
        if self.method == "dense":
            return lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, precision=precision,
                preferred_element_type=preferred_element_type, out_sharding=out_sharding,
            )
        if feature_group_count != 1 or not is_channels_last(dimension_numbers, lhs.ndim):
            raise ValueError("SparseConvGeneral needs channels-last dimension numbers and no groups")
        fwd, bwd, perm = self._masks(rhs, rhs.shape[-1])
        nsp = lhs.ndim - 2
        y = sparse_conv(
            lhs, rhs, fwd, bwd, self.config.decay, strides=window_strides, padding=padding,
            lhs_dilation=lhs_dilation if lhs_dilation is not None else 1,
            rhs_dilation=rhs_dilation if rhs_dilation is not None else (1,) * nsp,
            perm=perm, precision=precision,
            backend=self.config.backend if self.config.backend in _CONV_BACKENDS else "xla",
        )
        return y if preferred_element_type is None else y.astype(preferred_element_type)


_OP_ATTR = {nnx.Linear: "dot_general", nnx.LinearGeneral: "dot_general",
            nnx.Conv: "conv_general_dilated"}


def _layer_kind(node):
    for t in (nnx.LinearGeneral, nnx.Linear, nnx.Conv):
        if isinstance(node, t):
            return t
    return None


def _geometry(layer, kind):
    """``(in_channels, C, kernel_ndim_without_stack, structural skip reason)`` of an nnx layer."""
    if kind is nnx.Linear:
        custom = layer.dot_general is not lax.dot_general
        return layer.in_features, layer.out_features, 2, "custom dot_general" if custom else ""
    if kind is nnx.LinearGeneral:
        reason = ""
        if layer.dot_general is not None or layer.dot_general_cls is not None:
            reason = "custom dot_general"
        elif layer.batch_axis:
            reason = f"LinearGeneral with batch_axis={dict(layer.batch_axis)}"
        ndim = len(layer.in_features) + len(layer.out_features) + len(layer.batch_axis)
        return layer.in_features[-1], math.prod(layer.out_features), ndim, reason
    reason = ""
    if layer.conv_general_dilated is not lax.conv_general_dilated:
        reason = "custom conv_general_dilated"
    elif layer.feature_group_count != 1:
        reason = f"grouped/depthwise conv (feature_group_count={layer.feature_group_count})"
    cin = layer.in_features // layer.feature_group_count
    return cin, layer.out_features, len(layer.kernel_size) + 2, reason


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def sparsify(model: nnx.Module, config: SparseConfig) -> nnx.Module:
    """Makes the selected layers of ``model`` sparse, in place; returns ``model``.

    Raises ValueError if ``model`` was already made sparse.
    """
    layers = [(p, node) for p, node in nnx.iter_graph(model) if _layer_kind(node) is not None]
    for path, layer in layers:
        kind = _layer_kind(layer)
        attr = _OP_ATTR[kind]
        if isinstance(getattr(layer, attr, None), _SparseOp) or hasattr(layer, SKIP_ATTR):
            raise ValueError(f"layer {path_str(path)!r} is already handled by bimask_jax.sparse")
    for path, layer in layers:
        kind = _layer_kind(layer)
        ps = path_str(path)
        cin, c, ndim, reason = _geometry(layer, kind)
        reason = name_skip_reason(config, ps, layer) or reason
        dec = Decision(False, "", reason) if reason else shape_decision(config, cin, c)
        if not dec.sparse:
            setattr(layer, SKIP_ATTR, dec.reason)
            continue
        kshape = layer.kernel.shape
        stack = tuple(kshape[: len(kshape) - ndim])
        op_cls = SparseConvGeneral if kind is nnx.Conv else SparseDotGeneral
        op = op_cls(config, kind.__name__, dec.method, dec.reason, c, stack)
        setattr(layer, _OP_ATTR[kind], nnx.data(op))
    return model


def sparse_ops(model: nnx.Module) -> list[tuple[tuple, nnx.Module, _SparseOp]]:
    """``(layer path, layer, op)`` of every sparse layer, sorted by path."""
    out = []
    for path, node in nnx.iter_graph(model):
        kind = _layer_kind(node)
        if kind is None:
            continue
        op = getattr(node, _OP_ATTR[kind], None)
        if isinstance(op, _SparseOp):
            out.append((tuple(path), node, op))
    return sorted(out, key=lambda t: tuple(map(str, t[0])))


def candidate_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module, _SparseOp | None]]:
    """Every Linear/LinearGeneral/Conv in graph order: ``(path, layer, op or None)``."""
    out = []
    for path, node in nnx.iter_graph(model):
        kind = _layer_kind(node)
        if kind is not None:
            op = getattr(node, _OP_ATTR[kind], None)
            out.append((tuple(path), node, op if isinstance(op, _SparseOp) else None))
    return out


def model_config(model: nnx.Module) -> SparseConfig | None:
    """The :class:`SparseConfig` stored on the sparse layers of ``model`` (None if there are none)."""
    ops = sparse_ops(model)
    return ops[0][2].config if ops else None
