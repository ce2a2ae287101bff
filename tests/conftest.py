"""Test-suite setup: XLA:CPU's convolution path (``train.xla_cpu``), chosen before JAX initialises
its backend (XLA reads ``XLA_FLAGS`` once). ``BIMASK_XLA_CPU_CONV=auto|ynn|eigen`` overrides the
per-machine rule; tests that start their own subprocess with their own ``XLA_FLAGS`` run XLA's
default path."""

import os

import pytest

from train import xla_cpu

CHOICE = xla_cpu.set_xla_flags(os.environ.get("BIMASK_XLA_CPU_CONV", "auto"))


def pytest_report_header(config):
    return CHOICE.describe()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for one test module (end-to-end runs that compile the same
    programs again: a stopped run, its resume, the unbroken run). Restored (and reset) afterwards,
    so no other module sees it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()
