"""``bimask_jax.sparse``: one entry point for linen and nnx models."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx

from bimask_jax.flax import linen as _linen
from bimask_jax.flax import nnx as _nnx
from bimask_jax.flax.config import SparseConfig


def sparse(model, n: int = 2, m: int = 4, method: str = "bimask", *, num_candidates: int = 100,
           refresh_every: int = 100, decay: float = 2e-4, exclude=None, include=None,
           backend: str = "xla", chunk_size: int | None = None, search: str = "auto",
           search_iterations: int = 100, k_order: str = "hwi"):
    """Bi-Mask N:M sparse training for an unmodified Flax model.

    Every Dense/DenseGeneral/Conv (linen) or Linear/LinearGeneral/Conv (nnx) layer selected by the
    rule in :mod:`bimask_jax.flax.selection` runs through ``sparse_dense``/``sparse_conv`` with masks
    recomputed from its current kernel at every call and its stored permutation. Default: every
    such layer whose input-channel axis is divisible by ``m`` and that is not grouped/depthwise;
    layers whose output size is not divisible by ``m`` fall back to ``"srste"``.

    Args:
      model: a linen ``nn.Module`` (a new wrapping module is returned; ``init`` gives the unwrapped
        model's collections plus ``"bimask"``) or an ``nnx.Module`` (modified in place and
        returned; state in :class:`BimaskState` variables).
      n, m: N:M ratio. method: ``"dense"``, ``"srste"``, ``"transposable"`` or ``"bimask"``.
      num_candidates: random permutations per refresh (0: the no-permutation ablation).
      refresh_every: default period of :func:`maybe_refresh`.
      decay: SR-STE coefficient of the kernel gradient.
      exclude, include: regex string(s) searched in the layer path (``"block1/Conv_0"``, nnx:
        ``"layers/0/linear"``) or a predicate ``(path, module) -> bool``. Paper setting for
        ImageNet: ``exclude=("conv_init", "head")`` (the stem conv and the classifier).
      backend: products backend (``"xla"``).
      chunk_size: candidates per vmapped chunk in the permutation search (None: its default).
      search, search_iterations: permutation search of :func:`refresh`: ``"random"`` (the paper's;
        ``num_candidates`` random permutations) or the local searches ``"stripe"``/``"swap"`` of
        ``search_permutation`` (``search_iterations`` iterations from the current permutation).
        Default ``"auto"``: ``"stripe"`` for ``m <= 6`` (measured better and faster than the
        paper's random-100, see BENCHMARKS.md), else ``"random"``. ``num_candidates=0`` disables
        the search whatever ``search`` is (the no-permutation ablation).
      k_order: ``"hwi"`` (default) or ``"ihw"``, how a conv kernel is read as the matrix whose
        groups the masks take; ``"ihw"`` is the reference implementation's (PyTorch's
        ``(Cin, kh, kw)`` flatten, groups may straddle channels, so a 3-channel stem can be sparse).
        See :class:`~bimask_jax.flax.config.SparseConfig`.
    """
    cfg = SparseConfig(n=n, m=m, method=method, num_candidates=num_candidates,
                       refresh_every=refresh_every, decay=decay, exclude=exclude,
                       include=include, backend=backend, chunk_size=chunk_size, search=search,
                       search_iterations=search_iterations, k_order=k_order)
    if isinstance(model, nn.Module):
        return _linen.Sparse(model, cfg)
    if isinstance(model, nnx.Module):
        return _nnx.sparsify(model, cfg)
    raise ValueError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )
