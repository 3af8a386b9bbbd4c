"""Serving benchmark: one seeded workload through the continuous-batching engine and the static-batching baseline.

    python -m scripts.bench_serving --preset small --requests 200 --rates inf,4,16

Prompt and output lengths are drawn from log-normal (long-tailed) distributions, clipped to the model's context.
Each rate is a scenario: `inf` submits every request at once, a number is a Poisson stream of that many
requests per second. Printed per scenario and server: output tokens/s, TTFT and TPOT percentiles (ms), and KV
utilisation (tokens stored / token slots reserved, averaged over steps): the engine's paged cache against
what a contiguous max-length reservation would hold for the same running sequences. A page shared through the
prefix cache counts once per sequence reading it, so with shared prefixes the paged figure can exceed 1. The
model is a preset with random weights (`--run` uses a trained one); greedy decoding, so both servers produce the
same tokens.
`--shared-prefix N` starts every prompt with the same N tokens (a system prompt), which the engine's prefix cache
computes once (`--no-prefix-caching` turns the cache off); the cache is emptied after the warm-up run.

Both servers get the same KV memory: what static batching reserves, `--max-running` sequences of the model's
full context. Static batching can run no more sequences in it; the paged engine can, since it holds only the
tokens computed so far: `--engine-max-running 64` lets it (the comparison of the vLLM paper).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from scripts.common import fail, setup_logging


def workload(n: int, max_len: int, seed: int, prompt_median: int, output_median: int) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs: log-normal with sigma 0.8, clipped so prompt + output <= max_len."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(prompt_median), 0.8, n).astype(int), 1, max_len // 2)
    outputs = np.clip(rng.lognormal(np.log(output_median), 0.8, n).astype(int), 1, max_len // 2)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": round(float(np.percentile(values, q)) * 1000, 2) for q in (50, 90, 99)}


def summarize(name: str, completions: list, seconds: float, kv: dict) -> dict:
    tokens = sum(len(c.token_ids) for c in completions)
    return {"server": name, "requests": len(completions), "output_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "ttft_ms": percentiles([c.ttft_s for c in completions if c.ttft_s is not None]),
            "tpot_ms": percentiles([c.tpot_s for c in completions if c.tpot_s is not None]), **kv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--run", help="a trained run directory instead of a random-weight preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rates", default="inf", help="comma-separated: inf (all at once) or requests per second")
    p.add_argument("--prompt-median", type=int, default=48)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--max-running", type=int, default=16, help="static: batch size; engine: running sequences")
    p.add_argument("--engine-max-running", type=int,
                   help="the engine's running sequences (default --max-running), in the same KV memory as the "
                        "static batches' contiguous reservation: --max-running x the model's context")
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-impl", default="pallas", choices=("pallas", "reference"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--servers", default="engine,static")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--no-prefix-caching", action="store_true", help="the engine recomputes shared prefixes")
    args = p.parse_args(argv)
    setup_logging("WARNING")

    import jax

    from model.presets import get_preset
    from model.transformer import create_model
    from serve.engine import Engine, Request, ServeConfig
    from serve.static import StaticBatcher
    from train.config import RunConfig, TrainConfig, apply_overrides

    try:
        rates = [float(r) for r in args.rates.split(",")]
        if args.run:
            from train.loop import load_params

            _, model = load_params(args.run)
        else:
            cfg = apply_overrides(RunConfig(get_preset(args.preset), TrainConfig()), args.overrides).model
            model = create_model(cfg)
    except ValueError as e:
        fail(str(e))
    cfg = model.cfg
    if not 0 <= args.shared_prefix <= cfg.max_seq_len // 2:
        fail(f"--shared-prefix must be in [0, {cfg.max_seq_len // 2}] (half the context), got {args.shared_prefix}")
    shapes = workload(args.requests, cfg.max_seq_len - args.shared_prefix, args.seed, args.prompt_median,
                      args.output_median)
    rng = np.random.default_rng(args.seed + 1)
    prefix = rng.integers(3, cfg.vocab_size, args.shared_prefix).tolist()
    requests = [Request(tuple(prefix + rng.integers(3, cfg.vocab_size, n).tolist()), m, request_id=f"r{i}")
                for i, (n, m) in enumerate(shapes)]
    device = jax.devices()[0].device_kind
    kv_pages = 1 + args.max_running * -(-cfg.max_seq_len // args.page_size)  # static's memory, plus the null page
    print(json.dumps({"device": device, "preset": args.run or args.preset, "requests": len(requests),
                      "kv_token_slots": (kv_pages - 1) * args.page_size,
                      "engine_max_running": args.engine_max_running or args.max_running,
                      "shared_prefix": args.shared_prefix, "prefix_caching": not args.no_prefix_caching,
                      "mean_prompt": float(np.mean([len(r.prompt_ids) for r in requests])),
                      "mean_output": float(np.mean([m for _, m in shapes])), "max_seq_len": cfg.max_seq_len}))
    for rate in rates:
        arrivals = None if rate == float("inf") else np.cumsum(rng.exponential(1 / rate, len(requests))).tolist()
        for name in args.servers.split(","):
            if name == "engine":
                server = Engine(model, ServeConfig(page_size=args.page_size, num_pages=kv_pages,
                                                   max_running=args.engine_max_running or args.max_running,
                                                   token_budget=args.token_budget, decode_impl=args.decode_impl,
                                                   prefix_caching=not args.no_prefix_caching))
            elif name == "static":
                server = StaticBatcher(model, batch_size=args.max_running, page_size=args.page_size,
                                       decode_impl=args.decode_impl)
            else:
                fail(f"unknown server {name!r}; use engine and/or static")
            if name == "engine":
                server.warmup()  # every shape bucket compiled before the clock starts
            server.generate(requests)  # warm-up run: the static batcher compiles its batches' shapes here
            if name == "engine":
                server.kv_samples.clear()
                server.reset_prefix_cache()
            start = time.perf_counter()
            completions = server.generate(requests, arrivals_s=arrivals)
            seconds = time.perf_counter() - start
            if name == "engine":
                stored, allocated, contiguous = (np.array(x, float) for x in zip(*server.kv_samples, strict=True))
                kv = {"kv_util_paged": round(float(np.mean(stored / allocated)), 4),
                      "kv_util_contiguous": round(float(np.mean(stored / contiguous)), 4),
                      "preemptions": sum(c.num_preemptions for c in completions),
                      "cached_prompt_tokens": sum(c.num_cached_tokens for c in completions)}
            else:
                kv = {"kv_util_contiguous": round(float(np.mean(server.kv_utilisation_samples)), 4)}
            result = summarize(name, completions, seconds, kv)
            print(json.dumps({"rate": "all at once" if arrivals is None else rate, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
