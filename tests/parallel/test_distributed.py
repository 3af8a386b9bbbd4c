"""Joining a multi-process run: which values come from flags, environment and cluster detection; bad values fail
naming themselves; the local launcher gives each process its own identity and devices and stops the rest when
one fails."""

import io
import sys

import pytest

from parallel.distributed import DistributedConfig, resolve_distributed
from parallel.launch import launch_local, process_env
from tests.subprocesses import HANG_LIMIT_S


def test_flags_override_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "head:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_distributed(env=env) == DistributedConfig("head:1234", 4, 3)
    assert resolve_distributed(process_id=1, env=env) == DistributedConfig("head:1234", 4, 1)
    assert resolve_distributed(env={}) == DistributedConfig()
    assert not resolve_distributed(env={}).multi_process


def test_slurm_and_open_mpi_jobs_use_jax_auto_detection():
    assert resolve_distributed(env={"SLURM_NTASKS": "16"}) == DistributedConfig(auto=True)
    assert resolve_distributed(env={"OMPI_COMM_WORLD_SIZE": "2"}).multi_process
    assert not resolve_distributed(env={"SLURM_NTASKS": "1"}).multi_process  # one task: nothing to join
    # Explicit values win over the cluster.
    env = {"SLURM_NTASKS": "16", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert resolve_distributed(env=env) == DistributedConfig("h:1", 2, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="h:1"), r"\['coordinator'\] given but \['num_processes', 'process_id'\] missing"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), r"process_id must be in \[0, 2\), got 2"),
    (dict(coordinator="nohost", num_processes=2, process_id=0), "coordinator must be host:port, got 'nohost'"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), "num_processes must be >= 1, got 0"),
])
def test_bad_values_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_distributed(**kwargs, env={})


def test_bad_environment_value_is_named():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        resolve_distributed(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


def test_process_env_gives_identity_and_devices():
    env = process_env(1, 2, 5555, cpu_devices=4, base={"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:5555"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("2", "1", "cpu")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert process_env(2, 4, 1, gpus_per_process=2, base={})["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_launcher_prefixes_output_and_stops_the_others_on_failure():
    script = ("import os, sys, time\n"
              "rank = int(os.environ['JAX_PROCESS_ID'])\n"
              "print('hello from', rank, flush=True)\n"
              "sys.exit(3) if rank == 1 else time.sleep(3600)\n")
    out = io.StringIO()
    code = launch_local([sys.executable, "-c", script], 2, sink=out, timeout=HANG_LIMIT_S)
    assert code == 3, out.getvalue()  # process 1's code: process 0, sleeping for an hour, was stopped
    assert sorted(out.getvalue().splitlines()) == ["[0] hello from 0", "[1] hello from 1"]
