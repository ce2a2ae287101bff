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
           search_iterations: int = 100, k_order: str = "hwi", keep_incumbent: bool = True,
           wgrad: str = "dense", track_flips: bool = False, mask_update: str = "step"):
    """Bi-Mask N:M sparse training for an unmodified Flax model.

    Every Dense/DenseGeneral/Conv (linen) or Linear/LinearGeneral/Conv (nnx) layer selected by the
    rule in :mod:`bimask_jax.flax.selection` runs through ``sparse_dense``/``sparse_conv`` with masks
    recomputed from its current kernel at every call and its stored permutation (except the
    stored transposable masks of ``mask_update="refresh"``). Default: every
    such layer whose input-channel axis is divisible by ``m`` and that is not grouped/depthwise;
    layers whose output size is not divisible by ``m`` fall back to ``"srste"``.

    Args:
      model: a linen ``nn.Module`` (a new wrapping module is returned; ``init`` gives the unwrapped
        model's collections plus ``"bimask"``) or an ``nnx.Module`` (modified in place and
        returned; state in :class:`BimaskState` variables).
      n, m: N:M ratio. method: ``"dense"``, ``"srste"``, ``"transposable"``, ``"bimask"`` or
        ``"sste"`` (S-STE, Hu et al., NeurIPS 2024: each layer multiplies ``scale * S(w)``,
        :mod:`bimask_jax.sste`, with ``scale`` computed from the kernel when the state is created
        -- linen ``init``, nnx ``sparse`` -- and fixed, as in the authors' code; straight-through
        gradient; ``decay`` is not applied. Masks of its products: ``(Mf, Mf)``.)
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
      keep_incumbent: ``True`` (default): a ``"random"`` refresh keeps a layer's permutation unless
        a candidate is strictly better; ``False``: the best fresh candidate, as the reference code.
      wgrad: ``"dense"`` or ``"mvue"`` (any method; ``n <= 2``): the weight gradient of every
        sparse layer from the unbiased N:M (this ``n:m``) estimate of the output gradient along
        the token axis (Chmiel et al., ICLR 2023, as in Hu et al., ICML 2024), so that with
        ``"bimask"`` or ``"transposable"`` all three products of a layer are N:M. Its key is a
        state field: call :func:`~bimask_jax.flax.state.set_wgrad_key` every step.
      track_flips: keep the last forward mask per layer in the state (one bool per kernel entry)
        for the flip rate of :func:`~bimask_jax.flax.state.track_flips` and :func:`summary`.
      mask_update: ``"step"`` (default: a transposable layer's mask is recomputed from its kernel
        at every call) or ``"refresh"`` (``method="transposable"`` only, else ValueError): Hu et
        al.'s periodic update, below.

    Transposable as in Hu et al. (ICML 2024): ``method="transposable"`` is their mask (exact over
    the 90 admissible 4x4 patterns for 2:4; :func:`bimask_jax.transposable.optimal_transposable_mask`
    gives the same mask), and ``decay`` is their masked decay ``decay * (1 - T) * W`` added to the
    kernel gradient (inside the gradient, i.e. before any clipping; they add it after clipping).
    Their periodic mask update is ``mask_update="refresh"``: each transposable layer keeps its
    mask ``T`` in the state (field ``mask``, one bool per kernel entry; initially the mask of the
    initial kernel), uses it for the forward and backward-data products and the masked decay,
    and recomputes it from the current kernel only at :func:`refresh` / :func:`maybe_refresh`
    (:func:`~bimask_jax.flax.state.refresh_state`). In the authors' code
    (thu-ml/2by4-pretrain-acc-examples ``v1/nanoGPT/sparse_ops.py``,
    ``SparseLinearTranspose.forward``, ``freq = 40``) the mask is recomputed in the first forward
    of every optimizer step whose 0-based index is a multiple of 40, step 0 included (their
    initial all-ones mask is never used), from the weights before that step's update, and
    reused (also by the masked decay in ``v1/nanoGPT/train.py``) until the next one: calling
    :func:`maybe_refresh` before the forward of every step with ``refresh_every=40`` (what the
    training scripts do with ``--mask-update refresh --refresh-every 40``) gives that schedule;
    the refresh at step 0 recomputes the initial mask from the same kernel. ``refresh`` also
    runs each Bi-Mask layer's permutation search; a transposable model has none.
    (:func:`bimask_jax.transposable.periodic_mask` is the same rule as a pure function of one
    kernel.) The layers that fall back to ``"srste"`` keep no mask.
    Dense finish: :func:`~bimask_jax.flax.state.with_dense_products` and
    :func:`bimask_jax.dense_finish.is_dense_step`.
    """
    cfg = SparseConfig(n=n, m=m, method=method, num_candidates=num_candidates,
                       refresh_every=refresh_every, decay=decay, exclude=exclude,
                       include=include, backend=backend, chunk_size=chunk_size, search=search,
                       search_iterations=search_iterations, k_order=k_order,
                       keep_incumbent=keep_incumbent, wgrad=wgrad, track_flips=track_flips,
                       mask_update=mask_update)
    if isinstance(model, nn.Module):
        return _linen.Sparse(model, cfg)
    if isinstance(model, nnx.Module):
        return _nnx.sparsify(model, cfg)
    raise ValueError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )
