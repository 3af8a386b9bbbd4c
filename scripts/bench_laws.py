"""Time Hoffmann et al.'s Approach-3 fit (4,500 L-BFGS starts) on the Chinchilla points: `python -m scripts.bench_laws`.

Loads the 245 digitised points (tests/scaling/data/chinchilla_svg_extracted_data.csv, or --data),
drops the 5 highest losses, and fits `scaling.laws.fit_loss_law` --repeats + 1 times. The first call compiles
(two programs: the float32 screen of every start and the float64 refinement of the best --keep); compile_s is the
first call's time minus the median of the others (run_s). --keep 4500 runs every start to the end in float64, the
unscreened protocol. Prints one JSON line: timings, the fitted law and Besiroglu et al.'s refit for comparison."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from scripts.common import fail, setup_logging

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "scaling" / "data" / "chinchilla_svg_extracted_data.csv"
BESIROGLU_2024 = {"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--drop", type=int, default=5, help="drop this many highest-loss points")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one")
    p.add_argument("--screen-iter", type=int, default=30)
    p.add_argument("--keep", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=300)
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if not args.data.exists():
        fail(f"no data at {args.data}")
    if args.repeats < 1 or args.drop < 0:
        fail("--repeats must be >= 1 and --drop >= 0")

    import jax

    from scaling.laws import chinchilla_points, fit_loss_law

    n, d, loss = chinchilla_points(args.data, drop=args.drop)

    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        fit = fit_loss_law(n, d, loss, screen_iter=args.screen_iter, keep=args.keep, max_iter=args.max_iter)
        times.append(time.perf_counter() - start)
    run_s = statistics.median(times[1:])
    law = fit.law
    result = {"device": jax.devices()[0].device_kind, "points": len(n), "starts": fit.n_starts,
              "screen_iter": args.screen_iter, "keep": args.keep, "max_iter": args.max_iter,
              "first_call_s": round(times[0], 2), "compile_s": round(times[0] - run_s, 2), "run_s": round(run_s, 2),
              "run_s_all": [round(t, 2) for t in times[1:]],
              "law": {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta},
              "objective": fit.objective, "n_converged": fit.n_converged,
              "n_opt_exponent": law.exponents[0], "tokens_per_param_at_5.76e23": law.tokens_per_param(5.76e23),
              "besiroglu_2024": BESIROGLU_2024}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
