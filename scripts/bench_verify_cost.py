"""What verifying k drafted tokens costs against decoding one: the model's weight matmuls over B x W rows for
W = 1 and W = k + 1 new positions per row, at each batch size, on this device. Speculation pays when the tokens a
verifying step accepts exceed this ratio; on a device where a small batch's step is bound by reading the weights
the ratio is near 1, and any accepted draft is a gain.

    SMOL="$(python -c 'from model.gguf import smollm2_path; print(smollm2_path())')"
    python -m scripts.bench_verify_cost --gguf "$SMOL"
    python -m scripts.bench_verify_cost --run runs/demo --widths 1,5 --batch-sizes 1,32

Every weight matrix of the model (each layer's, and the LM head) multiplies B x W rows once: the same bytes read
and FLOPs as a step's matmuls, which dominate a short-context step, without its attention and sampling.
"""

from __future__ import annotations

import argparse
import json
import sys

from scripts.common import add_timing_args, fail, ints, seconds_per_call, setup_logging
from scripts.model_source import add_source_args, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--batch-sizes", type=ints, default=[1, 32], help="comma-separated (default 1,32)")
    p.add_argument("--widths", type=ints, default=[1, 2, 3, 5, 9], help="new positions per row; the first is the "
                                                                       "baseline (default 1,2,3,5,9)")
    add_timing_args(p, warmup=2, iters=5)
    return p.parse_args(argv)


def weight_matrices(params) -> list:
    """Each layer's weights (a stacked leaf [L, ...] gives L) and the embedding, as [rows, columns] matrices of
    their own bytes (the last axis the columns): what a step's matmuls read."""
    import jax

    matrices = []
    for leaf in jax.tree.leaves(params):
        if leaf.ndim >= 3:  # stacked over layers
            matrices += [layer.reshape(-1, leaf.shape[-1]) for layer in leaf]
        elif leaf.ndim == 2:
            matrices.append(leaf if leaf.shape[0] < leaf.shape[1] else leaf.T)  # the head: [d_model, vocab]
    return matrices


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    try:
        model = load_model(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    matrices = weight_matrices(nnx.state(model, nnx.Param))
    forward = jax.jit(lambda ms, x_M: sum(jnp.tanh(x_M[:, :m.shape[0]] @ m).sum() for m in ms))
    width = max(m.shape[0] for m in matrices)
    timing = {"warmup": args.warmup, "iters": args.iters}
    print(json.dumps({"device": jax.devices()[0].device_kind, "matrices": len(matrices),
                      "parameters": sum(m.size for m in matrices)}), flush=True)
    for batch in args.batch_sizes:
        ms = {w: 1e3 * seconds_per_call(forward, matrices, jnp.ones((batch * w, width), jnp.float32), **timing)
              for w in args.widths}
        base = ms[args.widths[0]]
        print(json.dumps({"batch": batch, "ms_per_call": {w: round(t, 2) for w, t in ms.items()},
                          "cost_vs_first_width": {w: round(t / base, 2) for w, t in ms.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
