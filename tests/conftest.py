"""Test set-up: 8 fake CPU devices for multi-device tests, a skip for GPU-only tests without a GPU, and the machine's
speed in the report header (suite times from different days compare only next to it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from scaling.hardware import measured_matmul_flops  # noqa: E402


def pytest_report_header(config):
    return (f"machine speed: {measured_matmul_flops() / 1e9:.1f} GFLOP/s (float32 1024x1024 matmul, "
            f"{jax.default_backend()}, {len(os.sched_getaffinity(0))} cores)")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
