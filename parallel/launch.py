"""Start N processes of one command on this machine as one multi-process JAX run (what `srun` does on a
cluster): each gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`parallel.distributed.resolve_distributed`), and either its own fake CPU devices or its own GPUs.

Output lines are prefixed with the process index. If a process fails, the others are stopped, so a crash never
leaves the rest waiting forever on a collective."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO


def free_port() -> int:
    """A TCP port that is free on localhost now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, n_processes: int, port: int, *, cpu_devices: int | None = None,
                gpus_per_process: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index`: the coordinator at localhost:`port` (process 0 listens on 127.0.0.1
    only, see `parallel.distributed.coordinator_bind_address`), and either `cpu_devices` fake CPU devices
    (JAX_PLATFORMS=cpu) or GPUs [index * g, (index + 1) * g) via CUDA_VISIBLE_DEVICES."""
    if cpu_devices is not None and gpus_per_process is not None:
        raise ValueError("give cpu_devices or gpus_per_process, not both")
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n_processes),
               JAX_PROCESS_ID=str(index))
    if cpu_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    if gpus_per_process is not None:
        first = index * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
    return env


NOISE = ("[Gloo] Rank ",)  # gloo reports every connection it makes on stderr


def _forward(stream: TextIO, prefix: str, sink: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        if line.startswith(NOISE):
            continue
        with lock:
            sink.write(f"{prefix}{line}")
            sink.flush()


def launch_local(command: Sequence[str], n_processes: int, *, cpu_devices: int | None = None,
                 gpus_per_process: int | None = None, port: int | None = None, sink: TextIO | None = None,
                 timeout: float | None = None) -> int:
    """Run `command` as processes 0..n-1 of one run; returns 0, or the first failing process's exit code
    (124 if `timeout` seconds pass), having stopped the others."""
    if n_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {n_processes}")
    if not command:
        raise ValueError("no command to launch")
    port = port or free_port()
    sink = sink or sys.stdout
    lock = threading.Lock()
    procs, threads = [], []
    for i in range(n_processes):
        env = process_env(i, n_processes, port, cpu_devices=cpu_devices, gpus_per_process=gpus_per_process)
        proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        thread = threading.Thread(target=_forward, args=(proc.stdout, f"[{i}] ", sink, lock), daemon=True)
        thread.start()
        procs.append(proc)
        threads.append(thread)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    while [p.poll() for p in procs].count(None):  # poll every process, not just until the first running one
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        timed_out = deadline is not None and time.monotonic() > deadline
        if failed or timed_out:
            code = failed[0] if failed else 124
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for t in threads:
        t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)
