"""A sweep's report: the fitted loss law, the results table, and a plot of loss against compute."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def fit_rows(rows: Sequence[dict[str, Any]]):
    """The Approach-3 law fitted to the finished runs (None with fewer than 5: the law has 5 parameters)."""
    from scaling.laws import fit_loss_law

    done = [r for r in rows if r["state"] == "done" and r["val_loss"] is not None]
    if len(done) < 5:
        return None
    fit = fit_loss_law(np.array([r["params"] for r in done], float), np.array([r["tokens"] for r in done], float),
                       np.array([r["val_loss"] for r in done], float))
    return fit.law


def plot(rows: Sequence[dict[str, Any]], law, path: Path) -> bool:
    """Loss against training FLOPs, one line per model size, with the law's curve for each size and its
    compute-optimal frontier; right panel: IsoFLOP curves of the law (loss against N at fixed C). Returns False
    when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install meshlm[plot]): no plot written")
        return False
    done = [r for r in rows if r["state"] == "done" and r["val_loss"] is not None]
    losses = [r["val_loss"] for r in done] or [law.E + 1 if law else 1.0]
    fig, (ax, iso) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = sorted({r["params"] for r in done})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(sizes))))
    flops = np.array([r["flops"] for r in done]) if done else np.array([1e10, 1e12])
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 100)
    for color, n in zip(colors, sizes, strict=True):
        pts = sorted((r["flops"], r["val_loss"], r["tokens"]) for r in done if r["params"] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, label=f"N={n:,}")
        if law is not None:
            fpt = pts[0][0] / pts[0][2]  # this size's FLOPs per token
            ax.plot(grid, law.loss(n, grid / fpt), "-", color=color, alpha=0.5)
    if law is not None:
        n_opt, d_opt = law.compute_optimal(grid)
        ax.plot(grid, law.loss(n_opt, d_opt), "k--", label="law frontier, C = 6ND (points also count attention)")
        n_grid = np.geomspace(min(sizes) / 4, max(sizes) * 4, 100) if sizes else np.geomspace(1e4, 1e7, 100)
        for c in np.geomspace(flops.min(), flops.max(), 4):
            iso.plot(n_grid, law.loss(n_grid, c / (6 * n_grid)), label=f"C={c:.1e}")
            iso.plot(*law.compute_optimal(c)[:1], law.loss(*law.compute_optimal(c)), "k.")
        iso.set_xscale("log")
        iso.set_xlabel("parameters N")
        iso.set_ylabel("predicted validation loss (nats)")
        iso.set_ylim(law.E, max(losses) * 1.5)
        iso.set_title("IsoFLOP curves of the fitted law (C = 6ND)")
        iso.legend(fontsize=8)
    ax.set_ylim(min(losses) * 0.85, max(losses) * 1.25)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("sweep: loss against compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def isoflop_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Approach 2 on an IsoFLOP sweep: the per-budget optima and the exponent of N_opt(C)."""
    from scaling.laws import isoflop_fit

    done = [r for r in rows if r["state"] == "done" and r["val_loss"] is not None]
    try:
        fit = isoflop_fit(np.array([r["params"] for r in done], float), np.array([r["flops"] for r in done], float),
                          np.array([r["val_loss"] for r in done], float))
    except ValueError as e:
        return [f"IsoFLOP fit (Approach 2) not possible: {e}", ""]
    lines = ["## IsoFLOP fit (Hoffmann et al. Approach 2)", "", "| budget (FLOPs) | N_opt | loss at N_opt |",
             "|---|---|---|"]
    lines += [f"| {c:.3e} | {n:,.0f} | {v:.4f} |" for c, n, v in zip(fit.budgets, fit.n_opt, fit.loss_opt, strict=True)]
    return lines + ["", f"N_opt ∝ C^{fit.a:.3f}, D_opt ∝ C^{fit.b:.3f}.", ""]


def write_report(rows: Sequence[dict[str, Any]], out: Path, *, isoflop: bool = False) -> Path:
    """Write `out/report.md` (and `out/scaling.png`); return the report's path."""
    law = fit_rows(rows)
    lines = ["# Sweep report", "", "| run | params | tokens | FLOPs | val loss | wall s | state |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
        lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['flops']:.3e} | {loss} | {wall} | "
                     f"{r['state']} |")
    lines.append("")
    if law is None:
        lines.append("Fewer than 5 finished runs: no law fitted.")
    else:
        a, b = law.exponents
        lines += ["## Fitted law (Hoffmann et al. Approach 3: Huber on log loss, L-BFGS from 4,500 starts)", "",
                  f"L(N, D) = {law.E:.4f} + {law.A:.4g} / N^{law.alpha:.4f} + {law.B:.4g} / D^{law.beta:.4f}", "",
                  f"Compute-optimal N_opt ∝ C^{a:.3f}, D_opt ∝ C^{b:.3f}.", ""]
    if isoflop:
        lines += isoflop_lines(rows)
    if plot(rows, law, out / "scaling.png"):
        lines += ["![loss against compute](scaling.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
