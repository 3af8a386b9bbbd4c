"""What every command line shares: quiet third-party logs, config errors as exit code 2, list arguments, and
the benchmarks' timer."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Callable


def setup_logging(level: str = "INFO") -> None:
    """Our logs at `level`; absl/orbax chatter only at WARNING and above."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def fail(message: str, code: int = 2) -> None:
    """Print `message` as a command-line error and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def ints(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. "1024,4096"."""
    return [int(x) for x in text.split(",") if x]


def seconds_per_call(fn: Callable, *args, warmup: int, iters: int, rounds: int = 3) -> float:
    """The best of `rounds` averages over `iters` back-to-back calls of `fn(*args)`, after `warmup` calls (which
    compile it: JAX's Pallas-Triton and deprecation warnings are silenced there)."""
    import jax

    from model.kernels.triton import triton_deprecation_ignored

    with triton_deprecation_ignored(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def _size(number: str, unit: str) -> str:
    """"66.12GiB" as XLA wrote it, or a byte count ("5033164800 bytes") in GiB."""
    if unit.lower().startswith("byte"):
        return f"{int(number) / 2**30:.2f}GiB"
    return f"{number}{unit}"


def out_of_memory(error: BaseException) -> str | None:
    """A one-line explanation if `error` is running out of memory, else None: what was asked for and what to
    change, instead of XLA's allocator dump. Knows the GPU/TPU form (`RESOURCE_EXHAUSTED: Out of memory while
    trying to allocate 66.12GiB`), the CPU forms (`RESOURCE_EXHAUSTED: Out of memory allocating N bytes`,
    `INTERNAL: ... Out of memory`) and Python's MemoryError."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text
            or re.search(r"out[ _]of[ _]memory", text, re.IGNORECASE)):
        return None
    asked = re.search(r"allocat\w* ([\d.]+)\s*([KMGT]i?B|bytes?)\b", text)
    return (f"out of memory{f' (asked for {_size(*asked.groups())})' if asked else ''}: lower the batch size, set "
            f"model.remat=full (or dots), or shard the state with a mesh (e.g. --mesh fsdp=N)")
