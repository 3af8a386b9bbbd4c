"""Plot runs side by side: `python -m scripts.plot_runs runs/a runs/b --out plot.png` draws the training loss and the
validation bits per byte of each run against tokens seen and against wall time (from each run's metrics.jsonl;
needs the `plot` extra, matplotlib)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.common import fail

METRICS = ("loss", "val_bpb")
AXES = ("tokens", "elapsed_s")
LABELS = {"loss": "training loss (nats/token)", "val_bpb": "validation bits per byte", "tokens": "tokens seen",
          "elapsed_s": "wall time (s)"}


def run_curves(run_dir: str | Path) -> dict[str, dict[str, list[float]]]:
    """For each metric in METRICS, its values and the tokens and wall time at which they were logged:
    {"loss": {"tokens": [...], "elapsed_s": [...], "value": [...]}, "val_bpb": {...}}, in the file's order.
    Records without `tokens` or `elapsed_s` (written before they were recorded) are left out."""
    from train.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a meshlm run directory?")
    curves: dict[str, dict[str, list[float]]] = {m: {"tokens": [], "elapsed_s": [], "value": []} for m in METRICS}
    for record in read_metrics(path):
        for metric in METRICS:
            if record.get(metric) is not None and all(record.get(axis) is not None for axis in AXES):
                for axis in AXES:
                    curves[metric][axis].append(record[axis])
                curves[metric]["value"].append(record[metric])
    return curves


def plot(runs: list[str], out: str | Path) -> None:
    """One PNG: rows = metrics, columns = x axes (tokens, wall time), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, grid = plt.subplots(len(METRICS), len(AXES), figsize=(11, 7), squeeze=False)
    for run in runs:
        curves = run_curves(run)
        for row, metric in enumerate(METRICS):
            for col, axis in enumerate(AXES):
                ax = grid[row][col]
                ax.plot(curves[metric][axis], curves[metric]["value"], marker="." if metric == "val_bpb" else None,
                        label=Path(run).name or str(run))
                ax.set_xlabel(LABELS[axis])
                if axis == "tokens":
                    ax.xaxis.set_major_formatter(EngFormatter())  # 200k, 1M, 1G: no overlapping digits
                ax.set_ylabel(LABELS[metric])
                ax.grid(alpha=0.3)
    grid[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png)")
    args = p.parse_args(argv)
    try:
        plot(args.runs, args.out)
    except FileNotFoundError as e:
        fail(str(e))
    except ImportError:
        fail("plotting needs matplotlib: pip install -e '.[plot]'")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
