"""Argument checks shared by the functional core.

Every check raises ``ValueError`` naming the offending parameter and the rule it breaks. Checks only
look at static information (shapes, dtypes, Python ints), so they work unchanged under ``jit``,
``vmap`` and ``grad``; value checks (is ``perm`` a permutation?) run only on concrete arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_nm(n, m) -> tuple[int, int]:
    """Validates an N:M ratio given as Python ints and returns ``(n, m)``."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be a Python int, got {v!r}")
    n, m = int(n), int(m)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got m={m}")
    if n > m:
        raise ValueError(f"n must be <= m, got n={n}, m={m}")
    return n, m


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {dtype}")


def check_kernel(kernel, name: str = "kernel") -> None:
    """A kernel is a floating array with at least 2 axes (reduction..., output)."""
    if jnp.ndim(kernel) < 2:
        raise ValueError(
            f"{name} must have at least 2 axes (..., in, out), got shape {jnp.shape(kernel)}"
        )
    check_floating(name, kernel)


def check_divisible(size: int, m: int, what: str) -> None:
    if size % m:
        raise ValueError(f"{what} of size {size} is not divisible by m={m}")


def check_mask(name: str, mask, shape) -> None:
    if tuple(jnp.shape(mask)) != tuple(shape):
        raise ValueError(
            f"{name} must have the kernel's shape {tuple(shape)}, got {jnp.shape(mask)}"
        )
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"{name} must be a bool mask, got dtype {jnp.result_type(mask)}")


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_perm(perm, c: int, name: str = "perm") -> None:
    """``perm`` must be an integer array of length ``c``; checked for being a permutation when
    concrete (outside ``jit``)."""
    if jnp.ndim(perm) != 1 or jnp.shape(perm)[0] != c:
        raise ValueError(
            f"{name} must be a 1-D permutation of the {c} output columns, got shape {jnp.shape(perm)}"
        )
    if not jnp.issubdtype(jnp.result_type(perm), jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {jnp.result_type(perm)}")
    if is_concrete(perm):
        p = np.asarray(perm)
        if not np.array_equal(np.sort(p), np.arange(c)):
            raise ValueError(f"{name} is not a permutation of range({c})")
