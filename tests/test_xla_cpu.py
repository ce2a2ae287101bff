"""train.xla_cpu: the rule, the XLA_FLAGS form, the per-compilation option and which path ran."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import xla_cpu

AVX2 = frozenset("fpu sse2 avx fma avx2".split())
AVX512 = AVX2 | {"avx512f", "avx512bw"}


def test_cpu_flags_parses_first_processor():
    text = ("processor\t: 0\nflags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\n"
            "flags\t\t: fpu avx512f\n")
    assert xla_cpu.cpu_flags(text) == frozenset({"fpu", "sse2", "avx2"})
    assert xla_cpu.cpu_flags("Features\t: fp asimd sve\n") == frozenset({"fp", "asimd", "sve"})
    assert xla_cpu.cpu_flags("processor : 0\n") is None


@pytest.mark.parametrize("flags, machine, path", [
    (AVX2, "x86_64", "eigen"),
    (frozenset({"sse2"}), "x86_64", "eigen"),
    (AVX512, "x86_64", "ynn"),
    (AVX512, "AMD64", "ynn"),
    (None, "x86_64", "ynn"),
    (frozenset({"asimd"}), "aarch64", "ynn"),
])
def test_rule(flags, machine, path):
    choice = xla_cpu.rule(flags, machine)
    assert choice.path == path
    assert choice.reason.startswith("auto:")


def test_bad_mode_names_parameter():
    with pytest.raises(ValueError, match="xla_cpu_conv must be one of"):
        xla_cpu.choose("fast", backend="cpu")
    with pytest.raises(ValueError, match="xla_cpu_conv must be one of"):
        xla_cpu.set_xla_flags("Eigen", environ={})


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_untouched(backend):
    for mode in xla_cpu.MODES:
        choice = xla_cpu.choose(mode, backend=backend)
        assert choice.path == "default"
        assert xla_cpu.compiler_options(choice) == {}


def test_choose_override_and_options():
    assert xla_cpu.option_supported()  # jax 0.10.x has it
    assert xla_cpu.choose("eigen", backend="cpu") == xla_cpu.Choice("eigen", "requested")
    assert xla_cpu.choose("ynn", backend="cpu").path == "ynn"
    assert xla_cpu.compiler_options(xla_cpu.Choice("eigen", "")) == {
        xla_cpu.OPTION: xla_cpu.EIGEN_FUSION_TYPES}
    assert xla_cpu.compiler_options(xla_cpu.Choice("ynn", "")) == {}
    auto = xla_cpu.choose("auto", backend="cpu")
    assert auto == xla_cpu.rule(xla_cpu.cpu_flags())
    assert "XLA:CPU convolutions: " + auto.path in auto.describe()


def test_unknown_option_falls_back(monkeypatch):
    """An XLA without the option answers INVALID_ARGUMENT: ``default``, nothing passed."""
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile({"xla_cpu_no_such_option_x": "1"})
    monkeypatch.setattr(xla_cpu, "option_supported", lambda: False)
    for mode in xla_cpu.MODES:
        choice = xla_cpu.choose(mode, backend="cpu")
        assert choice.path == "default" and xla_cpu.compiler_options(choice) == {}


def test_set_xla_flags(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_gpu_plugin_installed", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_series", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.set_xla_flags("eigen", environ=env).path == "eigen"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + xla_cpu.EIGEN_FLAG
    # already set (by the user or a second call): left alone
    assert xla_cpu.set_xla_flags("eigen", environ=env).path == "default"
    assert env["XLA_FLAGS"].count(xla_cpu.OPTION) == 1
    env = {}
    assert xla_cpu.set_xla_flags("ynn", environ=env).path == "ynn" and env == {}
    env = {"JAX_PLATFORMS": "cuda"}
    assert xla_cpu.set_xla_flags("eigen", environ=env).path == "default"
    assert "XLA_FLAGS" not in env
    # a jaxlib not verified to know the flag (an unknown flag aborts XLA): nothing written
    monkeypatch.setattr(xla_cpu, "_jaxlib_series", lambda: (0, 11))
    env = {}
    assert xla_cpu.set_xla_flags("eigen", environ=env).path == "default" and env == {}
    monkeypatch.setattr(xla_cpu, "_jaxlib_series", lambda: (0, 10))
    monkeypatch.setattr(xla_cpu, "_gpu_plugin_installed", lambda: True)
    assert xla_cpu.set_xla_flags("eigen", environ=env).path == "default" and env == {}


def test_paths_in_compiled_hlo_and_same_numbers():
    """The option takes the convolutions (forward and both gradients) out of YNNPACK fusions,
    and both paths compute the convolution (checked against a NumPy direct sum)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 5, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y * y).sum(), y

    low = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(x, w)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((2, 5, 5, 4), np.float32)
    for i in range(3):
        for j in range(3):
            ref += np.einsum("bhwc,co->bhwo", xp[:, i:i + 5, j:j + 5], w[i, j])
    counts = {}
    for path in ("ynn", "eigen"):
        exe = low.compile(xla_cpu.compiler_options(xla_cpu.Choice(path, "")))
        counts[path] = xla_cpu.ynn_convolutions(exe.as_text())
        (_, y), (gx, gw) = exe(x, w)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        # d/dw sum(y^2) = sum over positions of 2 y x-patch
        gw_ref = np.zeros_like(w)
        for i in range(3):
            for j in range(3):
                gw_ref[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + 5, j:j + 5], 2 * ref)
        np.testing.assert_allclose(gw, gw_ref, rtol=1e-3, atol=1e-3)
    assert counts["eigen"][0] == 0 and counts["eigen"][1] == 3
    assert counts["ynn"][1] == 3  # where YNNPACK takes them is XLA's choice, not asserted


def test_ynn_convolutions_parser():
    text = """HloModule m

%fused_computation (p: f32[2]) -> f32[2] {
  ROOT %convolution.1 = f32[2]{0} convolution(%p, %p), window={size=1}
}

%other (p: f32[2]) -> f32[2] {
  ROOT %convolution.2 = f32[2]{0} convolution(%p, %p), window={size=1}
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %ynn_fusion = f32[2]{0} fusion(%a), kind=kCustom, calls=%fused_computation, \
backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %f = f32[2]{0} fusion(%ynn_fusion), kind=kLoop, calls=%other
  ROOT %convolution.3 = f32[2]{0} convolution(%f, %f), window={size=1}
}
"""
    assert xla_cpu.ynn_convolutions(text) == (1, 3)


def test_conftest_choice_reaches_xla():
    """tests/conftest.py's process-wide choice is what XLA compiles with (run the suite with
    BIMASK_XLA_CPU_CONV=eigen to check the Eigen path)."""
    from tests import conftest

    x, w = jnp.ones((1, 6, 6, 8)), jnp.ones((3, 3, 8, 8))
    exe = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w).compile()
    in_ynn, total = xla_cpu.ynn_convolutions(exe.as_text())
    assert total == 1
    if os.environ.get("BIMASK_XLA_CPU_CONV") == "eigen":
        assert conftest.CHOICE.path == "eigen"
    if conftest.CHOICE.path == "eigen":
        assert xla_cpu.EIGEN_FLAG in os.environ["XLA_FLAGS"]
        assert in_ynn == 0
