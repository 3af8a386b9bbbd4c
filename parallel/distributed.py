"""Joining a multi-process (multi-host) run: `jax.distributed.initialize` from flags, environment variables, or
JAX's own cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU).

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of all processes and
a mesh over them spans hosts; `jax.process_index() == 0` is the one process that writes shared files.

Sources, first match wins for each value: explicit arguments (the CLI's `--coordinator`, `--num-processes`,
`--process-id`), then `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. With none of them set,
a multi-task SLURM or Open MPI job (SLURM_NTASKS or OMPI_COMM_WORLD_SIZE > 1) initializes with JAX's
auto-detection, so `srun python -m scripts.train ...` needs no flags; anything else runs as a single process.

Process 0 opens the coordinator's listening socket. A coordinator on this machine's loopback (`localhost`,
`127.x.x.x`, `::1`: what `scripts.launch_local` uses) listens on the loopback only; for any other address the user
named a host the other machines must reach, and JAX's default (every interface) applies. JAX_COORDINATOR_BIND_ADDRESS
(host:port) overrides both.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a run: `auto` defers to JAX's cluster detection; otherwise all three of
    coordinator ("host:port" of process 0), num_processes and process_id are given, or none (single process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in ENV if getattr(self, k) is not None}
        if self.auto and given:
            raise ValueError(f"distributed: auto-detection and explicit {sorted(given)} exclude each other")
        if given and len(given) != len(ENV):
            missing = sorted(set(ENV) - set(given))
            raise ValueError(f"distributed: {sorted(given)} given but {missing} missing; give all of "
                             f"--coordinator, --num-processes, --process-id (or {', '.join(ENV.values())})")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed: num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 0):
            raise ValueError(f"distributed: process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.coordinator is not None and not _is_host_port(self.coordinator):
            raise ValueError(f"distributed: coordinator must be host:port, got {self.coordinator!r}")

    @property
    def multi_process(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit())


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


def resolve_distributed(coordinator: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistributedConfig:
    """The DistributedConfig from explicit values, else the JAX_* variables of `env` (default: os.environ), else
    auto-detection inside a multi-task SLURM / Open MPI job, else a single process."""
    env = os.environ if env is None else env
    values = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if values[key] is None and env.get(var):
            values[key] = env[var] if key == "coordinator" else _int(var, env[var])
    if any(v is not None for v in values.values()):
        return DistributedConfig(**values)
    cluster = any(_int(var, env[var]) > 1 for var in CLUSTER_SIZE_ENV if env.get(var))
    return DistributedConfig(auto=cluster)


def coordinator_bind_address(coordinator: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where process 0's coordinator service listens for `coordinator` ("host:port"): JAX_COORDINATOR_BIND_ADDRESS
    of `env` (default: os.environ) if set; the loopback address for a loopback host (`localhost` -> 127.0.0.1);
    None (JAX's default: every interface) for any other host."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return env["JAX_COORDINATOR_BIND_ADDRESS"]
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        return f"127.0.0.1:{port}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not ip.is_loopback:
        return None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def initialize(cfg: DistributedConfig) -> None:
    """Join the run `cfg` describes (nothing to do for a single process). On CPU, cross-process collectives
    go through gloo. Must run before anything touches a JAX device."""
    if not cfg.multi_process:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects only the CPU backend
    if cfg.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id,
                                   coordinator_bind_address=coordinator_bind_address(cfg.coordinator))
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
