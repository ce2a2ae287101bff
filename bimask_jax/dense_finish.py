"""Dense finish: train the last fraction of the steps dense.

Hu et al. (ICML 2024, arXiv:2404.01847v3: "a dense fine-tuning procedure near the end of
pre-training", in its abstract; the paper's equations could not be read here), as in their code,
thu-ml/2by4-pretrain-acc-examples ``v1/nanoGPT/train.py``: every sparse layer
switches to dense (``p.mode = 'dense'``) at iteration 250000 of 300000, i.e. the last 1/6 of the
steps; from then on the masks, the masked decay and the sparse products are off.

Counting, checked against that file: the switch comes after iteration 250000's sparse forward,
backward and masked decay (before its optimizer step), and nanoGPT's loop runs iterations 0 to
300000 inclusive (it stops once ``iter_num > max_iters``). So their last 50000 updates are dense,
after 250001 sparse ones. Here ``dense_finish_start(300000, 1/6) == 250000``: the same 50000 dense
updates, after 250000 sparse ones (their one extra iteration is nanoGPT's loop bound).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def dense_finish_start(total_steps: int, fraction: float) -> int:
    """The first dense step: ``total_steps - round(fraction * total_steps)``.

    Args:
      total_steps: Python int >= 1. fraction: Python float in ``[0, 1]`` (0 = never dense).

    Returns:
      Python int in ``[0, total_steps]``; ``total_steps`` when ``fraction == 0``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a Python int >= 1, got {total_steps!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a float in [0, 1], got {fraction!r}")
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be a float in [0, 1], got {fraction!r}")
    return total_steps - int(round(fraction * total_steps))


def is_dense_step(step, total_steps: int, fraction: float):
    """Whether ``step`` (0-based, may be traced) falls in the dense finish. bool scalar."""
    start = dense_finish_start(total_steps, fraction)
    return jnp.asarray(step) >= start
