"""Test-suite setup: XLA:CPU's convolution path (``train.xla_cpu``), chosen before JAX initialises
its backend (XLA reads ``XLA_FLAGS`` once). ``BIMASK_XLA_CPU_CONV=auto|ynn|eigen`` overrides the
per-machine rule; tests that start their own subprocess with their own ``XLA_FLAGS`` run XLA's
default path.

With pytest-xdist installed (the ``test`` extra) the suite runs on ``WORKERS`` worker processes
unless ``-n`` is given (``-n 0``: one process): most of its time is single-threaded XLA
compilation, which a second process overlaps."""

import os

import pytest

from train import xla_cpu

CHOICE = xla_cpu.set_xla_flags(os.environ.get("BIMASK_XLA_CPU_CONV", "auto"))
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """``-n WORKERS --dist worksteal`` by default where pytest-xdist is installed (not in a worker,
    and not when ``-n``, ``--collect-only`` or ``--pdb`` is given)."""
    opt = config.option
    if (not config.pluginmanager.hasplugin("xdist") or "PYTEST_XDIST_WORKER" in os.environ
            or getattr(opt, "numprocesses", 0) is not None or opt.collectonly or opt.usepdb):
        return
    opt.numprocesses = WORKERS
    if opt.dist == "no":
        opt.dist = "worksteal"


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
