"""Export a meshlm run as a Hugging Face model directory: config.json and model.safetensors (`model.hf.save_hf`)
plus the run's tokenizer as tokenizer.json and tokenizer_config.json (with its chat template), so `transformers`
loads it and `scripts.serve --hf` / `scripts.generate --hf` serve it with text.

    python -m scripts.export_hf --run runs/demo --out runs/demo-hf [--step N]
"""

from __future__ import annotations

import argparse
import sys

from scripts.common import fail, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a meshlm run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    args = p.parse_args(argv)
    setup_logging("WARNING")

    from model.hf import save_hf
    from train.loop import load_params
    from train.run_tokenizer import run_tokenizer
    from train.tokenizer import ByteTextTokenizer

    try:
        _, model = load_params(args.run, args.step)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    save_hf(model, args.out)
    tokenizer = run_tokenizer(args.run)
    if isinstance(tokenizer, ByteTextTokenizer):
        tokenizer = tokenizer.as_text_tokenizer()
    tokenizer.save(args.out)
    print(f"wrote {args.out}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
