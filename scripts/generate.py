"""Generate with the continuous-batching engine from a meshlm run directory or a Hugging Face model directory.

    python -m scripts.generate --run runs/demo --prompt "def parse("                 # print continuations
    python -m scripts.generate --run runs/demo --prompts prompts.jsonl --out out.jsonl  # a batch, to JSONL
    python -m scripts.generate --hf path/to/llama --prompts prompts.jsonl --out out.jsonl --static

Prompts files: `.jsonl` lines `{"prompt": "..."}` or `{"prompt_ids": [...]}` with optional per-request `id`,
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`; any other file is one prompt per line. Results:
one JSON line per request (`id, text, token_ids, finish_reason, error, ttft_s, tokens_per_s,
cached_tokens`) in input order.
`--static` serves the same requests with static batching (the baseline). A bad request gets its error in the
results; the rest are served."""

from __future__ import annotations

import argparse
import json
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        fail(f"need temperature >= 0, 0 < top-p <= 1, top-k >= 0; got {args.temperature}, {args.top_p}, "
             f"{args.top_k}")
    if args.prompt and args.prompts:
        fail("give --prompt or --prompts, not both")

    from serve.engine import Engine, ServeConfig
    from serve.prompts import default_request, read_requests, request_from, result_record
    from serve.static import StaticBatcher

    try:
        model, encode, decode, stop = load(args)
        defaults = default_request(args.max_new_tokens, args.temperature, args.top_k, args.top_p, None, stop)
        if args.prompts:
            requests = read_requests(args.prompts, defaults, encode)
        else:
            requests = [request_from({"prompt": text}, defaults, encode, f"--prompt {i}")
                        for i, text in enumerate(args.prompt or DEFAULT_PROMPTS)]
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

    bar = tqdm(total=len(requests), desc="generate", unit="req", dynamic_ncols=True)
    start = time.perf_counter()
    results = server.generate(requests, on_finish=lambda c: bar.update(1))
    seconds = time.perf_counter() - start
    bar.close()

    records = [result_record(c, decode) for c in results]
    if args.out:
        with open(args.out, "w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
    else:
        for request, record in zip(requests, records, strict=True):
            print("=" * 72)
            prompt = decode(list(request.prompt_ids)) if decode else str(list(request.prompt_ids))
            print(prompt + (record["text"] or f"[error: {record['error']}]"))
        print("=" * 72)
    n_tokens = sum(len(c.token_ids) for c in results)
    errors = sum(c.error is not None for c in results)
    print(f"{'static' if args.static else 'engine'}: {len(results)} requests ({errors} errors), {n_tokens} output "
          f"tokens in {seconds:.2f} s = {n_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
