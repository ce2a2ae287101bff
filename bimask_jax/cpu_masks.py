"""The per-step masks on the CPU as one XLA FFI kernel (AVX-512), compiled on first use.

XLA:CPU emits the backward mask's column gathers as scalar loops, which made the per-step masks of a
ResNet-50 about 70 ms on a 2-core machine (``benchmarks/masks.py``). ``cpu_masks.cc`` computes the
forward and backward masks of a ``(K, C)`` float32 kernel in one pass over 16-row tiles, with the
permutation applied to column vectors of a transposed tile instead of element by element; the
result is bit-identical to the XLA formulation in :mod:`bimask_jax.masks` (same ranking rule: larger
``|w|`` wins, ties to the lower index, NaN as ``+inf``; forward-dropped entries rank below kept
ones in the backward ranking).

The kernel is built the first time it is needed with the system C++ compiler (``$CXX``, default
``g++``; ``-O3 -march=native``) against the FFI headers that ship with jaxlib, and cached under
``$BIMASK_JAX_CACHE_DIR`` (default ``~/.cache/bimask_jax``), keyed by the source, jaxlib version,
compiler and CPU. Where it cannot be built (no compiler, no AVX-512 F/BW/VL/DQ, not x86-64) or is
switched off with ``BIMASK_JAX_CPU_KERNEL=0``, :func:`available` is False and
:func:`bimask_jax.layer_masks` uses the XLA formulation; :func:`unavailable_reason` says why.

The calls are ordinary JAX primitives: they work under ``jit``, ``vmap`` (a loop over the batch) and
inside ``grad`` (masks carry no gradient); they run on the CPU only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("cpu_masks.cc")
_MASKS_TARGET = "bimask_cpu_masks"
_FORWARD_TARGET = "bimask_cpu_forward_mask"
# The dtypes that widen to float32 exactly (so the order of |w|, ties included, is unchanged).
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

_log = logging.getLogger("bimask_jax")
_REGISTERED: list = []  # the library whose handlers XLA holds (one per process)


def supports(m: int, dtype) -> bool:
    """Whether the kernel handles group size ``m`` (a divisor of 16) and kernel dtype ``dtype``."""
    return m in (1, 2, 4, 8, 16) and any(jnp.dtype(dtype) == jnp.dtype(d) for d in KERNEL_DTYPES)


def _cache_dir() -> pathlib.Path:
    d = os.environ.get("BIMASK_JAX_CACHE_DIR")
    if d:
        return pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "bimask_jax"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(cxx: str, out: pathlib.Path) -> None:
    include = jax.ffi.include_dir()
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    cmd += ["-I", include, "-o", str(out), str(_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")


@functools.cache
def _load() -> str | None:
    """Builds (or finds in the cache), loads and registers the kernel once per process.

    Returns None on success, else the reason it is unavailable.
    """
    if os.environ.get("BIMASK_JAX_CPU_KERNEL", "1") == "0":
        return "switched off by BIMASK_JAX_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with AVX-512, this is {platform.machine()}"
    cxx = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"no C++ compiler ({cxx}): {e}"
    key = hashlib.sha256(_SOURCE.read_bytes())
    for part in (jax.__version__, jaxlib.__version__, version, _cpu_signature()):
        key.update(part.encode())
    path = _cache_dir() / f"cpu_masks-{key.hexdigest()[:20]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Build under a temporary name and rename, so concurrent processes never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                _compile(cxx, pathlib.Path(tmp))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))
        if not _REGISTERED:  # XLA keeps the first registration for the life of the process
            jax.ffi.register_ffi_target(
                _MASKS_TARGET, jax.ffi.pycapsule(lib.BimaskCpuMasks), platform="cpu"
            )
            jax.ffi.register_ffi_target(
                _FORWARD_TARGET, jax.ffi.pycapsule(lib.BimaskCpuForwardMask), platform="cpu"
            )
            _REGISTERED.append(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = f"could not build the CPU mask kernel: {e}"
        _log.info("bimask_jax: %s; using the XLA formulation", reason)
        return reason
    return None


def available() -> bool:
    """True when the CPU mask kernel is built and registered (building it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()


def _call(target: str, num_out: int, kernel2d, *args, n: int, m: int):
    """Checks that the kernel can run on ``kernel2d`` and calls FFI ``target`` on it."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CPU mask kernel is unavailable: {reason}")
    if kernel2d.ndim != 2:
        raise ValueError(f"kernel must be 2-D (K, C) here, got shape {kernel2d.shape}")
    if not supports(m, kernel2d.dtype):
        raise ValueError(
            f"the CPU mask kernel needs m in (1, 2, 4, 8, 16) and a float32/bfloat16/float16 "
            f"kernel, got m={m}, dtype {kernel2d.dtype}"
        )
    w = jax.lax.stop_gradient(kernel2d).astype(jnp.float32)  # masks carry no gradient
    out = (jax.ShapeDtypeStruct(w.shape, jnp.bool_),) * num_out
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(w, *args, n=np.int64(n), m=np.int64(m))


def fused_masks(kernel2d, perm, n: int, m: int):
    """``(forward_mask, backward_mask)`` of a ``(K, C)`` kernel in one CPU kernel call.

    Equal to ``layer_masks(kernel2d, n, m, "bimask", perm)``; arguments are assumed checked by the
    caller (``K % m == C % m == 0``). An invalid ``perm`` inside ``jit`` raises at run time (the
    kernel checks it) instead of reading out of bounds.

    Args:
      kernel2d: ``(K, C)`` float32, bfloat16 or float16 (widened to float32, which is exact).
      perm: int ``(C,)``, a permutation of ``range(C)``.
      n, m: Python ints, ``m`` a divisor of 16.

    Returns:
      ``(fwd, bwd)``: bool ``(K, C)``.
    """
    perm = jnp.asarray(perm).astype(jnp.int32)
    fwd, bwd = _call(_MASKS_TARGET, 2, kernel2d, perm, n=n, m=m)
    return fwd, bwd


def forward_mask_2d(kernel2d, n: int, m: int):
    """The forward mask (N:M down each column, groups of ``m`` rows) of a ``(K, C)`` kernel.

    Equal to ``forward_mask(kernel2d, n, m)``; ``K % m == 0`` (``C`` is free).

    Returns:
      bool ``(K, C)``.
    """
    (fwd,) = _call(_FORWARD_TARGET, 1, kernel2d, n=n, m=m)
    return fwd
