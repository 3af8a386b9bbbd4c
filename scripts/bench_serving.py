"""Serving benchmark: one seeded workload through the continuous-batching engine and the static-batching baseline
(and, with `--peer hf`, Hugging Face transformers' `generate`).

    python -m scripts.bench_serving --preset small --requests 200 --rates inf,4,16
    python -m scripts.bench_serving --preset tiny --requests 16 --servers engine --peer hf --set serve.page_size=8

Prompt and output lengths are drawn from log-normal (long-tailed) distributions, clipped to the model's context.
Each rate is a scenario: `inf` submits every request at once, a number is a Poisson stream of that many
requests per second. Printed per scenario and server: output tokens/s, TTFT and TPOT percentiles (ms), and KV
utilisation (tokens stored / token slots reserved, averaged over steps): the engine's paged cache against
what a contiguous max-length reservation would hold for the same running sequences. A page shared through the
prefix cache counts once per sequence reading it, so with shared prefixes the paged figure can exceed 1. The
model is a preset with random weights (`--set model.FIELD=VALUE` reshapes it; `--run` uses a trained one); greedy
decoding and no stop tokens, so every request generates exactly its drawn output length and the servers produce
the same tokens.
`--shared-prefix N` starts every prompt with the same N tokens (a system prompt), which the engine's prefix cache
computes once (`--no-prefix-caching` turns the cache off); the cache is emptied after the warm-up run.

Both servers get the same KV memory: what static batching reserves, `--max-running` sequences of the model's
full context (unless `--set serve.num_pages`/`memory_bytes`/`memory_fraction` sizes the engine's cache). Static
batching can run no more sequences in it; the paged engine can, since it holds only the tokens computed so far:
`--engine-max-running 64` lets it (the comparison of the vLLM paper). Every engine setting is `--set
serve.FIELD=VALUE`, with ServeConfig's defaults; `--page-size`, `--max-running`, `--token-budget`, `--kv-pages`,
`--decode-impl` are shorthands.

Times: the header line has the model's load (or random init) time; each server's line its warm-up figures --
`warmup_s` (the engine's up-front compiles), `warm_run_s` (warm-up plus one untimed pass over the workload),
`compile_s`/`compiles`/`cache_hits` (JAX's tracing and compiling in those, and how many came from the persistent
compilation cache, on by default: see scripts/common.py), `engine_compile_s` (the engine's own clock) and
`compiles_in_timed_run` (0 in steady state) -- and then the timed run's throughput and latencies.

`--peer hf` serves the same requests with transformers (scripts/hf_peer.py: the same weights through
`save_hf`/`from_pretrained`, float32 on the CPU, static batches of `--max-running`, left padding, greedy, EOS off)
at rate inf (torch's threads: `--hf-threads`, by default the faster of one and torch's default on the warm-up
batch: on a busy 2-core machine two OpenMP threads ran a forward 10x slower than one), and prints a last line
comparing useful output tokens/s (each request's own tokens only, not its
batch's padding) of the engine and HF, their ratio, and how many requests got the same greedy tokens from both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from scripts.common import CompileClock, add_compilation_cache_args, fail, setup_logging, use_compilation_cache
from scripts.serve_flags import (
    add_serve_args,
    load_draft_model,
    serve_changes,
    serve_config,
    serve_default,
    split_overrides,
)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--run", help="a trained run directory instead of a random-weight preset")
    add_serve_args(p, other_sections="model (with --preset)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rates", default="inf", help="comma-separated: inf (all at once) or requests per second")
    p.add_argument("--prompt-median", type=int, default=48)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--engine-max-running", type=int,
                   help="the engine's running sequences (default --max-running), in the same KV memory as the "
                        "static batches' contiguous reservation: --max-running x the model's context")
    p.add_argument("--seed", type=int, default=0, help="the workload's seed")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the engine's up-front compile of every step shape; the untimed warm-up pass over the "
                        "workload still compiles the shapes it needs")
    p.add_argument("--servers", default="engine,static", help="comma-separated: engine, static, hf")
    p.add_argument("--peer", choices=("hf",), help="also serve the workload with this peer (hf: transformers "
                                                   "generate, static batches of --max-running; at rate inf)")
    p.add_argument("--hf-threads", default="auto",
                   help="torch threads of the hf peer: a number, or auto (the faster of 1 and torch's default on "
                        "the warm-up batch)")
    p.add_argument("--tokens-out", help="write every request's output tokens here (JSONL: server, rate, id, "
                                        "token_ids)")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--no-prefix-caching", action="store_true", help="the engine recomputes shared prefixes")
    add_compilation_cache_args(p)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, model_overrides: list[str]):
    """The model to serve: --run's trained one, or --preset's with random weights and the model.* overrides."""
    from model.presets import get_preset
    from model.transformer import create_model
    from train.config import RunConfig, TrainConfig, apply_overrides

    if args.run:
        if model_overrides:
            raise ValueError("--set model.* applies to --preset, not to --run's trained model")
        from train.loop import load_params

        return load_params(args.run)[1]
    training = TrainConfig(seq_len=1, batch_size=1)  # a serving benchmark: no training shape to reconcile
    return create_model(apply_overrides(RunConfig(get_preset(args.preset), training), model_overrides).model)


def run_server(name: str, server, requests: list, arrivals: list[float] | None, warmup: bool = True
               ) -> tuple[list, float, dict]:
    """Warm `server` up (the engine: every step shape it compiles up front, then the workload once; static: the
    workload once), then serve the workload timed. Returns the completions, the seconds, and the warm-up figures."""
    warm: dict = {}
    with CompileClock() as clock:
        start = time.perf_counter()
        compiled_before = getattr(server, "compile_s", None)
        if name == "engine" and warmup:
            server.warmup()  # the step shapes it compiles up front, before the clock starts
            warm["warmup_s"] = round(time.perf_counter() - start, 3)
        server.generate(requests)  # warm-up run: whatever shapes the workload needs beyond those compile here
        warm["warm_run_s"] = round(time.perf_counter() - start, 3)
        if name == "engine":
            server.kv_samples.clear()
            server.reset_prefix_cache()
            server.reset_speculation_stats()
        warm_compile = clock.snapshot()
        start = time.perf_counter()
        completions = server.generate(requests, arrivals_s=arrivals)
        seconds = time.perf_counter() - start
        timed = clock.snapshot()
    warm["compile_s"] = warm_compile["compile_s"]
    warm["compiles"] = warm_compile["compiles"]
    warm["cache_hits"] = warm_compile["cache_hits"]
    warm["compiles_in_timed_run"] = timed["compiles"] - warm_compile["compiles"]
    if compiled_before is not None:
        warm["engine_compile_s"] = round(server.compile_s - compiled_before, 3)
    return completions, seconds, warm


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    try:
        groups = split_overrides(args.overrides, ("serve", "model"))
        serve_changes(args, groups["serve"])  # a bad field or value is refused before anything loads
    except ValueError as e:
        fail(str(e))
    cache_dir = use_compilation_cache(args)

    import jax

    from serve.engine import Engine, Request
    from serve.static import StaticBatcher

    servers = [s for s in args.servers.split(",") if s] + (["hf"] if args.peer == "hf" else [])
    for name in servers:
        if name not in ("engine", "static", "hf"):
            fail(f"unknown server {name!r}; use engine, static and/or hf")
    try:
        rates = [float(r) for r in args.rates.split(",")]
        start = time.perf_counter()
        model = build_model(args, groups["model"])
        draft_model = load_draft_model(args, model.cfg)
        load_s = time.perf_counter() - start
        cfg = model.cfg
        # Static batching's memory (plus the null page) unless the command line sizes the cache: both servers get it.
        static_batch = args.max_running or serve_default("max_running")
        pages_per_seq = -(-cfg.max_seq_len // (args.page_size or serve_default("page_size")))
        base = {"num_pages": 1 + static_batch * pages_per_seq, "prefix_caching": not args.no_prefix_caching}
        serve_cfg = serve_config(args, groups["serve"], **base)
        if args.engine_max_running:  # the engine's own, beyond --max-running (the static batch)
            serve_cfg = dataclasses.replace(serve_cfg, max_running=args.engine_max_running)
    except ValueError as e:
        fail(str(e))
    if "hf" in servers and float("inf") not in rates:
        fail("--peer hf serves the workload all at once: give --rates with inf")
    if not 0 <= args.shared_prefix <= cfg.max_seq_len // 2:
        fail(f"--shared-prefix must be in [0, {cfg.max_seq_len // 2}] (half the context), got {args.shared_prefix}")
    shapes = workload(args.requests, cfg.max_seq_len - args.shared_prefix, args.seed, args.prompt_median,
                      args.output_median)
    rng = np.random.default_rng(args.seed + 1)
    prefix = rng.integers(3, cfg.vocab_size, args.shared_prefix).tolist()
    requests = [Request(tuple(prefix + rng.integers(3, cfg.vocab_size, n).tolist()), m, request_id=f"r{i}")
                for i, (n, m) in enumerate(shapes)]
    device = jax.devices()[0].device_kind
    kv_pages = serve_cfg.num_pages
    print(json.dumps({"device": device, "preset": args.run or args.preset, "requests": len(requests),
                      "kv_token_slots": (kv_pages - 1) * serve_cfg.page_size if kv_pages else None,
                      "engine_max_running": serve_cfg.max_running, "static_batch": static_batch,
                      "shared_prefix": args.shared_prefix, "prefix_caching": serve_cfg.prefix_caching,
                      "mean_prompt": float(np.mean([len(r.prompt_ids) for r in requests])),
                      "mean_output": float(np.mean([m for _, m in shapes])), "max_seq_len": cfg.max_seq_len,
                      "n_layers": cfg.n_layers, "d_model": cfg.d_model, "dtype": str(cfg.dtype),
                      "serve": dataclasses.asdict(serve_cfg), "load_s": round(load_s, 3),
                      "compilation_cache": cache_dir}), flush=True)
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    rows: dict[tuple[str, str], dict] = {}
    for rate in rates:
        arrivals = None if rate == float("inf") else np.cumsum(rng.exponential(1 / rate, len(requests))).tolist()
        label = "all at once" if arrivals is None else rate
        for name in servers:
            if name == "hf":
                if arrivals is not None:
                    continue
                result = serve_hf(model, requests, static_batch, args.hf_threads)
            else:
                if name == "engine":
                    server = Engine(model, serve_cfg, draft_model=draft_model)
                else:
                    server = StaticBatcher(model, batch_size=static_batch, page_size=serve_cfg.page_size,
                                           decode_impl=serve_cfg.decode_impl)
                completions, seconds, warm = run_server(name, server, requests, arrivals, not args.no_warmup)
                if name == "engine":
                    stored, allocated, contiguous = (np.array(x, float) for x in zip(*server.kv_samples, strict=True))
                    kv = {"kv_util_paged": round(float(np.mean(stored / allocated)), 4),
                          "kv_util_contiguous": round(float(np.mean(stored / contiguous)), 4),
                          "preemptions": sum(c.num_preemptions for c in completions),
                          "cached_prompt_tokens": sum(c.num_cached_tokens for c in completions)}
                    if serve_cfg.speculative is not None:
                        kv["speculation"] = server.speculation.summary()
                else:
                    kv = {"kv_util_contiguous": round(float(np.mean(server.kv_utilisation_samples)), 4)}
                result = summarize(name, completions, seconds, {**kv, **warm})
                result["errors"] = sum(c.error is not None for c in completions)
                result["_tokens"] = [list(c.token_ids) for c in completions]
            outputs[(name, str(label))] = result.pop("_tokens")
            rows[(name, str(label))] = result
            print(json.dumps({"rate": label, **result}), flush=True)
    if "hf" in servers and "engine" in servers:
        engine, hf = rows[("engine", "all at once")], rows[("hf", "all at once")]
        same = sum(a == b for a, b in zip(outputs[("engine", "all at once")], outputs[("hf", "all at once")],
                                          strict=True))
        print(json.dumps({"comparison": "engine vs hf", "rate": "all at once",
                          "engine_useful_tokens_per_s": engine["tokens_per_s"],
                          "hf_useful_tokens_per_s": hf["tokens_per_s"],
                          "ratio": round(engine["tokens_per_s"] / hf["tokens_per_s"], 2),
                          "same_greedy_tokens": f"{same}/{len(requests)}"}), flush=True)
    if args.tokens_out:
        with open(args.tokens_out, "w") as f:
            for (name, label), tokens in outputs.items():
                for request, ids in zip(requests, tokens, strict=True):
                    f.write(json.dumps({"server": name, "rate": label, "id": request.request_id,
                                        "token_ids": ids}) + "\n")
    return 0


def serve_hf(model, requests: list, batch_size: int, threads: str) -> dict:
    """The transformers peer's row (scripts/hf_peer.py): useful tokens only, as the engine's. `threads` "auto" times
    the warm-up batch with one thread and with torch's default and keeps the faster: on a busy machine torch's
    OpenMP threads can be several times slower than one (they wait on each other), and the peer should be at its
    best."""
    from scripts.hf_peer import HFPeer

    peer = HFPeer(model)
    prompts = [list(r.prompt_ids) for r in requests]
    lengths = [r.max_new_tokens for r in requests]
    warm = prompts[:min(batch_size, len(prompts))]
    tried: dict[int, float] = {}
    for n in sorted({1, peer.torch.get_num_threads()}) if threads == "auto" else [int(threads)]:
        peer.torch.set_num_threads(n)
        peer.generate_batch(warm, 2)  # warm-up: first-call costs out of the clock
        start = time.perf_counter()
        peer.generate_batch(warm, 2)
        tried[n] = round(time.perf_counter() - start, 3)
    peer.torch.set_num_threads(min(tried, key=tried.get))
    result = peer.serve(prompts, lengths, batch_size)
    useful = sum(len(t) for t in result.token_ids)
    return {"server": "hf", "requests": len(requests), "output_tokens": useful, "seconds": round(result.seconds, 2),
            "tokens_per_s": round(useful / result.seconds, 1), "generated_tokens": result.padded_tokens,
            "batches": result.batches, "load_s": round(result.load_s, 3), "torch_threads": peer.torch.get_num_threads(),
            "warm_batch_s_by_threads": tried, "_tokens": result.token_ids}

if __name__ == "__main__":
    sys.exit(main())
