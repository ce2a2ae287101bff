"""Argument checks shared by the functional core.

Every check raises ``ValueError`` naming the offending parameter and the rule it breaks. Checks look
at static information (shapes, dtypes, Python numbers), so they run unchanged under ``jit``, ``vmap``
and ``grad``; the one value check, "is ``perm`` a permutation?", runs in Python on concrete arrays
and in the graph (:func:`safe_perm`) on traced ones, reported under ``checkify`` when the
caller asks for it (:func:`report_perm`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

K_ORDERS = ("hwi", "ihw")


def as_array(x):
    """``x`` itself when it is already an array (JAX or NumPy), else ``jnp.asarray(x)``."""
    return x if isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x)


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


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return int(value)


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {dtype}")


def check_kernel(kernel, name: str = "kernel") -> None:
    """A kernel is a floating array with at least 2 axes (reduction..., output), none of size 0."""
    shape = jnp.shape(kernel)
    if len(shape) < 2:
        raise ValueError(f"{name} must have at least 2 axes (..., in, out), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} must not have an axis of size 0, got shape {shape}")
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


def check_decay(decay) -> float:
    """``decay`` is a static Python number, finite and >= 0."""
    if isinstance(decay, jax.core.Tracer):
        raise ValueError(
            "decay must be a concrete Python float (it is a static argument), got a traced value"
        )
    try:
        d = float(decay)
    except (TypeError, ValueError):
        raise ValueError(f"decay must be a Python float >= 0, got {decay!r}") from None
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"decay must be finite and >= 0, got {decay!r}")
    return d


def check_perm(perm, c: int, name: str = "perm"):
    """``perm`` must be an integer array of shape ``(c,)``, and a permutation of ``range(c)`` when
    concrete. Returns it as an array (a Python list or tuple is converted)."""
    if not isinstance(perm, (jax.Array, np.ndarray)):
        try:
            perm = np.asarray(perm)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer array of shape ({c},)") from None
    if perm.ndim != 1 or perm.shape[0] != c:
        raise ValueError(
            f"{name} must be a 1-D permutation of the {c} output columns, got shape {perm.shape}"
        )
    if not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {perm.dtype}")
    if not isinstance(perm, jax.core.Tracer) and not np.array_equal(np.sort(np.asarray(perm)), np.arange(c)):
        raise ValueError(f"{name} is not a permutation of range({c})")
    return perm


def safe_perm(perm, name: str = "perm", *, report: bool = False):
    """In the graph: ``perm`` if it is a permutation of ``range(C)``, else the identity ``arange(C)``.

    The fallback keeps every mask built from it valid (N:M after its permutation, a subset of the
    forward mask). ``report=True`` adds a ``checkify.debug_check``: under
    ``jax.experimental.checkify.checkify`` an invalid ``perm`` is then reported as an error (a no-op
    otherwise). That check is a JAX effect, and a ``jit`` whose graph has an effect leaves JAX's C++
    dispatch path: every call then goes through Python (for a train step with a hundred
    arguments that costs more than the masks, ``train/LM.md``). So it is added only for traced
    permutations given to the public functions (:func:`report_perm`), never in the Flax layers'
    steps. int32 ``(C,)``.
    """
    perm = jnp.asarray(perm, jnp.int32)
    ident = jnp.arange(perm.shape[0], dtype=jnp.int32)
    valid = jnp.all(jnp.sort(perm) == ident)
    if report:
        checkify.debug_check(valid, f"{name} is not a permutation of range({perm.shape[0]})")
    return jnp.where(valid, perm, ident)


def report_perm(perm, checkify_perm) -> bool:
    """Whether a public function's in-graph fallback for ``perm`` also reports it under checkify
    (:func:`safe_perm`): only for a traced ``perm`` (a concrete one was checked in Python by
    :func:`check_perm`) and ``checkify_perm=True``."""
    if not isinstance(checkify_perm, bool):
        raise ValueError(f"checkify_perm must be a bool, got {checkify_perm!r}")
    return checkify_perm and isinstance(perm, jax.core.Tracer)
