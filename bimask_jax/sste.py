"""S-STE: the continuous N:M pruning function of Hu, Zhu & Chen (NeurIPS 2024), as pure functions.

Source of the rule: the authors' code, thu-ml/2by4-pretrain-acc-examples ``v2/nanoGPT/sparse_ops.py``
(``SoftThreshold``, ``FP8SparseLinear.init_scale``) and huyz2023/2by4-pretrain ``sparse/utils.py``
(``_soft_threshold``) / ``sparse/legacy.py`` (``soft_threshold24_torch``). The paper is
arXiv:2409.09099v3 (its abstract: weights continuously projected to be 2:4 sparse and rescaled
with a per-tensor fixed scaling factor); only its abstract and introduction could be read here,
not the equations, so the rules below cite those files and functions, not equation numbers.

For every group ``a`` of ``m`` consecutive entries along ``axis``, with ``t`` the largest *dropped*
magnitude, i.e. the ``(n+1)``-th largest ``|a_i|`` (the 3rd largest for 2:4; ``t = 0`` when
``n == m``)::

    S(a)_i = sign(a_i) * max(|a_i| - t, 0)                          (_soft_threshold)

``S(a)`` has at most ``n`` nonzeros per group (only entries strictly above ``t`` survive), so it is
N:M whatever the ties, and it is continuous in ``a`` (a group whose ranking changes passes through
zero instead of jumping). The layer uses ``beta * S(w)`` with one scalar ``beta`` per tensor, fixed
once at the start of training (``init_scale`` runs at model construction and is never recomputed)::

    beta = <w, S(w)> / <S(w), S(w)>                                 (init_scale)

the ``beta`` minimising ``||w - beta * S(w)||^2``. Gradients are straight-through: the authors'
``SoftThreshold.backward`` returns the output cotangent unchanged, so ``dL/dw = dL/d(beta*S(w))``
(identity, *not* multiplied by ``beta``) and no gradient reaches ``beta``. There is no SR-STE
decay term. :func:`sste_weight` is that operator; :func:`sste_prune` is the plain value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bimask_jax._checks import check_divisible, check_nm


def _check_grouped(name: str, x, m: int, axis: int) -> int:
    """Checks ``x`` (floating, ``axis`` in range, divisible by ``m``); returns ``axis`` >= 0."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"axis must be a Python int, got {axis!r}")
    if jnp.ndim(x) == 0:
        raise ValueError(f"{name} must have at least 1 axis, got a scalar")
    if not -jnp.ndim(x) <= axis < jnp.ndim(x):
        raise ValueError(f"axis={axis} is out of range for {name} with {jnp.ndim(x)} axes")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {dtype}")
    axis = axis % jnp.ndim(x)
    check_divisible(jnp.shape(x)[axis], m, f"{name} axis {axis}")
    return axis


def _soft_threshold(w, n: int, m: int, axis: int):
    """S(w) in float32 (no checks); ``axis`` >= 0."""
    w32 = w.astype(jnp.float32)
    g = w32.reshape(*w.shape[:axis], w.shape[axis] // m, m, *w.shape[axis + 1 :])
    if n == m:
        return w32
    a = jnp.abs(g)
    # (n+1)-th largest |w| of each group: index m-n-1 of the ascending sort.
    t = jnp.take(jnp.sort(a, axis=axis + 1), m - n - 1, axis=axis + 1)
    t = jnp.expand_dims(t, axis + 1)
    s = jnp.sign(g) * jnp.maximum(a - t, 0.0)
    return s.reshape(w.shape)


def soft_threshold(w, n: int = 2, m: int = 4, axis: int = -2):
    """The S-STE soft-threshold ``S(w)`` (module docstring; ``_soft_threshold``), without the scale.

    Args:
      w: floating array; ``w.shape[axis] % m == 0``. For a Flax kernel ``(..., Cin, C)`` the groups
        run along the input axis ``-2`` (the default), as the forward masks of this package do.
      n, m: Python ints, ``1 <= n <= m``.
      axis: the grouped axis.

    Returns:
      array of ``w.shape`` and ``w.dtype`` (computed in float32); at most ``n`` nonzeros per group.
      A NaN weight ranks above every finite one and stays NaN in the output (never silently
      dropped); the rest of its group is thresholded by the finite entries.
    """
    n, m = check_nm(n, m)
    w = jnp.asarray(w)
    axis = _check_grouped("w", w, m, axis)
    return _soft_threshold(w, n, m, axis).astype(w.dtype)


def sste_scale(w, n: int = 2, m: int = 4, axis: int = -2):
    """The per-tensor S-STE scale ``beta = <w, S(w)> / <S(w), S(w)>`` (``FP8SparseLinear.init_scale``).

    Compute it once, from the initial weights, and keep it fixed for the whole run.

    Args:
      w, n, m, axis: as :func:`soft_threshold`.

    Returns:
      float32 scalar. ``1.0`` when ``S(w)`` is all zeros (e.g. ``w == 0``), where the ratio is 0/0.
    """
    n, m = check_nm(n, m)
    w = jnp.asarray(w)
    axis = _check_grouped("w", w, m, axis)
    s = _soft_threshold(w, n, m, axis)
    w32 = w.astype(jnp.float32)
    num = jnp.vdot(w32.ravel(), s.ravel())
    den = jnp.vdot(s.ravel(), s.ravel())
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


def _check_scale(scale):
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar (one per tensor), got shape {jnp.shape(scale)}")
    if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
        raise ValueError(f"scale must have a floating dtype, got {jnp.result_type(scale)}")


def sste_prune(w, n: int = 2, m: int = 4, scale=1.0, axis: int = -2):
    """The S-STE weight ``scale * S(w)`` (plain value; JAX's own derivative of it).

    Args:
      w, n, m, axis: as :func:`soft_threshold`.
      scale: floating scalar, from :func:`sste_scale` at the start of training.

    Returns:
      array of ``w.shape`` and ``w.dtype``; N:M (at most ``n`` nonzeros per group along ``axis``).
      For training use :func:`sste_weight`, whose gradient is the straight-through one.
    """
    n, m = check_nm(n, m)
    w = jnp.asarray(w)
    axis = _check_grouped("w", w, m, axis)
    scale = jnp.asarray(scale)
    _check_scale(scale)
    return (scale.astype(jnp.float32) * _soft_threshold(w, n, m, axis)).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sste_ste(w, scale, n, m, axis):
    return (scale.astype(jnp.float32) * _soft_threshold(w, n, m, axis)).astype(w.dtype)


def _sste_ste_fwd(w, scale, n, m, axis):
    return _sste_ste(w, scale, n, m, axis), scale


def _sste_ste_bwd(n, m, axis, scale, g):
    # SoftThreshold.backward: the cotangent passes to w unchanged; the scale is a fixed buffer.
    return g, jnp.zeros_like(scale)


_sste_ste.defvjp(_sste_ste_fwd, _sste_ste_bwd)


def sste_weight(w, scale, n: int = 2, m: int = 4, axis: int = -2):
    """``scale * S(w)`` forward, straight-through backward: ``dL/dw = dL/dout`` and ``dL/dscale = 0``.

    This is the authors' ``SoftThreshold`` autograd function (``v2/nanoGPT/sparse_ops.py``): the
    backward returns the output gradient unchanged (not multiplied by ``scale`` and not masked).

    Args:
      w: floating array; ``w.shape[axis] % m == 0``.
      scale: floating scalar (per tensor, fixed; :func:`sste_scale`).
      n, m, axis: as :func:`soft_threshold`.

    Returns:
      array of ``w.shape`` and ``w.dtype``.
    """
    n, m = check_nm(n, m)
    w = jnp.asarray(w)
    axis = _check_grouped("w", w, m, axis)
    scale = jnp.asarray(scale)
    _check_scale(scale)
    return _sste_ste(w, scale, n, m, axis)
