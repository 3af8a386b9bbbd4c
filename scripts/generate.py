"""Generate continuations from a trained run: `python -m scripts.generate --run runs/demo --prompt "def "`.

Loads the newest checkpoint of `--run`, encodes each prompt with the byte tokenizer, and prints prompt +
continuation. (Batched serving from files, HF folders and the paged engine arrive with the serving issue.)"""

from __future__ import annotations

import argparse
import sys

from scripts.common import fail, setup_logging

DEFAULT_PROMPTS = ["def ", "import os\n", "class Stack:\n    def __init__(self", "if __name__ == "]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a meshlm run directory (config.json + checkpoints/)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: a few code openings)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        fail(f"need temperature >= 0, 0 < top-p <= 1, top-k >= 0; got {args.temperature}, {args.top_p}, "
             f"{args.top_k}")

    from serve.naive import generate
    from train.loop import load_params
    from train.tokenizer import ByteTokenizer

    try:
        _, model = load_params(args.run, args.step)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    tok = ByteTokenizer()
    prompts = args.prompt or DEFAULT_PROMPTS
    ids = [tok.encode(text).tolist() for text in prompts]
    try:
        outs = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_ids=[tok.EOS])
    except ValueError as e:
        fail(str(e))
    for text, out in zip(prompts, outs, strict=True):
        print("=" * 72)
        print(text + tok.decode(out))
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
