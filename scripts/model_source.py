"""Where a model to serve comes from: `--run DIR` (a meshlm run: its newest checkpoint, the tokenizer it trained
with), `--hf DIR` (a Hugging Face model directory, its tokenizer.json if it has one) or `--gguf FILE`
(llama.cpp's format, its vocabulary), with `--tokenizer SOURCE` to name another tokenizer ("bytes", a
tokenizer.json, a model directory, a .gguf file). One loader for every command that serves a model
(scripts/serve.py, scripts/generate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a meshlm run directory (config.json + checkpoints/)")
    src.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors [+ tokenizer.json])")
    src.add_argument("--gguf", help="a GGUF file (llama.cpp's single-file format)")
    p.add_argument("--step", type=int, help="checkpoint step of --run (default: the newest)")
    p.add_argument("--tokenizer", help="the tokenizer: 'bytes', a tokenizer.json, a model directory or a .gguf file "
                                       "(default: the model source's own)")


def source_name(args: argparse.Namespace) -> str:
    """A model name for the source: its directory's or file's name without the suffix."""
    path = Path(args.run or args.hf or args.gguf).resolve()
    return path.stem if args.gguf else path.name


def load_tokenizer_of(args: argparse.Namespace) -> Any:
    """The tokenizer of the source (None: an HF directory without tokenizer.json serves token-id prompts only)."""
    from train.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.run:
        from train.run_tokenizer import run_tokenizer

        return run_tokenizer(args.run)
    if args.gguf:
        return load_tokenizer(args.gguf)
    return load_tokenizer(args.hf) if (Path(args.hf) / "tokenizer.json").is_file() else None


def load_model(args: argparse.Namespace):
    """The model of --run, --hf or --gguf. Raises FileNotFoundError or ValueError naming the problem."""
    if args.run:
        from train.loop import load_params

        return load_params(args.run, args.step)[1]
    if args.hf:
        from model.hf import load_hf

        return load_hf(args.hf)
    from model.gguf import load_gguf

    return load_gguf(args.gguf)


def load_source(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer or None) of the command line's source."""
    return load_model(args), load_tokenizer_of(args)
