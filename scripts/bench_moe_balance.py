"""Aux-loss-free balancing on a toy task: `python -m scripts.bench_moe_balance`.

Trains the `tiny` preset with DeepSeekMoE layers (sigmoid router, --experts experts, top --top-k, dropless) on
arithmetic sequences (token t = start + stride * t mod vocab, start and stride random per row) twice from the same
deliberately skewed router: the router columns of the first --skewed experts are scaled by --skew, so those
experts' sigmoid affinities saturate at 1 for about half the tokens and they take most assignments. Run "plain"
keeps the selection bias at zero (no balancing loss either); run "bias" updates it after each step by --rate x
sign(mean load - load) (train/step.py). Prints one JSON line per --every steps per run: the step, the worst
layer's max/mean expert load in that step's forward (one batch's count: noisy), its mean over the steps since the
previous line (`window_mean`), and the loss."""

from __future__ import annotations

import argparse
import json
import sys

from scripts.common import fail, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25, help="print every this many steps")
    p.add_argument("--rate", type=float, default=0.01, help="bias update rate of the 'bias' run")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--skewed", type=int, default=2, help="how many experts the router starts skewed onto")
    p.add_argument("--skew", type=float, default=30.0, help="scale of the skewed experts' router columns")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if args.steps < 1 or args.every < 1 or not 0 < args.skewed < args.experts:
        fail("--steps and --every must be >= 1, and --skewed between 1 and --experts - 1")

    import jax
    from flax import nnx

    from model.config import MoEConfig
    from model.presets import get_preset
    from model.transformer import create_model
    from train.config import TrainConfig
    from train.optimizer import lr_schedule, make_optimizer
    from train.step import init_train_state, make_train_step

    train_cfg = TrainConfig(steps=args.steps + 1, warmup_steps=10, lr=args.lr, batch_size=args.batch_size,
                            seq_len=args.seq_len)
    vocab = get_preset("tiny").vocab_size

    def batch(step: int) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(args.seed), step)
        start_B, stride_B = (jax.random.randint(k, (args.batch_size, 1), 0, hi)
                             for k, hi in zip(jax.random.split(key), (vocab, 8), strict=True))
        return ((start_B + (stride_B + 1) * jax.numpy.arange(args.seq_len + 1)) % vocab)[None]

    for run, rate in (("plain", 0.0), ("bias", args.rate)):
        moe = MoEConfig(n_experts=args.experts, top_k=args.top_k, router="sigmoid", dispatch="dropless",
                        aux_loss_weight=0.0, z_loss_weight=0.0, bias_update_rate=rate)
        cfg = get_preset("tiny").replace(dtype="float32", max_seq_len=args.seq_len, moe=moe)
        graphdef, state = nnx.split(create_model(cfg, seed=args.seed))
        params = nnx.to_pure_dict(state)
        router = params["blocks"]["mlp"]["router"]  # [L, D, E]
        params["blocks"]["mlp"]["router"] = router.at[..., :args.skewed].multiply(args.skew)
        optimizer = make_optimizer(train_cfg)
        step_fn = make_train_step(graphdef, optimizer, lr_schedule(train_cfg))
        train_state, window = init_train_state(params, optimizer), []
        for step in range(args.steps + 1):
            train_state, metrics = step_fn(train_state, batch(step))
            window.append(float(metrics["load_max_over_mean"]))
            if step % args.every == 0 or step == args.steps:
                print(json.dumps({"run": run, "step": step, "rate": rate, "load_max_over_mean": round(window[-1], 4),
                                  "window_mean": round(sum(window) / len(window), 4),
                                  "loss": round(float(metrics["loss"]), 4)}), flush=True)
                window = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
