"""What every command line shares: quiet third-party logs, config errors as exit code 2, list arguments, the
benchmarks' timer, JAX's persistent compilation cache and a clock of the time spent compiling."""

from __future__ import annotations

import argparse
import logging
import os
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


def add_timing_args(p: argparse.ArgumentParser, warmup: int, iters: int) -> None:
    """--warmup N (untimed calls first, which compile) and --iters N (timed calls per round): `seconds_per_call`'s
    settings, with a benchmark's own defaults."""
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    p.add_argument("--iters", type=int, default=iters, help=f"timed calls per round (default {iters})")


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


def process_age_s() -> float | None:
    """Seconds since this process started (from Linux's /proc; None where that is not available)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


DEFAULT_COMPILATION_CACHE = "~/.cache/meshlm/jax"
COMPILATION_CACHE_ENV = "MESHLM_COMPILATION_CACHE"


def add_compilation_cache_args(p: argparse.ArgumentParser) -> None:
    """--compilation-cache DIR / --no-compilation-cache (see `compilation_cache_path`)."""
    p.add_argument("--compilation-cache", metavar="DIR",
                   help=f"JAX's persistent compilation cache: compiled steps are kept here and reused by the next "
                        f"run (default ${COMPILATION_CACHE_ENV}, else {DEFAULT_COMPILATION_CACHE})")
    p.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh, store nothing")


def compilation_cache_path(args: argparse.Namespace) -> str | None:
    """The cache folder the command line asks for: None with --no-compilation-cache, else --compilation-cache, else
    $MESHLM_COMPILATION_CACHE (if set and not empty), else ~/.cache/meshlm/jax."""
    if args.no_compilation_cache:
        return None
    path = args.compilation_cache or os.environ.get(COMPILATION_CACHE_ENV) or DEFAULT_COMPILATION_CACHE
    return os.path.abspath(os.path.expanduser(path))


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
    """Turn on JAX's persistent compilation cache in folder `path` (created by JAX on the first write), for every
    compiled computation however small or quick to compile, so a second process reuses the first one's steps;
    None leaves JAX's settings alone. Call before the first compile: JAX opens the cache at its first compile
    (a later call with another folder reopens it there)."""
    if path is None:
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if jax.config.jax_compilation_cache_dir != path:  # JAX decides once per process whether (and where) it caches
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, whatever the filesystem


def use_compilation_cache(args: argparse.Namespace) -> str | None:
    """Turn on the cache folder the command line asks for (`compilation_cache_path`, `enable_compilation_cache`)
    and return it (None: no cache)."""
    path = compilation_cache_path(args)
    enable_compilation_cache(path)
    return path


class CompileClock:
    """Seconds JAX spends compiling in this process while the clock is open (tracing, lowering, and the backend
    compile or a persistent-cache read), with counts of backend compiles and of persistent-cache hits and misses,
    from `jax.monitoring`'s events. Use as a context manager; `snapshot()` reads it at any time."""

    TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
    BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compiles = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def _on_duration(self, event: str, duration: float, **_: object) -> None:
        if event == self.BACKEND_EVENT:
            self.compiles += 1
            self.seconds += duration
        elif event in self.TRACE_EVENTS:
            self.seconds += duration

    def _on_event(self, event: str, **_: object) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.cache_misses += 1

    def __enter__(self) -> CompileClock:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def snapshot(self) -> dict[str, float | int]:
        return {"compile_s": round(self.seconds, 3), "compiles": self.compiles,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}
