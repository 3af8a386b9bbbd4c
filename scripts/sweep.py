"""Run a scaling sweep: `python -m scripts.sweep --out runs/sweep --sizes 32x2,64x3,96x4,128x4
--tokens 250000,500000,1000000 [--workers 2] [--dry-run] [--retry-failed] [--executor slurm]`.

Each size x budget is a `scripts.train` run in `OUT/runs/<name>`; finished runs are skipped on a re-run, failed
ones recorded (retried with --retry-failed). Results go to `OUT/results.csv`; the loss law is fitted and a report
with a plot is written to `OUT/report.md` and `OUT/scaling.png` (the plot needs the `plot` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.common import fail, setup_logging


def parse_list(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(float(x)) if kind is int else kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"--{what} {text!r}: expected a comma-separated list of numbers")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for part in text.split(","):
        d, sep, layers = part.strip().partition("x")
        if not sep or not d.isdigit() or not layers.isdigit():
            fail(f"--sizes: {part!r} is not D_MODELxN_LAYERS (e.g. 128x4)")
        sizes.append((int(d), int(layers)))
    return tuple(sizes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", required=True, help="comma-separated D_MODELxN_LAYERS shapes, e.g. 64x2,128x4")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", help="comma-separated tokens per run, e.g. 250000,1e6")
    budget.add_argument("--flops", help="comma-separated IsoFLOP budgets, e.g. 1e13,3e13")
    p.add_argument("--preset", default="small", help="base preset the sizes modify")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--data", help="training text (default: the standard-library corpus)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    p.add_argument("--workers", type=int, default=1, help="runs at once, each pinned to its share of devices")
    p.add_argument("--devices-per-run", type=int, default=1)
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan with predicted FLOPs and time")
    p.add_argument("--assumed-mfu", type=float, default=0.25, help="for --dry-run's time prediction")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--collect", action="store_true", help="only collect results and write the report")
    args = p.parse_args(argv)
    setup_logging("WARNING")

    from scaling.sweep import SweepConfig, collect, execute, plan, slurm_script

    try:
        cfg = SweepConfig(sizes=parse_sizes(args.sizes), tokens=parse_list(args.tokens, int, "tokens")
                          if args.tokens else (), flop_budgets=parse_list(args.flops, float, "flops")
                          if args.flops else (), base_preset=args.preset, batch_size=args.batch_size,
                          seq_len=args.seq_len, lr=args.lr, extra=tuple(args.extra), data=args.data)
        runs = plan(cfg)
    except ValueError as e:
        fail(str(e))
    out = Path(args.out)

    if args.dry_run:
        from scaling.hardware import peak_flops

        rate = (peak_flops("float32") or 0) * args.assumed_mfu
        total = 0.0
        print(f"{'run':<28}{'params':>12}{'tokens':>12}{'steps':>8}{'FLOPs':>12}{'pred. time':>12}")
        for run in runs:
            seconds = run.flops / rate if rate else float("nan")
            total += seconds
            print(f"{run.name:<28}{run.params:>12,}{run.tokens:>12,}{run.steps:>8}{run.flops:>12.3e}"
                  f"{seconds:>11.0f}s")
        print(f"{len(runs)} runs, {sum(r.flops for r in runs):.3e} FLOPs, predicted {total / 60:.1f} min of device "
              f"time at MFU {args.assumed_mfu:.0%} (plus start-up and compilation per run)")
        return 0
    if args.executor == "slurm":
        path = slurm_script(cfg, runs, out, gpus_per_run=args.devices_per_run)
        print(f"wrote {path} ({len(runs)} array tasks): submit with `sbatch {path}`, then run this command again "
              "with --collect")
        return 0
    if not args.collect:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="sweep", unit="run")

        def on_event(event: str, run, status: dict) -> None:
            if event in ("done", "failed", "skip"):
                bar.update(1)
                if event == "failed":
                    tqdm.write(f"{run.name} failed (exit {status.get('returncode')}): {status.get('error')}")
                bar.set_postfix_str(f"last {run.name}: {status.get('state')}")

        execute(cfg, runs, out, workers=args.workers, devices_per_run=args.devices_per_run,
                retry_failed=args.retry_failed, on_event=on_event)
        bar.close()
    rows = collect(runs, out)
    failed = [r["name"] for r in rows if r["state"] == "failed"]
    from scaling.report import write_report

    report = write_report(rows, out, isoflop=bool(args.flops))
    print(f"results: {out / 'results.csv'}  report: {report}")
    if failed:
        print(f"{len(failed)} runs failed ({', '.join(failed)}): see their stderr.log; re-run with --retry-failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
