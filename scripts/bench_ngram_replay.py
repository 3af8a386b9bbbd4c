"""The most prompt lookup can gain on a workload: serve `bench_speculative`'s prompts plainly (greedy), then replay
each output through `serve.ngram.propose_ngram` position by position, as a verifying step would see it. A step emits
its accepted drafts plus the target's own token, so the mean accepted length (tokens per step) is the speed-up
n-gram speculation would reach if a verifying step cost what a plain one does and drafting cost nothing: the
ceiling for this model and workload, on any device.

    python -m scripts.bench_ngram_replay \\
        --gguf "$(python -c 'from model.gguf import smollm2_path; print(smollm2_path())')"

Prints a JSON line of the workload, then one per (k, max_n): the mean accepted length and the share of steps
accepting at least 1..k drafts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from scripts.bench_speculative import prompts_for, workload_parser
from scripts.common import add_compilation_cache_args, fail, ints, setup_logging, use_compilation_cache
from scripts.model_source import load_source
from scripts.serve_flags import serve_config, split_overrides
from serve.ngram import NgramConfig, propose_ngram


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = workload_parser(__doc__)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--num-tokens", type=ints, default=[4, 8], help="k, comma-separated (default 4,8)")
    p.add_argument("--max-n", type=ints, default=[1, 2, 3, 5, 8], help="comma-separated (default 1,2,3,5,8)")
    add_compilation_cache_args(p)
    return p.parse_args(argv)


def replay(prompt: Sequence[int], output: Sequence[int], cfg: NgramConfig) -> list[int]:
    """The drafts accepted at each verifying step when `output` is decoded after `prompt` with prompt lookup (the
    greedy rule: drafts accepted while they equal the output); each step emits those plus one token."""
    seq, accepted, i = list(prompt), [], 0
    while i < len(output):
        drafts = propose_ngram(seq, cfg)
        a = 0
        while a < len(drafts) and i + a < len(output) - 1 and drafts[a] == output[i + a]:
            a += 1
        seq += output[i:i + a + 1]
        accepted.append(a)
        i += a + 1
    return accepted


def ceiling(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: NgramConfig) -> dict:
    """Tokens per verifying step over every (prompt, output) pair, and the share of steps accepting >= j drafts."""
    accepted = [a for prompt, output in pairs for a in replay(prompt, output, cfg)]
    return {"num_tokens": cfg.num_tokens, "max_n": cfg.max_n,
            "mean_accepted_length": round(1 + sum(accepted) / len(accepted), 3),
            "accepted_at_position": [round(sum(a >= j for a in accepted) / len(accepted), 3)
                                     for j in range(1, cfg.num_tokens + 1)]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    if args.speculative or args.num_speculative_tokens is not None or args.fixed_speculative_tokens:
        fail("the replay decodes plainly and drafts with prompt lookup itself: set k and max_n with --num-tokens and "
             "--max-n, not the --speculative flags")
    use_compilation_cache(args)
    try:
        cfg = dataclasses.replace(serve_config(args, split_overrides(args.overrides)["serve"]), speculative=None)
        model, tok = load_source(args)
        if tok is None:
            raise ValueError("this model has no tokenizer: the workload is text")
        prompts = prompts_for(args.task, args.requests, args.prompt_lines, tok)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    from serve.engine import Engine, Request

    engine = Engine(model, dataclasses.replace(cfg, max_running=min(len(prompts), cfg.max_running)))
    done = engine.generate([Request(tuple(p), args.max_new_tokens, stop_ids=tuple(tok.eos_ids), request_id=f"r{i}")
                            for i, p in enumerate(prompts)])
    errors = [c.error for c in done if c.error]
    if errors:
        fail(f"{len(errors)} of {len(done)} requests failed, e.g. {errors[0]} (shorter prompts: --prompt-lines; or "
             "fewer --max-new-tokens)")
    pairs = [(p, c.token_ids) for p, c in zip(prompts, done, strict=True)]
    print(json.dumps({"task": args.task, "requests": len(pairs), "prompt_lines": args.prompt_lines,
                      "mean_prompt_tokens": round(sum(len(p) for p, _ in pairs) / len(pairs), 1),
                      "output_tokens": sum(len(o) for _, o in pairs)}), flush=True)
    for k in args.num_tokens:
        for n in args.max_n:
            print(json.dumps(ceiling(pairs, NgramConfig(max_n=n, min_n=1, num_tokens=k))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
