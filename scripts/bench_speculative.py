"""Speculative decoding against plain decoding, side by side in one process: the same greedy requests through the
engine with and without `--speculative`, at each batch size, output tokens/s and the ratio, whether the outputs are
the same, and the acceptance (rate, mean accepted length, per drafted position).

    # n-gram prompt lookup on input-grounded prompts (rewrite a source file of this repository), SmolLM2-135M:
    python -m scripts.bench_speculative --speculative ngram \\
        --gguf "$(python -c 'from model.gguf import smollm2_path; print(smollm2_path())')"
    # a draft model: `tiny` drafting for `small`, both trained on the demo corpus, continuing corpus text:
    python -m scripts.bench_speculative --run runs/demo --speculative draft:runs/tiny --task continue
    # the model's own multi-token prediction module (a run trained with --set model.mtp_depth=1):
    python -m scripts.bench_speculative --run runs/demo-mtp --speculative mtp --task continue

Tasks: `rewrite` asks a chat model to repeat a slice of a source file with a comment added (the answer copies the
prompt: prompt lookup's case); `continue` gives a slice of a source file as plain text to continue (a base model's
case). Batch 1 serves `--requests` prompts one at a time; batch B > 1 serves B prompts at once. Each configuration
first compiles every step shape up to the workload's longest context (`Engine.warmup`, a proposer's catch-up and
drafting included), then runs the workload untimed until two passes in a row compile nothing new (at most 12
passes: speculation's measured policy chooses differently from pass to pass, and so may meet new step shapes), then
`--repeats` timed passes of the two configurations interleaved, the median pass reported (the speculative engine
keeps its policy's measurements from pass to pass, as a server would).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from scripts.common import add_compilation_cache_args, fail, ints, setup_logging, use_compilation_cache
from scripts.model_source import add_source_args, load_source
from scripts.serve_flags import add_serve_args, load_draft_model, serve_config, split_overrides

# a fixed set of files, so the workload changes only when they do (not when files are added)
SOURCE_FILES = ("serve/block_allocator.py", "serve/scheduler.py", "model/kernels/flash_attention.py",
                "parallel/ring_attention.py")
WARM_PASSES = 12
INSTRUCTION = "Repeat this Python code exactly, adding one short comment line above each function:\n\n"


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the model source, the serve settings and the workload's flags (`--task`, `--prompt-lines`,
    `--max-new-tokens`), shared with scripts/bench_ngram_replay.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    add_serve_args(p)
    p.add_argument("--task", choices=("rewrite", "continue"), default="rewrite")
    p.add_argument("--prompt-lines", type=int, default=24, help="source lines in each prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = workload_parser(__doc__)
    p.add_argument("--batch-sizes", type=ints, default=[1, 32], help="comma-separated (default 1,32)")
    p.add_argument("--requests", type=int, default=4, help="prompts served one at a time at batch 1")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of each configuration, interleaved; the "
                                                          "median pass is reported (default 5)")
    add_compilation_cache_args(p)
    return p.parse_args(argv)


def source_slices(n: int, lines: int) -> list[str]:
    """n slices of `lines` lines from a fixed set of this repository's own source files (a varied, real-code
    workload): file i % 4, its (i // 4)-th slice."""
    root = Path(__file__).resolve().parent.parent
    slices = []
    for i in range(n):
        text = (root / SOURCE_FILES[i % len(SOURCE_FILES)]).read_text().splitlines()
        start = (i // len(SOURCE_FILES)) * lines
        slices.append("\n".join(text[start:start + lines]) + "\n")
    return slices


def prompts_for(task: str, n: int, lines: int, tok) -> list[list[int]]:
    slices = source_slices(n, lines)
    if task == "continue":
        return [tok.encode(s) for s in slices]
    if not tok.chat_template:
        raise ValueError("--task rewrite needs a tokenizer with a chat template; use --task continue")
    return [tok.encode_chat([{"role": "user", "content": INSTRUCTION + "```python\n" + s + "```"}]) for s in slices]


def run_once(engine, requests: list, one_at_a_time: bool) -> list:
    """The Completions of serving `requests` all at once, or one after the other (the latency case)."""
    if one_at_a_time:
        return [c for r in requests for c in engine.generate([r])]
    return engine.generate(requests)


def warm(engine, requests: list, one_at_a_time: bool) -> None:
    """Compile every step shape the workload's contexts can meet (`Engine.warmup`: the target's plain and verifying
    steps, a draft model's or head's catch-up and drafting), then serve the workload untimed until two passes in a
    row compile nothing new (the policy's choices differ from pass to pass, and so may their shapes)."""
    engine.warmup(max(len(r.prompt_ids) + r.max_new_tokens for r in requests))
    quiet = 0
    for _ in range(WARM_PASSES):
        before = engine.compiles()
        run_once(engine, requests, one_at_a_time)
        engine.reset_prefix_cache()
        quiet = quiet + 1 if engine.compiles() == before else 0
        if quiet == 2:
            break


def timed(engine, requests: list, one_at_a_time: bool) -> dict:
    """One timed pass: output tokens, seconds, compiles during it, the tokens of each request."""
    compiles = engine.compiles()
    start = time.perf_counter()
    done = run_once(engine, requests, one_at_a_time)
    seconds = time.perf_counter() - start
    engine.reset_prefix_cache()
    errors = [c.error for c in done if c.error]
    if errors:
        raise ValueError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens": sum(len(c.token_ids) for c in done), "seconds": seconds,
            "compiles": engine.compiles() - compiles, "outputs": [c.token_ids for c in done]}


def summary(engine, runs: list[dict]) -> dict:
    """A configuration's figures over its timed passes: the median pass's tokens/s, and every pass's."""
    rates = sorted(r["tokens"] / r["seconds"] for r in runs)
    row = {"output_tokens_per_pass": runs[0]["tokens"], "tokens_per_s": round(statistics.median(rates), 2),
           "tokens_per_s_of_each_pass": [round(r, 2) for r in rates],
           "compiles_in_timed_runs": sum(r["compiles"] for r in runs)}
    if engine.cfg.speculative is not None:
        row["speculation"] = engine.speculation.summary()
        if engine.policy is not None:
            row["policy_tokens_per_s"] = {str(b): {(f"k={k}" if k else "plain"): round(v, 2)
                                                   for k, v in r.items()} for b, r in engine.policy.rates().items()}
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    if not args.speculative:
        fail("give --speculative ngram, mtp, draft:SOURCE or head:DIR (the configuration to compare with plain "
             "decoding)")
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
    from serve.engine import Engine, Request

    for batch in args.batch_sizes:
        one_at_a_time = batch == 1
        chosen = prompts[:args.requests if one_at_a_time else batch]
        requests = [Request(tuple(p), args.max_new_tokens, stop_ids=stop, request_id=f"r{i}")
                    for i, p in enumerate(chosen)]
        engines = {name: Engine(model, dataclasses.replace(cfg, max_running=batch), draft_model=d)
                   for name, cfg, d in (("plain", plain_cfg, None), ("speculative", spec_cfg, draft))}
        for engine in engines.values():
            warm(engine, requests, one_at_a_time)
            engine.reset_speculation_stats()
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for rep in range(args.repeats):  # interleaved, the order alternating: a noisy machine drifts
            for name in (engines if rep % 2 == 0 else reversed(engines)):
                runs[name].append(timed(engines[name], requests, one_at_a_time))
        rows = {name: summary(engines[name], runs[name]) for name in engines}
        same = sum(a == b for a, b in zip(runs["plain"][0]["outputs"], runs["speculative"][0]["outputs"], strict=True))
        print(json.dumps({"batch": batch, **rows,
                          "speedup": round(rows["speculative"]["tokens_per_s"] / rows["plain"]["tokens_per_s"], 3),
                          "same_greedy_outputs": f"{same}/{len(chosen)}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
