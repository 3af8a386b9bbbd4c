"""Speculative decoding against plain decoding, side by side in one process: the same greedy requests through the
engine with and without `--speculative`, at each batch size, output tokens/s and the ratio, whether the outputs are
the same, and the acceptance (rate, mean accepted length, per drafted position).

    # n-gram prompt lookup on input-grounded prompts (rewrite a source file of this repository), SmolLM2-135M:
    python -m scripts.bench_speculative --speculative ngram \\
        --gguf "$(python -c 'from model.gguf import smollm2_path; print(smollm2_path())')"
    # a draft model: `tiny` drafting for `small`, both trained on the demo corpus, continuing corpus text:
    python -m scripts.bench_speculative --run runs/demo --speculative draft:runs/tiny --task continue

Tasks: `rewrite` asks a chat model to repeat a slice of a source file with a comment added (the answer copies the
prompt: prompt lookup's case); `continue` gives a slice of a source file as plain text to continue (a base model's
case). Batch 1 serves `--requests` prompts one at a time; batch B > 1 serves B prompts at once. Each configuration
runs the workload untimed until a pass compiles nothing new (at most 8 passes: speculation's measured policy
chooses differently from pass to pass, and so meets new step shapes), then timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from scripts.common import add_compilation_cache_args, fail, ints, setup_logging, use_compilation_cache
from scripts.model_source import add_source_args, load_source
from scripts.serve_flags import add_serve_args, load_draft_model, serve_config, split_overrides

SOURCES = ("serve", "model", "train", "parallel", "scaling")
WARM_PASSES = 8
INSTRUCTION = "Repeat this Python code exactly, adding one short comment line above each function:\n\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    add_serve_args(p)
    p.add_argument("--task", choices=("rewrite", "continue"), default="rewrite")
    p.add_argument("--batch-sizes", type=ints, default=[1, 32], help="comma-separated (default 1,32)")
    p.add_argument("--requests", type=int, default=4, help="prompts served one at a time at batch 1")
    p.add_argument("--prompt-lines", type=int, default=24, help="source lines in each prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_compilation_cache_args(p)
    return p.parse_args(argv)


def source_slices(n: int, lines: int) -> list[str]:
    """n slices of `lines` lines from this repository's own source files (a fixed, varied, real-code workload)."""
    root = Path(__file__).resolve().parent.parent
    files = sorted(f for d in SOURCES for f in (root / d).glob("*.py") if f.stat().st_size > 2000)
    slices = []
    for i in range(n):
        text = files[i % len(files)].read_text().splitlines()
        start = (i // len(files)) * lines
        slices.append("\n".join(text[start:start + lines]) + "\n")
    return slices


def prompts_for(task: str, n: int, lines: int, tok) -> list[list[int]]:
    slices = source_slices(n, lines)
    if task == "continue":
        return [tok.encode(s) for s in slices]
    if not tok.chat_template:
        raise ValueError("--task rewrite needs a tokenizer with a chat template; use --task continue")
    return [tok.encode_chat([{"role": "user", "content": INSTRUCTION + "```python\n" + s + "```"}]) for s in slices]


def serve(model, cfg, draft, prompts: list[list[int]], max_new: int, stop: tuple[int, ...]) -> dict:
    """Serve `prompts` (all at once) untimed, then timed; the figures of the timed run."""
    from serve.engine import Engine, Request

    engine = Engine(model, cfg, draft_model=draft)
    requests = [Request(tuple(p), max_new, stop_ids=stop, request_id=f"r{i}") for i, p in enumerate(prompts)]
    for _ in range(WARM_PASSES):  # the policy's choices differ run to run, and so do their shapes: until none new
        before = engine.compiles()
        engine.generate(requests)
        engine.reset_prefix_cache()
        if engine.compiles() == before:
            break
    engine.reset_speculation_stats()
    compiles = engine.compiles()
    start = time.perf_counter()
    done = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    errors = [c.error for c in done if c.error]
    if errors:
        raise ValueError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    row = {"output_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
           "compiles_in_timed_run": engine.compiles() - compiles, "_tokens": [c.token_ids for c in done]}
    if cfg.speculative is not None:
        row["speculation"] = engine.speculation.summary()
        if engine.policy is not None:
            row["policy_tokens_per_s"] = {str(b): {("speculative" if k else "plain"): round(v, 2)
                                                   for k, v in r.items()} for b, r in engine.policy.rates().items()}
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    if not args.speculative:
        fail("give --speculative ngram or draft:SOURCE (the configuration to compare with plain decoding)")
    cache_dir = use_compilation_cache(args)
    import jax

    try:
        spec_cfg = serve_config(args, split_overrides(args.overrides)["serve"])
        model, tok = load_source(args)
        draft = load_draft_model(args, model.cfg)
        if tok is None:
            raise ValueError("this model has no tokenizer: the workload is text")
        prompts = prompts_for(args.task, max(args.requests, *args.batch_sizes), args.prompt_lines, tok)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    plain_cfg = dataclasses.replace(spec_cfg, speculative=None)
    stop = tuple(tok.eos_ids)
    print(json.dumps({"device": jax.devices()[0].device_kind, "task": args.task, "speculative": args.speculative,
                      "num_speculative_tokens": spec_cfg.speculative.num_tokens,
                      "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
                      "max_new_tokens": args.max_new_tokens, "compilation_cache": cache_dir}), flush=True)
    for batch in args.batch_sizes:
        rows = {}
        for name, cfg, d in (("plain", plain_cfg, None), ("speculative", spec_cfg, draft)):
            cfg = dataclasses.replace(cfg, max_running=batch)
            if batch == 1:  # one request at a time: the latency case
                runs = [serve(model, cfg, d, [p], args.max_new_tokens, stop) for p in prompts[:args.requests]]
                row = {"output_tokens": sum(r["output_tokens"] for r in runs),
                       "seconds": round(sum(r["seconds"] for r in runs), 2),
                       "compiles_in_timed_run": sum(r["compiles_in_timed_run"] for r in runs),
                       "_tokens": [t for r in runs for t in r["_tokens"]]}
                row["tokens_per_s"] = round(row["output_tokens"] / row["seconds"], 2)
                if name == "speculative":
                    row["speculation"] = [r["speculation"] for r in runs]
            else:
                row = serve(model, cfg, d, prompts[:batch], args.max_new_tokens, stop)
            rows[name] = row
        same = sum(a == b for a, b in zip(rows["plain"].pop("_tokens"), rows["speculative"].pop("_tokens"),
                                          strict=True))
        print(json.dumps({"batch": batch, **{k: v for k, v in rows.items()},
                          "speedup": round(rows["speculative"]["tokens_per_s"] / rows["plain"]["tokens_per_s"], 3),
                          "same_greedy_outputs": f"{same}/{len(prompts[:batch if batch > 1 else args.requests])}"}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
