"""Training throughput and MFU of a preset: `python -m scripts.bench_train --preset small [--batch-size 16]`.

Times the jitted train step (forward, backward, AdamW update) on random tokens after a warm-up, so data loading
and compilation are excluded. MFU = tokens/s x FLOPs per token / device peak, where FLOPs per token come from
`scaling.accounting.flops_per_token`: 6 x (every weight matrix, LM head included) + 12 x layers x seq_len x
heads x head_dim for attention (not halved for the causal mask), i.e. the PaLM convention. The peak comes from
`scaling.hardware.peak_flops` (datasheet dense bf16/tf32 for GPUs, times the device count; a rough AVX2 estimate
for the whole CPU) or --peak-tflops (per device).

`--mesh data=2,fsdp=2,tensor=2` (repeatable: one JSON line per layout) times the step sharded over a device mesh;
`--cpu-devices 8` fakes 8 CPU devices (relative timings of layouts only: the fake devices share the cores)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from scripts.common import fail, out_of_memory, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, help="default: min(1024, the preset's max_seq_len)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE")
    p.add_argument("--peak-tflops", type=float, help="one device's peak")
    p.add_argument("--mesh", action="append", help="a layout to time, e.g. fsdp=4,tensor=2 (default: data=-1)")
    p.add_argument("--cpu-devices", type=int, help="fake this many CPU devices (sets XLA_FLAGS, JAX_PLATFORMS)")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    from model.presets import get_preset
    from parallel.mesh import parse_mesh
    from train.config import RunConfig, TrainConfig, apply_overrides

    try:
        model_cfg = get_preset(args.preset)
        seq_len = args.seq_len or min(1024, model_cfg.max_seq_len)
        cfg = apply_overrides(RunConfig(model_cfg, TrainConfig(batch_size=args.batch_size, seq_len=seq_len)),
                              args.overrides)
        meshes = [parse_mesh(m) for m in args.mesh or ["data=-1"]]
    except ValueError as e:
        fail(str(e))
    code = 0
    for mesh_cfg in meshes:
        try:
            result = bench(cfg, mesh_cfg, args.steps, args.peak_tflops)
        except ValueError as e:
            fail(str(e))
        except Exception as e:  # out of memory is reported per layout and the next one still runs
            if (message := out_of_memory(e)) is None:
                raise
            result, code = {"mesh": mesh_cfg.describe(), "batch_size": cfg.train.batch_size, "error": message}, 1
        print(json.dumps({"preset": args.preset, "device": jax.devices()[0].device_kind, **result}), flush=True)
    return code


def bench(cfg, mesh_cfg, steps: int, peak_tflops: float | None) -> dict:
    """Time `steps` train steps of `cfg` on `mesh_cfg` after two warm-up steps; returns the figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from parallel.sharding import batch_sharding, create_sharded_params
    from scaling.accounting import flops_per_token, param_count
    from scaling.hardware import peak_flops
    from train.optimizer import lr_schedule, make_optimizer
    from train.sharded import init_sharded_train_state, plan_mesh, sharded_train_step

    t = cfg.train
    optimizer = make_optimizer(t)
    plan = plan_mesh(cfg.model, mesh_cfg, optimizer, micro_batch=t.batch_size, seq_len=t.seq_len)
    _, params, _ = create_sharded_params(cfg.model, plan.mesh, plan.rules)
    state = init_sharded_train_state(params, optimizer, plan.state_shardings)
    step = sharded_train_step(plan.graphdef, optimizer, lr_schedule(t), plan.mesh, plan.rules, plan.state_shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (1, t.batch_size, t.seq_len + 1), dtype=np.int32)
    batch = jax.device_put(jnp.asarray(tokens), batch_sharding(plan.mesh, plan.rules))
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps

    dtype = str(cfg.model.compute_dtype)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dtype)
    if peak and jax.default_backend() != "cpu":
        peak *= plan.mesh.devices.size
    tokens_per_s = t.batch_size * t.seq_len / seconds
    fpt = flops_per_token(cfg.model, t.seq_len)
    return {"mesh": plan.mesh_cfg.describe(), "devices": plan.mesh.devices.size, "dtype": dtype,
            "params": param_count(cfg.model)["total"], "batch_size": t.batch_size, "seq_len": t.seq_len,
            "step_s": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 1),
            "model_tflops_per_s": round(tokens_per_s * fpt / 1e12, 4),
            "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None}


if __name__ == "__main__":
    sys.exit(main())
