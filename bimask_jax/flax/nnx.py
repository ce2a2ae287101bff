"""Bi-Mask for nnx models: :func:`sparsify` replaces, in place, the ``dot_general`` of selected
``nnx.Linear``/``nnx.LinearGeneral`` layers and the ``conv_general_dilated`` of selected ``nnx.Conv``
layers with a small nnx module (:class:`SparseOp`) that runs the sparse product and holds the
layer's record (:func:`~bimask_jax.flax.layer.new_record`) in :class:`BimaskState` variables at
``<layer>/<op attr>/<field>``; parameters keep their paths. Optimizers must update ``nnx.Param``
only (``nnx.Optimizer(model, tx, wrt=nnx.Param)``). Also reads and writes that state for
:mod:`bimask_jax.flax.state`.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
from jax import lax

from bimask_jax.flax import layer as _layer
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import check_record, sparse_conv_general, sparse_dot_general
from bimask_jax.flax.selection import Layer, decide, name_skip_reason, no_sparse_message

LAYER_ATTR = "bimask_layer"  # static Layer set on every candidate layer by sparsify


class BimaskState(nnx.Variable):
    """Bi-Mask state of a sparse layer (never a ``nnx.Param``): one field of its record."""


class SparseOp(nnx.Module):
    """Drop-in ``dot_general`` (Linear/LinearGeneral, no batch axes) or ``conv_general_dilated``
    (Conv: channels-last, no groups). Static ``config``, ``layer`` (:class:`Layer`), ``conv``; one
    :class:`BimaskState` per record field (``perm`` int32 ``(*stack, C)``, ``refreshes``, ...).

    Subclasses may override :meth:`masks` (where and how the layer's masks are computed); a
    subclass instance put in a layer's op attribute in place of the one :func:`sparsify` made
    (same ``config``, ``layer``, ``conv`` and record) is found by :func:`sparse_ops`, the refresh
    and the summary like the original.
    """

    def __init__(self, config: SparseConfig, layer: Layer, conv: bool, c: int, stack: tuple,
                 kernel=None):
        self.config, self.layer, self.conv = config, layer, conv
        record = _layer.new_record(config, layer.method, stack, c, kernel=kernel)
        self.fields = tuple(record)
        for name, value in record.items():
            setattr(self, name, BimaskState(value))

    def record(self) -> dict:
        return {name: getattr(self, name)[...] for name in self.fields}

    def _resolve(self, kernel_shape, cin, c, reason):
        if reason:
            raise ValueError(f"layer {self.layer.path!r}: {reason}")
        if self.layer.method == "dense":
            return "dense", None
        record = self.record()
        check_record(self.layer.path, record, self.config, self.layer.method, kernel_shape, (), c)
        return self.layer.method, record

    def masks(self, kernel, c: int, method: str, perm):
        """``(fwd, bwd)`` bool masks of ``kernel.shape`` for the product: ``kernel`` the layer's
        kernel (no stack axes) read as a ``(K, c)`` matrix, ``method``/``perm`` (int ``(c,)``) as
        resolved from the record. Default :func:`~bimask_jax.flax.layer.default_masks`; override
        to compute the same masks elsewhere (e.g. per device under ``jax.shard_map``). A layer
        that stores its mask (``mask_update="refresh"``) uses the stored one and calls this only
        for its fallback (a stored mask that is not transposable N:M,
        :func:`~bimask_jax.flax.layer.safe_stored_mask`)."""
        return _layer.default_masks(self.config, kernel, c, method, perm)

    def __call__(self, *args, **kwargs):
        op = sparse_conv_general if self.conv else sparse_dot_general
        return op(self.config, self._resolve, *args, masks=self.masks, **kwargs)


_KINDS = ((nnx.LinearGeneral, "dot_general"), (nnx.Linear, "dot_general"),
          (nnx.Conv, "conv_general_dilated"))


def _op_attr(node) -> str | None:
    return next((attr for t, attr in _KINDS if isinstance(node, t)), None)


def _geometry(layer):
    """``(in_channels, C, kernel ndim without stack axes, structural skip reason)``."""
    if isinstance(layer, nnx.LinearGeneral):
        reason = ""
        if layer.dot_general is not None or layer.dot_general_cls is not None:
            reason = "custom dot_general"
        elif layer.batch_axis:
            reason = f"LinearGeneral with batch_axis={dict(layer.batch_axis)}"
        ndim = len(layer.in_features) + len(layer.out_features) + len(layer.batch_axis)
        return layer.in_features[-1], math.prod(layer.out_features), ndim, reason
    if isinstance(layer, nnx.Linear):
        custom = layer.dot_general is not lax.dot_general
        return layer.in_features, layer.out_features, 2, "custom dot_general" if custom else ""
    reason = ""
    if layer.conv_general_dilated is not lax.conv_general_dilated:
        reason = "custom conv_general_dilated"
    elif layer.feature_group_count != 1:
        reason = f"grouped/depthwise conv (feature_group_count={layer.feature_group_count})"
    cin = layer.in_features // layer.feature_group_count
    return cin, layer.out_features, len(layer.kernel_size) + 2, reason


def sparsify(model: nnx.Module, config: SparseConfig) -> nnx.Module:
    """Makes the selected layers of ``model`` sparse, in place; returns ``model``.

    Raises ValueError if ``model`` was already made sparse, or if no layer can be sparse (listing
    each layer's reason; the model is then left unchanged).
    """
    plan = []
    for path, layer in nnx.iter_graph(model):
        attr = _op_attr(layer)
        if attr is None:
            continue
        ps = "/".join(map(str, path))
        if hasattr(layer, LAYER_ATTR):
            raise ValueError(f"layer {ps!r} is already handled by bimask_jax.sparse")
        cin, c, ndim, reason = _geometry(layer)
        reason = name_skip_reason(config, ps, layer) or reason
        kshape = tuple(layer.kernel.shape)
        info = decide(config, ps, type(layer).__name__, kshape[len(kshape) - ndim:], cin, c,
                      reason)
        plan.append((layer, attr, info, c, kshape[: len(kshape) - ndim]))
    if not any(info.sparse for _, _, info, _, _ in plan):
        raise ValueError(no_sparse_message(config, [p[2] for p in plan]))
    for layer, attr, info, c, stack in plan:
        setattr(layer, LAYER_ATTR, info)
        if info.sparse:
            op = SparseOp(config, info, attr == "conv_general_dilated", c, stack,
                          kernel=layer.kernel[...])
            setattr(layer, attr, nnx.data(op))
    return model


def _candidates(model):
    """``(path tuple, layer, op or None)`` of every layer :func:`sparsify` saw, in graph order."""
    out = []
    for path, node in nnx.iter_graph(model):
        attr = _op_attr(node)
        if attr is not None and hasattr(node, LAYER_ATTR):
            op = getattr(node, attr)
            out.append((tuple(path), node, op if isinstance(op, SparseOp) else None))
    return out


def sparse_ops(model) -> list:
    """``(layer path tuple, layer, op)`` of every sparse layer of an nnx model made sparse by
    :func:`sparsify` (``op``: its :class:`SparseOp`, at ``getattr(layer, op_attr)``), sorted by
    the path's strings (the order in which :func:`~bimask_jax.flax.state.refresh_state` keys the
    layers). Layers left dense are not listed; a model never made sparse gives ``[]``."""
    ops = [(p, layer, op) for p, layer, op in _candidates(model) if op is not None]
    return sorted(ops, key=lambda t: tuple(map(str, t[0])))


# ------------------------------------------------------------ state access (bimask_jax.flax.state)


def _view(model, state):
    """The model itself, or a clone updated with ``state`` (an ``nnx.State``) when given."""
    if state is None:
        return model
    view = nnx.clone(model)
    nnx.update(view, state)
    return view


def config(model) -> SparseConfig | None:
    return next((op.config for _, _, op in _candidates(model) if op is not None), None)


def read(model, state=None):
    """``(records, kernels)`` of the sparse layers, keyed by layer path tuple."""
    ops = [(p, layer, op) for p, layer, op in _candidates(_view(model, state)) if op is not None]
    return ({p: op.record() for p, _, op in ops}, {p: layer.kernel[...] for p, layer, _ in ops})


def write_state(model, state, records: dict):
    """An ``nnx.State`` of every :class:`BimaskState`, with ``records`` applied."""
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(_view(model, state), BimaskState)):
        path = tuple(path)
        rec = records.get(path[:-2], {})
        flat.append((path, var.replace(rec[path[-1]]) if path[-1] in rec else var))
    return nnx.from_flat_state(flat)


def write_kernels(model, state, kernels: dict):
    """An ``nnx.State`` of every variable except :class:`BimaskState`, kernels replaced."""
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(_view(model, state), nnx.Not(BimaskState))):
        path = tuple(path)
        new = kernels.get(path[:-1]) if path[-1] == "kernel" else None
        flat.append((path, var if new is None else var.replace(new)))
    return nnx.from_flat_state(flat)


def layers(model, state=None, sample_args=None, sample_kwargs=None) -> list:
    """Every candidate layer in graph order (kernel shapes as stored now, with stack axes)."""
    del sample_args, sample_kwargs
    return [dataclasses.replace(getattr(layer, LAYER_ATTR), kernel_shape=tuple(layer.kernel.shape))
            for _, layer, _ in _candidates(_view(model, state))]
