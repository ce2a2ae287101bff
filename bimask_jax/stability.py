"""Mask-stability metrics: the flip rate of Hu et al. (ICML 2024).

The flip rate between consecutive forward masks ``m_{t-1}`` and ``m_t`` of one layer is the
fraction of entries whose keep/drop state changed, ``r_t = ||m_t - m_{t-1}||_1 / D`` over the
layer's ``D`` mask entries (Hu et al. use it as the stability signal of 2:4 training; thu-ml
2by4-pretrain-acc-examples ``README.md`` cites the paper, arXiv:2404.01847v3, whose abstract
introduces the flip rate; its defining equation and number could not be read here, so this
statement is not taken from a numbered equation). The aggregate over layers weights each
layer by its entry count, i.e. it is the fraction of all mask entries that flipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flip_rate(prev, new):
    """Fraction of entries where ``prev != new``.

    Args:
      prev, new: bool arrays of the same shape (at least one entry).

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    prev = jnp.asarray(prev)
    new = jnp.asarray(new)
    for name, x in (("prev", prev), ("new", new)):
        if x.dtype != jnp.bool_:
            raise ValueError(f"{name} must be a bool mask, got dtype {x.dtype}")
    if prev.shape != new.shape:
        raise ValueError(f"prev and new must have the same shape, got {prev.shape} and {new.shape}")
    if prev.size == 0:
        raise ValueError("prev and new must have at least one entry")
    return jnp.mean(prev != new, dtype=jnp.float32)


def flip_rates(prev_tree, new_tree):
    """Per-layer and aggregate flip rates of two pytrees of masks with the same structure.

    Args:
      prev_tree, new_tree: pytrees (e.g. ``{layer_name: mask}``) of bool arrays, leaf by leaf of
        equal shapes.

    Returns:
      ``(per_layer, aggregate)``: a pytree of float32 scalars with the structure of ``new_tree``,
      and the float32 fraction of all entries that flipped (layers weighted by size).
    """
    prev_leaves, prev_def = jax.tree_util.tree_flatten(prev_tree)
    new_leaves, new_def = jax.tree_util.tree_flatten(new_tree)
    if prev_def != new_def:
        raise ValueError(f"prev_tree and new_tree must have the same structure: {prev_def} vs {new_def}")
    if not new_leaves:
        raise ValueError("prev_tree and new_tree must hold at least one mask")
    rates = [flip_rate(p, q) for p, q in zip(prev_leaves, new_leaves, strict=True)]
    sizes = [jnp.size(q) for q in new_leaves]
    total = sum(sizes)
    agg = sum(r * (s / total) for r, s in zip(rates, sizes, strict=True))
    return jax.tree_util.tree_unflatten(new_def, rates), jnp.asarray(agg, jnp.float32)
