"""Training throughput and MFU of a preset: `python -m scripts.bench_train --preset small [--batch-size 16]`.

Times the jitted train step (forward, backward, AdamW update) on random tokens after a warm-up, so data loading
and compilation are excluded. MFU = tokens/s x FLOPs per token / device peak, where FLOPs per token come from
`scaling.accounting.flops_per_token`: 6 x (every weight matrix, LM head included) + 12 x layers x seq_len x
heads x head_dim for attention (not halved for the causal mask), i.e. the PaLM convention. The peak comes from
`scaling.hardware.peak_flops` (datasheet dense bf16/tf32 for GPUs; a rough AVX2 estimate for CPUs) or
--peak-tflops."""

from __future__ import annotations

import argparse
import json
import sys
import time

from scripts.common import fail, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, help="default: min(1024, the preset's max_seq_len)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE")
    p.add_argument("--peak-tflops", type=float)
    args = p.parse_args(argv)
    setup_logging("WARNING")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model.presets import get_preset
    from model.transformer import create_model
    from scaling.accounting import flops_per_token, param_count
    from scaling.hardware import peak_flops
    from train.config import RunConfig, TrainConfig, apply_overrides
    from train.optimizer import lr_schedule, make_optimizer
    from train.step import init_train_state, make_train_step

    try:
        model_cfg = get_preset(args.preset)
        seq_len = args.seq_len or min(1024, model_cfg.max_seq_len)
        cfg = apply_overrides(RunConfig(model_cfg, TrainConfig(batch_size=args.batch_size, seq_len=seq_len)),
                              args.overrides)
    except ValueError as e:
        fail(str(e))
    graphdef, params = nnx.split(create_model(cfg.model))
    optimizer = make_optimizer(cfg.train)
    state = init_train_state(nnx.to_pure_dict(params), optimizer)
    step = make_train_step(graphdef, optimizer, lr_schedule(cfg.train))
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (1, args.batch_size, seq_len + 1), dtype=np.int32))
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps

    dtype = str(cfg.model.compute_dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(dtype)
    tokens_per_s = args.batch_size * seq_len / seconds
    fpt = flops_per_token(cfg.model, seq_len)
    result = {"preset": args.preset, "device": jax.devices()[0].device_kind, "dtype": dtype,
              "params": param_count(cfg.model)["total"], "batch_size": args.batch_size, "seq_len": seq_len,
              "step_s": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 1),
              "model_tflops_per_s": round(tokens_per_s * fpt / 1e12, 4),
              "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
