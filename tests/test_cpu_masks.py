"""The CPU mask kernel (bimask_jax.cpu_masks) against the NumPy rules and the XLA formulation."""

import os
import platform
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import cpu_masks
from tests import nm_reference as ref

NM = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 16), (16, 16), (1, 2), (1, 1)]


def _can_build() -> bool:
    """x86-64 with AVX-512 F/BW/VL/DQ and a g++: here the kernel must build, not silently skip."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(x in flags for x in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def test_kernel_builds_where_it_can():
    if not _can_build():
        pytest.skip("no x86-64 AVX-512 CPU with g++ here; layer_masks falls back to XLA")
    assert cpu_masks.available(), cpu_masks.unavailable_reason()
    assert cpu_masks.unavailable_reason() is None


needs_kernel = pytest.mark.skipif(
    not cpu_masks.available(), reason=f"CPU mask kernel: {cpu_masks.unavailable_reason()}"
)


def _kernel(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _perm(c, seed=1):
    return np.random.default_rng(seed).permutation(c).astype(np.int32)


SHAPES = [(16, 16), (32, 48), (8, 16), (48, 80), (3, 3, 16, 32)]


@needs_kernel
@pytest.mark.parametrize(
    "n,m,shape",
    [(n, m, s) for n, m in NM for s in SHAPES if s[-2] % m == 0 and s[-1] % m == 0],
)
def test_masks_match_numpy(n, m, shape):
    k = _kernel(shape, seed=sum(shape) + m)
    perm = _perm(shape[-1], seed=n)
    fwd, bwd = bj.layer_masks(k, n, m, "bimask", perm, impl="cpu_kernel")
    assert fwd.shape == bwd.shape == k.shape and fwd.dtype == bwd.dtype == jnp.bool_
    f = ref.nm_mask(k, n, m, axis=-2)
    np.testing.assert_array_equal(fwd, f)
    np.testing.assert_array_equal(bwd, ref.backward_mask(k, f, perm, n, m))
    f2, b2 = bj.layer_masks(k, n, m, "srste", impl="cpu_kernel")
    np.testing.assert_array_equal(f2, f)
    np.testing.assert_array_equal(b2, f)


@needs_kernel
def test_ties_zeros_nan_inf_denormals_match_numpy():
    rng = np.random.default_rng(3)
    # Few distinct magnitudes -> many ties; both signed zeros; non-finite and subnormal values.
    k = rng.integers(-2, 3, size=(40, 24)).astype(np.float32)
    k[rng.random(k.shape) < 0.1] = -0.0
    k[0, 0], k[5, 7], k[9, 3], k[12, 12] = np.nan, np.inf, -np.inf, -np.nan
    k[20, 1], k[21, 1] = 1e-45, -1e-45
    perm = _perm(24, seed=4)
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        fwd, bwd = bj.layer_masks(k, n, m, "bimask", perm, impl="cpu_kernel")
        f = ref.nm_mask(k, n, m, axis=0)
        np.testing.assert_array_equal(fwd, f)
        np.testing.assert_array_equal(bwd, ref.backward_mask(k, f, perm, n, m))
    assert fwd[0, 0] and fwd[5, 7] and fwd[12, 12], "NaN and inf rank as +inf: always kept"


@needs_kernel
@pytest.mark.parametrize(
    "shape,n,m",
    [((4000, 200), 2, 4), ((2048, 256), 2, 4), ((1040, 72), 4, 8), ((512, 1024), 1, 16)],
)
def test_large_kernels_equal_xla(shape, n, m):
    """Several work chunks (the threaded path), tile and column tails; bit-equal to impl="xla"."""
    k = _kernel(shape, seed=shape[0])
    perm = _perm(shape[1], seed=shape[1])
    got = bj.layer_masks(k, n, m, "bimask", perm, impl="cpu_kernel")
    want = bj.layer_masks(k, n, m, "bimask", perm, impl="xla")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_kernels(dtype):
    k = jnp.asarray(_kernel((32, 16), seed=8), dtype)
    perm = _perm(16)
    fwd, bwd = bj.layer_masks(k, 2, 4, "bimask", perm, impl="cpu_kernel")
    k32 = np.asarray(k, np.float32)
    f = ref.nm_mask(k32, 2, 4, axis=0)
    np.testing.assert_array_equal(fwd, f)
    np.testing.assert_array_equal(bwd, ref.backward_mask(k32, f, perm, 2, 4))


@needs_kernel
def test_auto_uses_the_kernel_on_cpu():
    k = _kernel((16, 8))
    hlo = jax.jit(lambda k: bj.layer_masks(k, 2, 4, "bimask")).lower(k).as_text()
    assert "bimask_cpu_masks" in hlo
    hlo = jax.jit(lambda k: bj.layer_masks(k, 2, 4, "bimask", impl="xla")).lower(k).as_text()
    assert "bimask_cpu_masks" not in hlo
    # float64 is not handled by the kernel (narrowing could create ties): auto falls back to XLA.
    with jax.enable_x64(True):
        k64 = jnp.asarray(k, jnp.float64)
        hlo = jax.jit(lambda k: bj.layer_masks(k, 2, 4, "bimask")).lower(k64).as_text()
        assert "bimask_cpu_masks" not in hlo
        f, b = bj.layer_masks(k64, 2, 4, "bimask")
        np.testing.assert_array_equal(f, ref.nm_mask(k, 2, 4, axis=0))


@needs_kernel
def test_jit_vmap_and_grad():
    ks = _kernel((3, 32, 8), seed=5)
    perm = jnp.asarray(_perm(8))

    @jax.jit
    def masks(k):
        return bj.layer_masks(k, 2, 4, "bimask", perm, impl="cpu_kernel")

    fs, bs = jax.vmap(masks)(ks)
    for i in range(3):
        f = ref.nm_mask(ks[i], 2, 4, axis=0)
        np.testing.assert_array_equal(fs[i], f)
        np.testing.assert_array_equal(bs[i], ref.backward_mask(ks[i], f, np.asarray(perm), 2, 4))

    x = _kernel((5, 32), seed=6)

    def loss(k, impl):
        fwd, bwd = bj.layer_masks(k, 2, 4, "bimask", perm, impl=impl)
        return jnp.sum(bj.sparse_dense(x, k, fwd, bwd) ** 2)

    g = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_array_equal(g(ks[0], "cpu_kernel"), g(ks[0], "xla"))


@needs_kernel
def test_invalid_perm_under_jit_is_an_error_not_a_wrong_mask():
    k = _kernel((16, 8))
    f = jax.jit(lambda k, p: bj.layer_masks(k, 2, 4, "bimask", p, impl="cpu_kernel"))
    bad = jnp.asarray([0, 0, 1, 2, 3, 4, 5, 6], jnp.int32)  # repeated index
    with pytest.raises(Exception, match="perm is not a permutation"):
        jax.block_until_ready(f(k, bad))
    with pytest.raises(Exception, match="perm is not a permutation"):
        jax.block_until_ready(f(k, jnp.arange(8, dtype=jnp.int32) + 1))  # out of range


def test_impl_errors():
    k = _kernel((12, 12))
    with pytest.raises(ValueError, match="impl must be one of"):
        bj.layer_masks(k, 2, 4, "bimask", impl="cuda")
    with pytest.raises(ValueError, match="size 12 is not divisible by m=8"):
        bj.layer_masks(k, 2, 8, "bimask", impl="cpu_kernel")
    if cpu_masks.available():
        with pytest.raises(ValueError, match=r"needs m in \(1, 2, 4, 8, 16\).*m=3"):
            bj.layer_masks(k, 1, 3, "bimask", impl="cpu_kernel")
        with pytest.raises(ValueError, match="not a permutation"):
            bj.layer_masks(k, 2, 4, "bimask", np.zeros(12, np.int32), impl="cpu_kernel")


@pytest.fixture
def fresh_load(monkeypatch):
    """Lets a test change the build environment; the kernel is reloaded as before afterwards."""
    cpu_masks._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_masks._load.cache_clear()
    cpu_masks._load()


def test_switched_off_falls_back_to_xla(fresh_load):
    fresh_load.setenv("BIMASK_JAX_CPU_KERNEL", "0")
    assert not cpu_masks.available()
    assert "BIMASK_JAX_CPU_KERNEL=0" in cpu_masks.unavailable_reason()
    k = _kernel((16, 8), seed=2)
    perm = _perm(8)
    fwd, bwd = bj.layer_masks(k, 2, 4, "bimask", perm)  # auto -> XLA
    f = ref.nm_mask(k, 2, 4, axis=0)
    np.testing.assert_array_equal(fwd, f)
    np.testing.assert_array_equal(bwd, ref.backward_mask(k, f, perm, 2, 4))
    with pytest.raises(RuntimeError, match="unavailable: switched off"):
        bj.layer_masks(k, 2, 4, "bimask", perm, impl="cpu_kernel")


def test_missing_or_failing_compiler_is_reported(fresh_load, tmp_path):
    fresh_load.setenv("BIMASK_JAX_CACHE_DIR", str(tmp_path / "cache"))
    fresh_load.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in cpu_masks.unavailable_reason()
    cpu_masks._load.cache_clear()
    broken = tmp_path / "broken-cxx"
    broken.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\n'
        'echo "error: no AVX-512 here" >&2; exit 1\n'
    )
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    fresh_load.setenv("CXX", str(broken))
    reason = cpu_masks.unavailable_reason()
    assert "could not build" in reason and "no AVX-512 here" in reason
    assert not list((tmp_path / "cache").glob("*.so")), "a failed build must leave no library"


@pytest.mark.skipif(not _can_build(), reason="no x86-64 AVX-512 CPU with g++ here")
def test_builds_into_the_cache_dir_once(fresh_load, tmp_path):
    fresh_load.setenv("BIMASK_JAX_CACHE_DIR", str(tmp_path))
    assert cpu_masks.available(), cpu_masks.unavailable_reason()
    (lib,) = tmp_path.glob("cpu_masks-*.so")
    mtime = os.stat(lib).st_mtime_ns
    cpu_masks._load.cache_clear()
    assert cpu_masks.available()
    assert os.stat(lib).st_mtime_ns == mtime, "a cached build is reused, not rebuilt"
