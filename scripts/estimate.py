"""What training a model costs, before running it: `python -m scripts.estimate --preset 7b
[--hf-config path/config.json] [--layout data=2,fsdp=4,tensor=1] [--micro-batch 1 --seq-len 4096]`.

Prints parameters (total and, for MoE, active), FLOPs per token, training memory per device, bytes each device
sends per step for each parallel dimension, for MoE the all-to-all bytes per token and MoE layer, and KV-cache
bytes per token (MLA: its latent), all from `scaling.accounting` (no model is built, no device is used).
`--layout` names the size of each parallel dimension (data, fsdp, tensor, stage, sequence, expert); unnamed
ones are 1. A bad preset, config, layout or option exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from scripts.common import fail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7b", help="model preset (tiny, small, 125m, 350m, 1b, 7b)")
    p.add_argument("--hf-config", help="a Hugging Face config.json (Llama, Mistral, Qwen2, Mixtral, Qwen3-MoE, "
                                       "DeepSeek-V3); replaces --preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model field, e.g. model.n_layers=48 (repeatable)")
    p.add_argument("--layout", default="", help="parallel sizes, e.g. data=2,fsdp=4,tensor=2 (default: 1 device)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--microbatches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation, or with stage > 1 the "
                        "pipeline's micro-batches, one flush per step)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--remat", default="none", help="activation recomputation: none, selective or full")
    p.add_argument("--param-bytes", type=int, default=4, help="bytes per parameter (and gradient)")
    p.add_argument("--compute-bytes", type=int, default=2, help="bytes per activation element")
    p.add_argument("--sequence-impl", default="ulysses", help="sequence parallelism: ulysses or ring")
    p.add_argument("--kv-dtype", default="bfloat16", help="KV-cache dtype")
    p.add_argument("--budget", type=float, help="design the compute-optimal model for this many FLOPs, e.g. 1e21")
    p.add_argument("--gpu-hours", type=float, help="... or for this many GPU-hours (with --gpu and --mfu)")
    p.add_argument("--gpu", default="H100")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--law", default="besiroglu",
                   help="loss law for --budget: besiroglu (2024 refit), hoffmann (2022), or a JSON file of E,A,B,"
                        "alpha,beta")
    p.add_argument("--device-gib", type=float, default=80, help="device memory for --budget's smallest layout")
    return p.parse_args(argv)


def load_model_config(args: argparse.Namespace):
    """The ModelConfig named by --preset or --hf-config, with --set overrides applied."""
    from model.hf import config_from_hf
    from model.presets import get_preset
    from train.config import RunConfig, TrainConfig, apply_overrides

    if args.hf_config:
        try:
            with open(args.hf_config) as f:
                cfg = config_from_hf(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--hf-config {args.hf_config!r}: {e}") from None
    else:
        cfg = get_preset(args.preset)
    bad = [item for item in args.overrides if not item.strip().startswith("model.")]
    if bad:
        raise ValueError(f"--set {bad[0]!r}: only model.KEY=VALUE overrides apply here")
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))  # unused: apply_overrides needs one
    return apply_overrides(RunConfig(model=cfg, train=train), args.overrides).model


LAWS = {"besiroglu": dict(E=1.817, A=482.0, B=2085.4, alpha=0.3478, beta=0.3658),
        "hoffmann": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)}


def design_for_budget(args: argparse.Namespace):
    """The compute-optimal design for --budget or --gpu-hours under --law."""
    from scaling.design import budget_flops, design
    from scaling.laws import LossLaw

    if args.law in LAWS:
        law = LossLaw(**LAWS[args.law])
    else:
        try:
            with open(args.law) as f:
                law = LossLaw(**json.load(f))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--law {args.law!r}: expected besiroglu, hoffmann or a JSON file of E, A, B, alpha, "
                             f"beta ({e})") from None
    flops = budget_flops(flops=args.budget, gpu_hours=args.gpu_hours, gpu=args.gpu, mfu=args.mfu)
    return design(law, flops, device_bytes=args.device_gib * 2**30, max_seq_len=args.seq_len or 2048)


def _bytes(n: float) -> str:
    unit = next((u for u, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= size),
                "B")
    scale = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[unit]
    return f"{n:>20,.0f}  {n / scale:>9.2f} {unit}"


def _count(n: float) -> str:
    return f"{n:>20,.0f}  {n / 1e9:>9.3f} B"


def _attention(cfg) -> str:
    if not cfg.mla.enabled:
        return f"{cfg.n_heads} heads ({cfg.n_kv_heads} KV) x {cfg.head_dim}"
    m = cfg.mla
    query = f"q_lora {m.q_lora_rank}" if m.q_lora_rank else "full-rank q"
    return (f"MLA {cfg.n_heads} heads x qk {m.qk_nope_head_dim}+{m.qk_rope_head_dim}, v {m.v_head_dim}, "
            f"kv_lora {m.kv_lora_rank}, {query}")


def render(rows: list[tuple[str, str]], title: str) -> str:
    return "\n".join([title] + [f"  {name:<24}{value}" for name, value in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from scaling.accounting import (
        Layout,
        comm_bytes,
        expert_all_to_all_bytes,
        flops_per_token,
        kv_cache_bytes,
        moe_layers,
        param_count,
        train_memory,
    )

    try:
        designed = design_for_budget(args) if args.budget or args.gpu_hours else None
        cfg = designed.model if designed else load_model_config(args)
        layout = designed.layout if designed and not args.layout else Layout.parse(args.layout)
        seq_len = args.seq_len or cfg.max_seq_len
        params = param_count(cfg)
        flops = {"training": flops_per_token(cfg, seq_len),
                 "training, causal halved": flops_per_token(cfg, seq_len, causal_halved=True),
                 "forward": flops_per_token(cfg, seq_len, training=False)}
        memory = train_memory(cfg, layout, args.micro_batch, seq_len, optimizer=args.optimizer, remat=args.remat,
                              param_bytes=args.param_bytes, compute_bytes=args.compute_bytes,
                              pipeline_microbatches=args.microbatches if layout.stage > 1 else 1)
        comm = comm_bytes(cfg, layout, args.micro_batch, seq_len, n_microbatches=args.microbatches,
                          sequence_impl=args.sequence_impl, param_bytes=args.param_bytes,
                          compute_bytes=args.compute_bytes)
        kv = kv_cache_bytes(cfg, 1, args.kv_dtype)
        all_to_all = expert_all_to_all_bytes(cfg, layout.expert, 1, seq_len, args.compute_bytes)
    except (ValueError, TypeError) as e:
        fail(str(e))

    name = "designed" if designed else args.hf_config or args.preset
    if designed:
        print(f"budget  {designed.flops:.3e} FLOPs -> N_opt {designed.n_opt:.4g} parameters, D_opt "
              f"{designed.d_opt:.4g} tokens ({designed.d_opt / designed.n_opt:.1f} tokens/parameter); the model below "
              f"has {designed.params:,} (predicted loss {designed.predicted_loss:.3f}); smallest layout on "
              f"{args.device_gib:g} GiB devices at micro-batch 1, full remat")
    sizes = " ".join(f"{axis}={getattr(layout, axis)}" for axis in ("data", "fsdp", "tensor", "stage", "sequence",
                                                                      "expert"))
    print(f"model   {name}: d_model {cfg.d_model}, {cfg.n_layers} layers, {_attention(cfg)}, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'}{', qkv bias' if cfg.qkv_bias else ''}")
    if cfg.moe.enabled:
        moe = cfg.moe
        shared = f", {moe.n_shared_experts} shared" if moe.n_shared_experts else ""
        dense = f" after {moe.first_dense_layers} dense" if moe.first_dense_layers else ""
        print(f"moe     {moe.n_experts} experts, top {moe.top_k}, hidden {moe.expert_d_ff(cfg.d_ff)}{shared}, "
              f"{moe.dispatch} dispatch; {moe_layers(cfg)} MoE layers{dense}")
    print(f"layout  {sizes} ({layout.devices} devices); micro-batch {args.micro_batch} x {seq_len} tokens, "
          f"{args.microbatches} micro-batch(es) per step")
    print()
    print(render([(k.replace("_", "-"), _count(v)) for k, v in params.items()], "parameters"))
    print(render([(k, f"{v:>20.4g}") for k, v in flops.items()], f"FLOPs per token at seq_len {seq_len}"))
    print(render([(k, _bytes(v)) for k, v in memory.items()],
                 f"training memory per device ({args.optimizer}, remat {args.remat}, "
                 f"{args.param_bytes}-byte params, {args.compute_bytes}-byte activations)"))
    print(render([(k, _bytes(v)) for k, v in comm.items()],
                 f"bytes sent per device per step (ring collectives; sequence: {args.sequence_impl})"))
    if cfg.moe.enabled:
        print(render([("per token, one layer", _bytes(all_to_all)),
                       (f"x {moe_layers(cfg)} MoE layers", _bytes(all_to_all * moe_layers(cfg)))],
                     f"expert all-to-all sent per device, forward (dispatch + combine, expert={layout.expert}, "
                     f"{args.compute_bytes}-byte activations)"))
    print(render([("per token", _bytes(kv)), (f"x {seq_len} tokens", _bytes(kv * seq_len))],
                 f"KV cache ({args.kv_dtype}{', MLA latent' if cfg.mla.enabled else ''})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
