"""Bi-Mask for unmodified Flax models (linen and nnx): :func:`sparse`, :func:`refresh`,
:func:`refresh_due`, :func:`maybe_refresh`, :func:`layers`, :func:`summary`, :func:`export`.

Modules: ``config`` (options), ``selection`` (which layers, which method), ``layer`` (the per-layer
record, masks, products and search, framework-free), ``linen`` (interception wrapper) and ``nnx``
(in-place op swap, :class:`BimaskState`, :class:`SparseOp` with its overridable ``masks`` and
:func:`sparse_ops` to list a model's ops): the two front ends, each also reading and writing its
state; ``state`` (the one state representation and its refresh), ``summary`` (report and export).
"""

from bimask_jax.flax.api import sparse
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.layer import new_record
from bimask_jax.flax.linen import Sparse
from bimask_jax.flax.nnx import BimaskState, SparseOp, sparse_ops
from bimask_jax.flax.selection import Layer
from bimask_jax.flax.state import (
    flip_state,
    maybe_refresh,
    refresh,
    refresh_due,
    refresh_state,
    reset_sste_scales,
    set_wgrad_key,
    track_flips,
    with_dense_products,
)
from bimask_jax.flax.summary import export, layers, summary

__all__ = [
    "BimaskState",
    "Layer",
    "Sparse",
    "SparseConfig",
    "SparseOp",
    "export",
    "flip_state",
    "layers",
    "maybe_refresh",
    "new_record",
    "refresh",
    "refresh_due",
    "refresh_state",
    "reset_sste_scales",
    "set_wgrad_key",
    "sparse",
    "sparse_ops",
    "summary",
    "track_flips",
    "with_dense_products",
]
