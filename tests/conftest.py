"""Test-suite setup: XLA:CPU's convolution path (``train.xla_cpu``), chosen before JAX initialises
its backend (XLA reads ``XLA_FLAGS`` once). ``BIMASK_XLA_CPU_CONV=auto|ynn|eigen`` overrides the
per-machine rule; tests that start their own subprocess with their own ``XLA_FLAGS`` run XLA's
default path."""

import os

from train import xla_cpu

CHOICE = xla_cpu.set_xla_flags(os.environ.get("BIMASK_XLA_CPU_CONV", "auto"))


def pytest_report_header(config):
    return CHOICE.describe()
