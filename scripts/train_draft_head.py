"""Train an EAGLE-style draft head for speculative decoding: `python -m scripts.train_draft_head --target
run:DIR[@STEP] | hf:DIR | gguf:FILE [--corpus FILE] --steps N --out DIR`.

The target is frozen; its features and next-token distributions over windows of the corpus (default: the
standard library's source, as scripts/train.py; tokenized with the target's own tokenizer) teach one decoder
layer to predict its next feature (train/draft_head.py). OUT gets draft_head.npz and draft_head.json (the target's
source and config, the training settings, the last metrics: `model.draft_head.load_draft_head(OUT)` reads them
back) and metrics.jsonl (loss, its regression and classification parts, `agree`: the share of positions where
the head's token is the target's greedy next token; `val_*` on held-out text at the end)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from scripts.common import fail, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="SOURCE",
                   help="the target model: run:DIR[@STEP] (a meshlm run), hf:DIR or gguf:FILE")
    p.add_argument("--corpus", help="a text file, a folder or a glob (default: the Python standard library)")
    p.add_argument("--out", required=True, help="where to save the head (draft_head.npz, draft_head.json)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: 128, or the target's max_seq_len if "
                                               "shorter)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps (default 50)")
    p.add_argument("--w-cls", type=float, default=0.1,
                   help="weight of the token loss next to the feature regression (default 0.1, EAGLE-1's)")
    p.add_argument("--cls-target", default="target", choices=("target", "data"),
                   help="the token loss's target: the target model's next-token distribution (default) or the "
                        "corpus's actual next token")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches evaluated at the end (default 8)")
    p.add_argument("--eval-draft-tokens", type=int, default=4, metavar="K",
                   help="at the end, how many of K greedy drafts the target accepts after held-out windows "
                        "(val_first_accepted, val_accepted; 0: not measured; default 4)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the head's initial weights and the windows drawn")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The DraftTrainConfig the arguments name; bad values or an unreadable target exit with code 2."""
    from train.draft_head import DraftTrainConfig
    from train.pretrained import source_model_config

    try:
        seq_len = args.seq_len or min(128, source_model_config(args.target).max_seq_len)
        return DraftTrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
                                warmup_steps=args.warmup_steps, w_cls=args.w_cls, cls_target=args.cls_target,
                                seed=args.seed, eval_batches=args.eval_batches,
                                eval_draft_tokens=args.eval_draft_tokens, log_every=args.log_every)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e).replace("--init ", "--target "))  # train.pretrained names the flag it serves, --init


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    cfg = build_config(args)
    print(f"draft head for {args.target}: {cfg}")

    from train.draft_head import train_draft_head

    bar = tqdm(total=cfg.steps, desc="draft head", unit="step", dynamic_ncols=True)

    def on_record(record: dict) -> None:
        bar.n = record["step"]
        bar.set_postfix_str(f"loss {record['loss']:.4f}  reg {record['reg']:.4f}  cls {record['cls']:.3f}  "
                            f"agree {record['agree']:.1%}", refresh=True)

    try:
        _, last = train_draft_head(args.target, args.out, cfg, corpus=args.corpus, on_record=on_record)
    except (ValueError, FileNotFoundError) as e:
        bar.close()
        fail(str(e))
    bar.close()
    shown = "  ".join(f"{k} {last[k]:.4f}" for k in ("loss", "agree", "val_loss", "val_agree", "val_accepted")
                      if k in last)
    print(f"done: step {last.get('step')}  {shown}  saved in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
