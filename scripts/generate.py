"""Generate with the continuous-batching engine from a meshlm run directory or a Hugging Face model directory.

    python -m scripts.generate --run runs/demo --prompt "def parse("                 # print continuations
    python -m scripts.generate --run runs/demo --prompts prompts.jsonl --out out.jsonl  # a batch, to JSONL
    python -m scripts.generate --hf path/to/llama --prompts prompts.jsonl --out out.jsonl --static

Prompts files: `.jsonl` lines `{"prompt": "..."}` or `{"prompt_ids": [...]}` with optional per-request `id`,
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`; any other file is one prompt per line. Results:
one JSON line per request (`id, text, token_ids, finish_reason, error, ttft_s, tokens_per_s,
cached_tokens`) in input order.
`--static` serves the same requests with static batching (the baseline). A bad request (serve/request_checks.py
says what each field may hold) gets its error in its own result line and the rest are served; a request without
an id is named `req-<its index>`. The exit code is 0 when the batch was served, whatever some requests' errors;
if serving itself stops, the finished results are still written and the exit code is 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from scripts.common import fail, setup_logging

DEFAULT_PROMPTS = ["def ", "import os\n", "class Stack:\n    def __init__(self", "if __name__ == "]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a meshlm run directory (config.json + checkpoints/)")
    src.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors [+ tokenizer])")
    p.add_argument("--step", type=int, help="checkpoint step of --run (default: the newest)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: a few code openings)")
    p.add_argument("--prompts", help="a prompts file: .jsonl, or text with one prompt per line")
    p.add_argument("--out", help="write results as JSONL here (default: print the texts)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="the engine's seed (requests without their own)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-running", type=int, default=16, help="sequences decoded together at most")
    p.add_argument("--token-budget", type=int, default=512, help="tokens per engine step at most")
    p.add_argument("--kv-pages", type=int, help="KV cache pages (default: enough for --max-running full contexts)")
    p.add_argument("--decode-impl", default="pallas", choices=("pallas", "reference"))
    p.add_argument("--static", action="store_true", help="static batching (the baseline) instead of the engine")
    p.add_argument("--no-prefix-caching", action="store_true", help="recompute prompts' shared prefixes")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    """(model, encode, decode, stop ids) for --run or --hf."""
    if args.run:
        from train.loop import load_params
        from train.tokenizer import ByteTokenizer

        _, model = load_params(args.run, args.step)
        tok = ByteTokenizer()
        return model, lambda text: tok.encode(text).tolist(), tok.decode, (tok.EOS,)
    from model.hf import load_hf

    model = load_hf(args.hf)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.hf)
    except Exception:  # no tokenizer files, or transformers not installed: token-id prompts only
        return model, None, None, ()
    stop = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    return model, lambda text: tok.encode(text), lambda ids: tok.decode(ids), stop


def check_defaults(args: argparse.Namespace) -> None:
    """Exit 2 naming the flag and value if a command-line request default fails the requests' own field check."""
    from serve.request_checks import field_problem

    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        problem = field_problem(name, getattr(args, name))
        if problem:
            fail(f"--{name.replace('_', '-')}: {problem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    check_defaults(args)
    if args.prompt and args.prompts:
        fail("give --prompt or --prompts, not both")

    from serve.engine import Completion, Engine, Request, ServeConfig
    from serve.prompts import default_request, read_requests, rejected, request_from, result_record
    from serve.request_checks import RequestError
    from serve.static import StaticBatcher

    try:
        model, encode, decode, stop = load(args)
        defaults = default_request(args.max_new_tokens, args.temperature, args.top_k, args.top_p, None, stop)
        if args.prompts:
            items = read_requests(args.prompts, defaults, encode)
        elif encode is None:
            fail("this model has no tokenizer for --prompt text; give --prompts with 'prompt_ids'")
        else:
            items = []
            for i, text in enumerate(args.prompt or DEFAULT_PROMPTS):
                try:
                    items.append(request_from({"prompt": text}, defaults, encode, f"--prompt {i}", f"req-{i}"))
                except RequestError as e:
                    items.append(rejected(e))
        if args.static:
            server = StaticBatcher(model, batch_size=args.max_running, page_size=args.page_size,
                                   decode_impl=args.decode_impl, seed=args.seed)
        else:
            server = Engine(model, ServeConfig(page_size=args.page_size, num_pages=args.kv_pages,
                                               max_running=args.max_running, token_budget=args.token_budget,
                                               decode_impl=args.decode_impl, seed=args.seed,
                                               prefix_caching=not args.no_prefix_caching))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))

    requests = [item for item in items if isinstance(item, Request)]  # the rest are already error results
    bar = tqdm(total=len(items), initial=len(items) - len(requests), desc="generate", unit="req",
               dynamic_ncols=True)
    finished: dict[str, Completion] = {}

    def on_finish(c: Completion) -> None:
        finished[c.request_id] = c
        bar.update(1)

    start = time.perf_counter()
    stopped: BaseException | None = None
    try:
        served = server.generate(requests, on_finish=on_finish)
    except (Exception, KeyboardInterrupt) as e:  # not one request's fault: keep every finished result
        stopped = e
        logging.getLogger(__name__).error("generation stopped", exc_info=e)
        served = [finished.get(r.request_id) or Completion(r.request_id, list(r.prompt_ids), finish_reason="error",
                                                           error=f"not finished: generation stopped ({e!r})")
                  for r in requests]
    seconds = time.perf_counter() - start
    bar.close()

    answers = iter(served)
    results = [item if isinstance(item, Completion) else next(answers) for item in items]
    records = [result_record(c, decode) for c in results]
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.replace(partial, out)  # a reader never sees half a results file
    else:
        for item, record in zip(items, records, strict=True):
            print("=" * 72)
            if isinstance(item, Completion):
                print(f"[error: {record['error']}]")
                continue
            prompt = decode(list(item.prompt_ids)) if decode else str(list(item.prompt_ids))
            print(prompt + (record["text"] or f"[error: {record['error']}]"))
        print("=" * 72)
    n_tokens = sum(len(c.token_ids) for c in results)
    errors = sum(c.error is not None for c in results)
    print(f"{'static' if args.static else 'engine'}: {len(results)} requests ({errors} errors), {n_tokens} output "
          f"tokens in {seconds:.2f} s = {n_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    if stopped is not None:
        done = sum(c.error is None for c in results)
        print(f"error: generation stopped after {done} of {len(results)} requests finished ({stopped!r}); "
              f"{'their results are in ' + args.out if args.out else 'their texts are above'}", file=sys.stderr)
        return 130 if isinstance(stopped, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
