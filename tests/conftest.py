"""Test set-up: 8 fake CPU devices for multi-device tests, a skip for GPU-only tests without a GPU, and the machine's
speed at the end of the report (suite times from different days compare only next to it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from scaling.hardware import measured_matmul_flops  # noqa: E402

MACHINE_SPEED = pytest.StashKey[float]()


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist), before any test
        session.config.stash[MACHINE_SPEED] = measured_matmul_flops()


def pytest_terminal_summary(terminalreporter, config):
    if MACHINE_SPEED in config.stash:
        terminalreporter.write_line(
            f"machine speed: {config.stash[MACHINE_SPEED] / 1e9:.1f} GFLOP/s (float32 1024x1024 matmul at the start, "
            f"{jax.default_backend()}, {len(os.sched_getaffinity(0))} cores)")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
