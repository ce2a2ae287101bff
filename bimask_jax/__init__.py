"""bimask-jax: Bi-Mask N:M sparse training (Zhang et al., ICML 2023) for JAX and Flax.

The functional core (pure functions of arrays; ``jit``/``vmap``/``grad`` friendly):

* masks: :func:`nm_mask`, :func:`forward_mask`, :func:`backward_mask`, :func:`transposable_mask`,
  :func:`layer_masks`.
* permutations: :func:`permutation_score`, :func:`search_permutation`, :func:`retained_upper_bound`,
  :func:`search_efficacy`.
* products with Bi-Mask's gradients: :func:`sparse_dense`, :func:`sparse_conv` (option
  ``wgrad="mvue"``: the weight gradient from :func:`mvue_sparsify`'s unbiased N:M estimate).
* the methods after Bi-Mask: S-STE (:func:`soft_threshold`, :func:`sste_scale`,
  :func:`sste_weight`), MVUE gradients (:func:`mvue_sparsify`, :func:`mvue_weight_grad`), optimal
  transposable masks (:func:`optimal_transposable_mask`, :func:`periodic_mask`,
  :func:`masked_decay`), mask stability (:func:`flip_rate`, :func:`flip_rates`) and the dense
  finish schedule (:func:`dense_finish_start`, :func:`is_dense_step`).
* block-diagonal permutations (tensor-parallel layers whose columns are split across devices):
  :func:`search_blocked_permutation`, :func:`block_keys`, :func:`is_block_diagonal`.

Around it, for Flax models (linen and nnx): :func:`sparse` wraps an unmodified model;
:func:`refresh` / :func:`maybe_refresh` / :func:`refresh_due` update the per-layer permutations;
:func:`layers` says which layers are sparse and why; :func:`summary` reports per-layer
sparsity (and flip rates); :func:`export` gives plain inference weights; per-step state of the
newer methods: :func:`set_wgrad_key` (MVUE keys), :func:`track_flips` (flip rates),
:func:`reset_sste_scales`; :func:`with_dense_products` switches to the dense finish.

Kernel layout is Flax's: the last axis is the output axis C, every other axis is reduction; a conv
kernel ``(*window, Cin, C)`` is read as the matrix ``(prod(window) * Cin, C)``, rows ``Cin``
fastest (``k_order="hwi"``) or, as the authors' PyTorch code reads it, ``(Cin, *window)``
(``k_order="ihw"``; every mask, search and :func:`sparse` takes ``k_order``).
"""

from bimask_jax.blocked_permutation import (
    block_keys,
    is_block_diagonal,
    search_blocked_permutation,
)
from bimask_jax.dense_finish import dense_finish_start, is_dense_step
from bimask_jax.flax import (
    BimaskState,
    export,
    layers,
    maybe_refresh,
    refresh,
    refresh_due,
    reset_sste_scales,
    set_wgrad_key,
    sparse,
    summary,
    track_flips,
    with_dense_products,
)
from bimask_jax.masks import (
    METHODS,
    backward_mask,
    forward_mask,
    inverse_permutation,
    layer_masks,
    nm_mask,
    transposable_mask,
)
from bimask_jax.mvue import mvue_sparsify, mvue_weight_grad
from bimask_jax.ops import sparse_conv, sparse_dense
from bimask_jax.permutation import (
    permutation_score,
    retained_upper_bound,
    search_efficacy,
    search_permutation,
)
from bimask_jax.sste import soft_threshold, sste_prune, sste_scale, sste_weight
from bimask_jax.stability import flip_rate, flip_rates
from bimask_jax.transposable import (
    masked_decay,
    optimal_transposable_mask,
    periodic_mask,
    transposable_patterns,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BimaskState",
    "export",
    "layers",
    "maybe_refresh",
    "refresh",
    "refresh_due",
    "sparse",
    "summary",
    "backward_mask",
    "block_keys",
    "forward_mask",
    "inverse_permutation",
    "is_block_diagonal",
    "layer_masks",
    "nm_mask",
    "permutation_score",
    "retained_upper_bound",
    "search_blocked_permutation",
    "search_efficacy",
    "search_permutation",
    "sparse_conv",
    "sparse_dense",
    "transposable_mask",
    "dense_finish_start",
    "flip_rate",
    "flip_rates",
    "is_dense_step",
    "masked_decay",
    "mvue_sparsify",
    "mvue_weight_grad",
    "optimal_transposable_mask",
    "periodic_mask",
    "reset_sste_scales",
    "set_wgrad_key",
    "soft_threshold",
    "sste_prune",
    "sste_scale",
    "sste_weight",
    "track_flips",
    "transposable_patterns",
    "with_dense_products",
]
