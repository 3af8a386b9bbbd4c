"""Run a command as N local processes of one multi-process JAX run, for testing multi-host code on one machine:

    python -m scripts.launch_local -n 2 --cpu-devices 4 -- \
        python -m scripts.train --preset tiny --mesh data=2,fsdp=2,tensor=2 --steps 3 --out runs/mp

Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (scripts.train reads them) and
either --cpu-devices fake CPU devices (collectives over gloo) or --gpus-per-process GPUs of this machine."""

from __future__ import annotations

import argparse
import sys

from scripts.common import fail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    devices = p.add_mutually_exclusive_group()
    devices.add_argument("--cpu-devices", type=int, help="fake CPU devices per process (JAX_PLATFORMS=cpu)")
    devices.add_argument("--gpus-per-process", type=int, help="GPUs per process (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--port", type=int, help="coordinator port, listening on 127.0.0.1 only (default: a free one)")
    p.add_argument("--timeout", type=float, help="stop every process after this many seconds (exit 124)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    from parallel.launch import launch_local

    for name in ("processes", "cpu_devices", "gpus_per_process"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not command:
        fail("give the command to run after --, e.g. -- python -m scripts.train ...")
    return launch_local(command, args.processes, cpu_devices=args.cpu_devices,
                        gpus_per_process=args.gpus_per_process, port=args.port, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
