"""Test set-up: 8 fake CPU devices for multi-device tests, a skip for GPU-only tests without a GPU, and the machine's
speed at the end of the report (suite times from different days compare only next to it)."""

import os

# The tests' programs are tiny and compiled once each, so LLVM's optimisation costs more than it saves: at its
# lowest level the fast suite takes half the time (docs/BENCHMARKS.md, "Test suite"); benchmarks compile as usual.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compile the same engine steps and models again and again (each xdist worker, each test's fresh objects):
# XLA's persistent cache compiles each program once per run (and once per machine while the folder stays).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MESHLM_TEST_JAX_CACHE", os.path.join(ROOT, ".pytest-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

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
