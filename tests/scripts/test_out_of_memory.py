"""XLA's out-of-memory error becomes one line naming what was asked for and what to change."""

from scripts.common import out_of_memory

XLA_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 66.12GiB with allocator GPU_0_bfc on device "
           "0. [tf-allocator-allocation-error=''] [executable_name='jit_step']")


def test_out_of_memory_is_explained_in_one_line():
    message = out_of_memory(RuntimeError(XLA_OOM))
    assert message is not None and "\n" not in message
    assert "asked for 66.12GiB" in message and "batch size" in message and "remat" in message


def test_other_errors_are_left_alone():
    assert out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes differ")) is None
