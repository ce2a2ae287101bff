"""Bi-Mask for unmodified Flax models (linen and nnx): :func:`sparse`, :func:`refresh`,
:func:`refresh_due`, :func:`maybe_refresh`, :func:`summary`, :func:`export`.

Modules: ``config`` (options), ``selection`` (which layers, which method), ``layer`` (per-layer
masks, products and refresh, framework-free), ``linen`` (interception wrapper), ``nnx`` (in-place
op swap and :class:`BimaskState`), ``state`` (refresh schedule), ``summary`` (report and export).
"""

from bimask_jax.flax.api import sparse
from bimask_jax.flax.config import SparseConfig
from bimask_jax.flax.linen import Sparse
from bimask_jax.flax.nnx import BimaskState
from bimask_jax.flax.state import maybe_refresh, refresh, refresh_due
from bimask_jax.flax.summary import export, summary

__all__ = [
    "BimaskState",
    "Sparse",
    "SparseConfig",
    "export",
    "maybe_refresh",
    "refresh",
    "refresh_due",
    "sparse",
    "summary",
]
