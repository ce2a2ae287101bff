"""bimask-jax: Bi-Mask N:M sparse training (Zhang et al., ICML 2023) for JAX and Flax.

The functional core (pure functions of arrays; ``jit``/``vmap``/``grad`` friendly):

* masks: :func:`nm_mask`, :func:`forward_mask`, :func:`backward_mask`, :func:`transposable_mask`,
  :func:`layer_masks`.
* permutations: :func:`permutation_score`, :func:`search_permutation`, :func:`retained_upper_bound`,
  :func:`search_efficacy`.
* products with Bi-Mask's gradients: :func:`sparse_dense`, :func:`sparse_conv`.
* block-diagonal permutations (tensor-parallel layers whose columns are split across devices):
  :func:`search_blocked_permutation`, :func:`block_keys`, :func:`is_block_diagonal`.

Around it, for Flax models (linen and nnx): :func:`sparse` wraps an unmodified model;
:func:`refresh` / :func:`maybe_refresh` / :func:`refresh_due` update the per-layer permutations;
:func:`layers` says which layers are sparse and why; :func:`summary` reports per-layer
sparsity; :func:`export` gives plain inference weights.

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
from bimask_jax.flax import (
    BimaskState,
    export,
    layers,
    maybe_refresh,
    refresh,
    refresh_due,
    sparse,
    summary,
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
from bimask_jax.ops import sparse_conv, sparse_dense
from bimask_jax.permutation import (
    permutation_score,
    retained_upper_bound,
    search_efficacy,
    search_permutation,
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
]
