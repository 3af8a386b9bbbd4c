"""HTTP serving benchmark: one seeded workload through our OpenAI-compatible server (scripts/serve.py, streamed
/v1/completions) and through the same engine in process (Engine.generate), and what HTTP costs.

    python -m scripts.bench_http --preset small --requests 64 --concurrency 16
    python -m scripts.bench_http --hf path/to/model --requests 200 --rate 8 --set serve.max_running=32
    python -m scripts.bench_http --preset small --url http://127.0.0.1:8000   # a server already running the model

Prompts are random token ids (so any tokenizer works) with log-normal lengths, as scripts/bench_serving.py draws
them; every request is greedy with EOS ignored, so it generates exactly its drawn number of tokens on both sides.
Load: `--concurrency C` keeps C requests in flight (a closed loop), `--rate R` sends a Poisson stream of R
requests per second. Each side compiles every step shape up front (`--warmup`: over HTTP the batches a pass
forms depend on timing, so a warm-up pass alone leaves shapes to compile in the timed one), runs the workload once
untimed and then once timed. Printed per side:
output tokens/s, and TTFT, inter-token latency and end-to-end latency percentiles in ms (over HTTP: measured by
the client, ITL as the gaps between stream chunks with text; in process: the engine's token read-back times),
then the ratio of HTTP to in-process tokens/s (the issue's target: >= 0.9 at concurrency 16). Without --url the
server runs as a subprocess on a free port of 127.0.0.1 with the same engine settings (`--set serve.FIELD=VALUE`);
a `--preset` model (random weights) is handed to it as a Hugging Face directory in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from parallel.launch import free_port
from scripts.bench_serving import percentiles, workload
from scripts.common import add_compilation_cache_args, fail, setup_logging, use_compilation_cache
from scripts.serve_flags import add_serve_args, serve_argv, serve_config_or_exit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a model preset with random weights (default: small)")
    src.add_argument("--run", help="a meshlm run directory")
    src.add_argument("--hf", help="a Hugging Face model directory")
    src.add_argument("--gguf", help="a GGUF file")
    p.add_argument("--url", help="benchmark this running server (serving the same model) instead of starting one")
    p.add_argument("--requests", type=int, default=64)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="requests in flight (default 16, unless --rate)")
    load.add_argument("--rate", type=float, help="a Poisson stream of this many requests per second")
    p.add_argument("--prompt-median", type=int, default=48)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--seed", type=int, default=0, help="the workload's seed")
    p.add_argument("--api-key", help="the server's key (default $MESHLM_API_KEY)")
    add_serve_args(p)
    add_compilation_cache_args(p)
    args = p.parse_args(argv)
    if not (args.run or args.hf or args.gguf):
        args.preset = args.preset or "small"
    if args.rate is None and args.concurrency is None:
        args.concurrency = 16
    for name in ("requests", "concurrency", "rate"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def build_model(args: argparse.Namespace):
    if args.preset:
        from model.presets import get_preset
        from model.transformer import create_model

        return create_model(get_preset(args.preset))
    from scripts.model_source import load_model

    args.step, args.tokenizer = None, None
    return load_model(args)


def make_workload(args: argparse.Namespace, vocab: int, max_len: int) -> tuple[list[list[int]], list[int],
                                                                                list[float] | None]:
    """(prompts, output lengths, arrival times or None for a closed loop)."""
    rng = np.random.default_rng(args.seed)
    shape = workload(args.requests, max_len, args.seed, args.prompt_median, args.output_median)
    prompts = [rng.integers(0, vocab, n).tolist() for n, _ in shape]
    arrivals = None
    if args.rate:
        arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests)).tolist()
    return prompts, [m for _, m in shape], arrivals


# --- over HTTP ----------------------------------------------------------------------------------------------

async def _one(client, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    times, tokens = [], 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"tokens": tokens, "ttft": times[0] - start if times else None,
            "itl": list(np.diff(times)), "e2e": (times[-1] if times else time.perf_counter()) - start}


async def run_http(url: str, key: str | None, prompts, outputs, concurrency: int | None, arrivals
                   ) -> tuple[list, float]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency or len(prompts))
        start = time.perf_counter()

        async def request(i: int) -> dict:
            if arrivals is not None:
                await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            async with gate:
                return await _one(client, prompts[i], outputs[i])

        results = await asyncio.gather(*(request(i) for i in range(len(prompts))))
        return results, time.perf_counter() - start


def start_server(args: argparse.Namespace, model, workdir: Path, cache: str | None) -> tuple[subprocess.Popen, str]:
    """scripts.serve on a free port with this command line's model and engine settings and compilation cache."""
    if args.preset:
        from model.hf import save_hf

        save_hf(model, workdir / "model")
        source = ["--hf", str(workdir / "model"), "--tokenizer", "bytes"]  # the presets' vocabulary is bytes
    else:
        source = next([f"--{k}", getattr(args, k)] for k in ("run", "hf", "gguf") if getattr(args, k))
    port = free_port()
    cmd = [sys.executable, "-m", "scripts.serve", *source, "--port", str(port), "--log-level", "WARNING", "--warmup",
           "--max-waiting", str(max(256, args.requests)), *serve_argv(args),
           *(["--compilation-cache", cache] if cache else ["--no-compilation-cache"])]
    log = (workdir / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    import httpx

    while True:
        if proc.poll() is not None:
            fail(f"the server exited ({proc.returncode}): {(workdir / 'server.log').read_text()[-2000:]}", 1)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


# --- in process ---------------------------------------------------------------------------------------------

def run_in_process(engine, prompts, outputs, concurrency: int | None, arrivals, tag: str) -> tuple[list, float]:
    """The same workload on the engine in this process: a closed loop of `concurrency`, or `arrivals`."""
    from serve.engine import Request

    requests = [Request(tuple(p), m, request_id=f"{tag}-{i}") for i, (p, m) in enumerate(zip(prompts, outputs,
                                                                                              strict=True))]
    start = time.perf_counter()
    if arrivals is not None:
        done = engine.generate(requests, arrivals_s=arrivals)
    else:
        pending, live, done = list(requests), set(), []
        while pending or engine.has_unfinished:
            while pending and len(live) < concurrency:
                live.add(engine.submit(pending.pop(0)))
            engine.step()
            for rid in [rid for rid in live if engine.completions[rid].finished]:
                live.discard(rid)
                done.append(engine.completions[rid])
    seconds = time.perf_counter() - start
    return [{"tokens": len(c.token_ids), "ttft": c.ttft_s, "itl": list(np.diff(c.token_times_s)),
             "e2e": c.token_times_s[-1] - c.arrival_s if c.token_times_s else None} for c in done], seconds


def summary(name: str, results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {"side": name, "requests": len(results), "output_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "ttft_ms": percentiles([r["ttft"] for r in results if r["ttft"] is not None]),
            "itl_ms": percentiles([x for r in results for x in r["itl"]]),
            "e2e_ms": percentiles([r["e2e"] for r in results if r["e2e"] is not None])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    cfg = serve_config_or_exit(args)
    cache = use_compilation_cache(args)
    from serve.engine import Engine

    model = build_model(args)
    prompts, outputs, arrivals = make_workload(args, model.cfg.vocab_size, model.cfg.max_seq_len)
    load = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
    print(f"workload: {args.requests} requests, {sum(outputs)} output tokens, {load}", file=sys.stderr)
    key = args.api_key or os.environ.get("MESHLM_API_KEY")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = (None, args.url) if args.url else start_server(args, model, Path(tmp), cache)
        try:
            for _pass in ("warm-up", "timed"):
                results, seconds = asyncio.run(run_http(url, key, prompts, outputs, args.concurrency, arrivals))
            http = summary("http", results, seconds)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        if args.preset and not args.url:  # the server's very model, as it loaded the weights
            from model.hf import load_hf

            model = load_hf(Path(tmp) / "model")
    engine = Engine(model, cfg)
    engine.warmup()  # both sides compile every step shape first: a timed pass batches differently from its warm-up
    for tag in ("warm", "timed"):
        results, seconds = run_in_process(engine, prompts, outputs, args.concurrency, arrivals, tag)
    local = summary("in_process", results, seconds)
    ratio = http["tokens_per_s"] / local["tokens_per_s"]
    for row in (http, local):
        print(json.dumps(row))
    print(json.dumps({"http_over_in_process": round(ratio, 3), "http_cost": f"{(1 - ratio) * 100:.1f}%",
                      "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
