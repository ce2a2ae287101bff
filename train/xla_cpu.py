"""Which convolution path XLA:CPU uses: its YNNPACK fusions (``ynn``) or its own Eigen kernels
(``eigen``), chosen per machine.

jaxlib 0.10's XLA:CPU sends most convolutions of a train step to YNNPACK fusions (``__ynn_fusion``
in the compiled HLO). Measured (issue 18) on an AMD EPYC with AVX2 and no AVX-512: those are
2-12x slower than Eigen's convolutions, the whole CIFAR ResNet-32 step 2.3-2.6x slower. Measured
on an AMD EPYC with AVX-512 (BENCHMARKS.md, "CPU convolution path"): per layer Eigen up to 1.8x
faster on some convolutions and YNNPACK up to 1.25x on others, the whole step within about 10% in
no consistent direction. So the rule of ``auto`` is:

* not the CPU backend (GPU, TPU): nothing is changed (``default``);
* an x86-64 CPU without AVX-512F: ``eigen`` (the measured 2.3-2.6x);
* anything else (AVX-512 x86-64, ARM, unknown): XLA's own default, ``ynn`` (no measured gain
  worth overriding the compiler's default for; nothing was measured on ARM).

``eigen`` is XLA's per-compilation option ``xla_cpu_experimental_ynn_fusion_type`` set to
``EIGEN_FUSION_TYPES`` (YNNPACK keeps dots and reductions, not convolutions); equivalently the
process-wide ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` (same
optimized HLO). A jax that does not know the option: the per-compilation form is probed once
(XLA answers ``INVALID_ARGUMENT``) and the path falls back to ``default``; the ``XLA_FLAGS`` form
(an unknown flag aborts the process) is only written for the jaxlib versions in
``FLAG_VERIFIED_JAXLIB``.

This module belongs to the training scripts, benchmarks and tests; ``bimask_jax`` never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re

MODES = ("auto", "ynn", "eigen")
OPTION = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
EIGEN_FLAG = f"--{OPTION}=-individual_convolution"
# jaxlib (major, minor) series whose XLA is known to have the flag (checked: 0.10.2).
FLAG_VERIFIED_JAXLIB = ((0, 10),)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The convolution path: ``path`` is ``"eigen"``, ``"ynn"`` or ``"default"`` (not the CPU
    backend, or an XLA without the option: nothing changed); ``reason`` says why, for the log."""

    path: str
    reason: str

    def describe(self) -> str:
        return f"XLA:CPU convolutions: {self.path} ({self.reason})"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (or of ``cpuinfo``, its
    text); ``None`` where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else None


def rule(flags: frozenset[str] | None, machine: str | None = None) -> Choice:
    """``auto``'s rule for a CPU backend, from the CPU's feature ``flags`` and ``machine``
    (``platform.machine()``): ``eigen`` on x86-64 without AVX-512F, else ``ynn``."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return Choice("ynn", f"auto: {machine} CPU, not measured, XLA default")
    if flags is None:
        return Choice("ynn", "auto: CPU features unknown, XLA default")
    if "avx512f" in flags:
        return Choice("ynn", "auto: x86-64 with AVX-512, paths measured within ~10%, XLA default")
    if "avx2" in flags:
        return Choice("eigen", "auto: x86-64 with AVX2 and no AVX-512, YNNPACK convolutions "
                      "measured 2-12x slower")
    return Choice("eigen", "auto: x86-64 without AVX-512, YNNPACK convolutions measured slower "
                  "(on AVX2)")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"xla_cpu_conv must be one of {MODES}, got {mode!r}")


@functools.cache
def option_supported() -> bool:
    """Whether this XLA accepts the per-compilation option (one tiny compile, cached)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
            {OPTION: EIGEN_FUSION_TYPES})
    except Exception as e:  # jax.errors.JaxRuntimeError: INVALID_ARGUMENT, no such option
        if "INVALID_ARGUMENT" in str(e) or "No such compile option" in str(e):
            return False
        raise
    return True


def choose(mode: str = "auto", *, backend: str | None = None) -> Choice:
    """The path for ``mode`` (``auto``, ``ynn`` or ``eigen``) on ``backend`` (default
    ``jax.default_backend()``: this initialises JAX's backend). Not the CPU backend, or an XLA
    without the option: ``default``."""
    _check_mode(mode)
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return Choice("default", f"{backend} backend, untouched")
    if not option_supported():
        return Choice("default", f"this XLA has no {OPTION} option")
    if mode == "auto":
        return rule(cpu_flags())
    return Choice(mode, "requested")


def compiler_options(choice: Choice) -> dict[str, str]:
    """Per-compilation XLA options for ``choice`` (``jax.jit(f, compiler_options=...)`` or
    ``.lower(...).compile(...)``): the option for ``eigen``, nothing otherwise."""
    return {OPTION: EIGEN_FUSION_TYPES} if choice.path == "eigen" else {}


def _jaxlib_series() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version

        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return None


def set_xla_flags(mode: str = "auto", *, environ=None) -> Choice:
    """Process-wide form, for code that jits everywhere (the test suite): adds ``EIGEN_FLAG`` to
    ``XLA_FLAGS`` in ``environ`` (default ``os.environ``) when ``mode`` gives ``eigen``. Call it
    before JAX initialises its backend (it reads ``XLA_FLAGS`` once). Does not import jax.
    ``JAX_PLATFORMS`` naming no ``cpu``, a GPU plugin present, or a jaxlib outside
    ``FLAG_VERIFIED_JAXLIB`` (an unknown flag aborts XLA): ``default``, nothing written. An
    ``XLA_FLAGS`` that already sets the option: left as it is (``default``, user's flags)."""
    _check_mode(mode)
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if OPTION in flags:
        return Choice("default", f"XLA_FLAGS already sets {OPTION}")
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return Choice("default", f"JAX_PLATFORMS={platforms}, untouched")
    if not platforms and _gpu_plugin_installed():
        return Choice("default", "a GPU/TPU plugin is installed, untouched")
    series = _jaxlib_series()
    if series not in FLAG_VERIFIED_JAXLIB:
        return Choice("default", f"jaxlib {series} not verified to know --{OPTION}")
    choice = rule(cpu_flags()) if mode == "auto" else Choice(mode, "requested")
    if choice.path == "eigen":
        environ["XLA_FLAGS"] = f"{flags} {EIGEN_FLAG}".strip()
    return choice


def _gpu_plugin_installed() -> bool:
    from importlib.util import find_spec

    return any(find_spec(m) is not None for m in
               ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"))


def ynn_convolutions(hlo_text: str) -> tuple[int, int]:
    """``(in YNNPACK fusions, all)`` convolutions of a compiled module's text
    (``compiled.as_text()``): a check of which path ran."""
    comps: dict[str, str] = {}
    name, lines = None, []
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line.startswith("}") and name is not None:
            comps[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    ynn_called = set(re.findall(r"calls=%?([\w.\-]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo_text))
    total = sum(body.count(" convolution(") for body in comps.values())
    in_ynn = sum(comps.get(c, "").count(" convolution(") for c in ynn_called)
    return in_ynn, total
