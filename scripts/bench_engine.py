"""Engine step benchmark on a SmolLM2-135M-shaped Llama (random weights): steady decode step time against the
declared context, and time to the first token from process start with a cold and a warm compilation cache.

    python -m scripts.bench_engine steps --contexts 1024,8192 --rows 4 --prompt 200
    python -m scripts.bench_engine startup

`steps`: for each context the same weights serve `--rows` requests of `--prompt` tokens; once all are decoding,
`--decode-steps` steps are timed (median, and the host's share: scheduling, input building and output handling).
`startup`: saves the weights as a Hugging Face directory, then runs `first-token` twice in fresh processes sharing
one new compilation cache directory (cold, then warm) and reports the seconds from spawning each process to its
first output token (a 32-token prompt) reaching the request's token callback (where a stream or the server
hands it on), with the child's own split into imports, weight loading (`load_hf`) and the compiling the first
token waited for (`compile_s_all`: the decode step's compile too, which follows it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

PROCESS_START = time.perf_counter()


def smollm2_135m_shape(max_seq_len: int = 8192):
    """SmolLM2-135M's architecture (30 layers, d 576, GQA 9/3 x 64, SwiGLU 1536, vocab 49152, tied)."""
    from model.config import ModelConfig

    return ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
                       max_seq_len=max_seq_len, rope_theta=100000.0, tie_embeddings=True, dtype="float32")


def bench_steps(contexts: list[int], rows: int, prompt: int, decode_steps: int, serve_overrides: dict) -> list[dict]:
    import numpy as np

    from model.transformer import create_model
    from serve.engine import Engine, Request, ServeConfig

    results = []
    for context in contexts:
        model = create_model(smollm2_135m_shape(context), seed=0)
        engine = Engine(model, ServeConfig(**{"max_running": rows, **serve_overrides}))
        rng = np.random.default_rng(0)
        for i in range(rows):
            engine.submit(Request(tuple(rng.integers(0, 49152, prompt).tolist()), decode_steps + 4,
                                  request_id=f"r{i}"))
        while any(len(c.token_ids) < 2 for c in engine.completions.values()):
            engine.step()  # prefill, first decode (compiles)
        times, host = [], []
        for _ in range(decode_steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
            host.append(engine.last_host_s)
        results.append({"context": context, "rows": rows, "prompt": prompt,
                        "step_ms_median": round(1000 * float(np.median(times)), 1),
                        "host_ms_median": round(1000 * float(np.median(host)), 2),
                        "shape": engine.layout.shape_of(engine.last_step[0]),
                        "compile_s": round(engine.compile_s, 1)})
    return results


def first_token(cache_dir: str, weights: str) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from model.hf import load_hf
    from serve.engine import Engine, Request, ServeConfig

    imported = time.perf_counter()
    model = load_hf(weights)
    jax.block_until_ready(jax.tree.leaves(model))
    built = time.perf_counter()
    engine = Engine(model, ServeConfig(max_running=4))
    # when the first token reaches the request's callback (a stream, the server), and the compiling it waited for
    delivered: list[tuple[float, float]] = []
    engine.submit(Request(tuple(range(1, 33)), 8),
                  on_token=lambda rid, token: delivered.append((time.perf_counter(), engine.compile_s)))
    while not delivered:
        engine.step()
    first, compile_at_first_token = delivered[0]
    while engine.has_unfinished:
        engine.step()
    return {"imports_s": round(imported - PROCESS_START, 2), "load_s": round(built - imported, 2),
            "compile_s": round(compile_at_first_token, 2), "first_token_s": round(first - PROCESS_START, 2),
            "first_token_at": first, "compile_s_all": round(engine.compile_s, 2)}


def startup() -> list[dict]:
    from model.hf import save_hf
    from model.transformer import create_model

    results = []
    with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as weights:
        save_hf(create_model(smollm2_135m_shape(), seed=0), weights)
        for label in ("cold", "warm"):
            spawned = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "scripts.bench_engine", "first-token", "--cache-dir",
                                  cache_dir, "--weights", weights], check=True, capture_output=True,
                                 text=True).stdout
            child = json.loads(out.strip().splitlines()[-1])
            # perf_counter is the system's monotonic clock: the child's reading is comparable with ours
            results.append({"cache": label, "first_token_from_spawn_s": round(child.pop("first_token_at") - spawned,
                                                                              2), **child})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--contexts", default="1024,8192")
    s.add_argument("--rows", type=int, default=4)
    s.add_argument("--prompt", type=int, default=200)
    s.add_argument("--decode-steps", type=int, default=12)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.FIELD=INT")
    sub.add_parser("startup")
    f = sub.add_parser("first-token")
    f.add_argument("--cache-dir", required=True)
    f.add_argument("--weights", required=True, help="a Hugging Face model directory")
    args = p.parse_args(argv)
    if args.mode == "steps":
        overrides = {k.removeprefix("serve."): int(v) for k, v in (o.split("=", 1) for o in args.overrides)}
        rows = bench_steps([int(c) for c in args.contexts.split(",")], args.rows, args.prompt, args.decode_steps,
                           overrides)
    elif args.mode == "startup":
        rows = startup()
    else:
        rows = [first_token(args.cache_dir, args.weights)]
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
