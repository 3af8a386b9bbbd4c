"""Out of memory on any backend becomes one line naming what was asked for and what to change: XLA's GPU allocator
message, both CPU forms (`RESOURCE_EXHAUSTED: Out of memory allocating N bytes`, `INTERNAL: ... Out of memory`),
Python's MemoryError, and a real CPU allocation refused under an address-space limit."""

import subprocess
import sys

import pytest

from scripts.common import out_of_memory
from tests.subprocesses import HANG_LIMIT_S, ROOT, child_env, tail

XLA_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 66.12GiB with allocator GPU_0_bfc on device "
           "0. [tf-allocator-allocation-error=''] [executable_name='jit_step']")
CPU_OOM = "RESOURCE_EXHAUSTED: Out of memory allocating 5033164800 bytes."
CPU_INTERNAL_OOM = "INTERNAL: Failed to allocate 1073741824 bytes for new constant: Out of memory"


def test_out_of_memory_is_explained_in_one_line():
    message = out_of_memory(RuntimeError(XLA_OOM))
    assert message is not None and "\n" not in message
    assert "asked for 66.12GiB" in message and "batch size" in message and "remat" in message


@pytest.mark.parametrize("error, asked", [
    (RuntimeError(CPU_OOM), "asked for 4.69GiB"),
    (RuntimeError(CPU_INTERNAL_OOM), "asked for 1.00GiB"),
    (RuntimeError("INTERNAL: Out of memory"), None),
    (MemoryError(), None),
])
def test_cpu_and_host_out_of_memory_are_recognised(error, asked):
    message = out_of_memory(error)
    assert message is not None and "\n" not in message and "batch size" in message
    assert asked is None or asked in message, message


def test_a_real_cpu_out_of_memory_is_recognised():
    """An 8 GiB buffer in a process limited to 6 GiB of address space: the error XLA's CPU client really raises
    (nothing is allocated: the limit refuses it)."""
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "import jax, jax.numpy as jnp\n"
            "from scripts.common import out_of_memory\n"
            "try:\n"
            "    jax.jit(lambda: jnp.ones((8 << 30) // 4, jnp.float32))().block_until_ready()\n"
            "except Exception as e:\n"
            "    print('ERROR', type(e).__name__, str(e).splitlines()[0])\n"
            "    print('MESSAGE', out_of_memory(e))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                            capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert result.returncode == 0, tail(result.stderr)
    assert "MESSAGE out of memory (asked for 8.00GiB)" in result.stdout, result.stdout + tail(result.stderr)


def test_other_errors_are_left_alone():
    assert out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes differ")) is None
