"""Attention-kernel benchmark: our Pallas flash attention against `jax.nn.dot_product_attention` ("xla", "cudnn")
and JAX's Pallas `jax.experimental.pallas.ops.gpu.attention.mha`, forward and forward+backward.

    python -m scripts.bench_kernels                                  # GPU: seq 1k-16k, head dim 64 and 128, causal
    python -m scripts.bench_kernels --seq 4096 --head-dim 128 --flash-blocks 128,64,64,64 --flash-blocks 128,128,64,128
    python -m scripts.bench_kernels --tiny --interpret               # CPU smoke test

Shapes follow the FlashAttention papers: batch x seq = `--tokens` (16k) and heads x head dim = `--hidden` (2048),
bfloat16, H = K (mha has no grouped-query heads). FLOPs counted: forward 4 * b * h * s^2 * d (two matmuls),
halved for causal; backward 2.5 x forward (five matmuls), so forward+backward = 3.5 x forward. TFLOP/s = that
count / the best of 3 averages over `--iters` calls (`time.perf_counter` around `jax.block_until_ready`, after
warm-up). Forward+backward is one jitted `jax.vjp` with a fixed cotangent. An implementation that cannot run a
shape (out of memory, unsupported) gets its error instead of a time. One JSON line per (seq, head dim, causal).
`--paged` also prints the paged decode kernel's GB/s (scripts/bench_paged_attention.py, one shape).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

from scripts.common import add_timing_args, fail, ints, seconds_per_call, setup_logging


def implementations(args: argparse.Namespace, causal: bool) -> dict[str, Callable]:
    """name -> attention(q, k, v) -> out [B, T, H, D]."""
    import jax

    from model.kernels.flash_attention import BlockSizes, flash_attention

    impls: dict[str, Callable] = {}
    for spec in args.flash_blocks or [None]:
        blocks = None if spec is None else BlockSizes(*spec)
        name = "flash" if spec is None else "flash" + str(list(spec)).replace(" ", "")
        impls[name] = lambda q, k, v, b=blocks: flash_attention(q, k, v, causal=causal, block_sizes=b,
                                                                interpret=args.interpret)[0]
    if args.interpret:
        return impls
    for implementation in ("xla", "cudnn"):
        impls[implementation] = lambda q, k, v, i=implementation: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=i)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as ops
        impls["pallas_mha"] = lambda q, k, v: ops.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
    except Exception:  # deprecated upstream; absent in some versions
        pass
    return impls


def bench_shape(args: argparse.Namespace, seq: int, head_dim: int, causal: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    batch, heads = max(1, args.tokens // seq), max(1, args.hidden // head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32).astype(args.dtype) for key in keys)
    fwd_flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    row: dict = {"device": jax.devices()[0].device_kind, "batch": batch, "seq": seq, "heads": heads,
                 "head_dim": head_dim, "causal": causal, "dtype": args.dtype, "fwd_gflop": round(fwd_flops / 1e9, 1),
                 "impls": {}}
    timing = {"warmup": args.warmup, "iters": args.iters}
    reference = None
    for name, attend in implementations(args, causal).items():
        entry: dict = {}
        try:
            fwd = jax.jit(attend)
            fwd_bwd = jax.jit(lambda q, k, v, g, f=attend: jax.vjp(f, q, k, v)[1](g))
            out = fwd(q, k, v)
            if reference is None:
                reference = np.asarray(out, np.float32)
            entry["max_diff_vs_first"] = float(np.max(np.abs(np.asarray(out, np.float32) - reference)))
            seconds = seconds_per_call(fwd, q, k, v, **timing)
            entry.update(fwd_ms=round(seconds * 1e3, 3), fwd_tflops=round(fwd_flops / seconds / 1e12, 1))
            seconds = seconds_per_call(fwd_bwd, q, k, v, d_out, **timing)
            entry.update(fwd_bwd_ms=round(seconds * 1e3, 3), fwd_bwd_tflops=round(3.5 * fwd_flops / seconds / 1e12, 1))
        except Exception as e:  # reported, not fatal: another implementation may still run this shape
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        row["impls"][name] = entry
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="comma-separated")
    p.add_argument("--head-dim", type=ints, default=[64, 128], help="comma-separated")
    p.add_argument("--causal", default="true", help="true, false or both")
    p.add_argument("--tokens", type=int, default=16384, help="batch x seq")
    p.add_argument("--hidden", type=int, default=2048, help="heads x head dim")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--flash-blocks", type=ints, action="append", metavar="BQ,BK,BQ_BWD,BK_BWD[,WARPS,STAGES,...]",
                   help="time our kernel with these BlockSizes (repeatable); default: its defaults")
    add_timing_args(p, warmup=2, iters=10)
    p.add_argument("--paged", action="store_true", help="also time the paged decode kernel (one shape)")
    p.add_argument("--interpret", action="store_true", help="run our kernel in interpret mode (CPU), alone")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if args.tiny:
        args.seq, args.head_dim, args.tokens, args.hidden = [64], [32], 64, 64
        args.warmup, args.iters, args.dtype = 1, 1, "float32"
        args.flash_blocks = args.flash_blocks or [[16, 16, 16, 16]]
    causal = {"true": [True], "false": [False], "both": [True, False]}.get(args.causal)
    if causal is None:
        fail(f"--causal must be true, false or both, got {args.causal!r}")

    import jax

    if jax.default_backend() == "cpu" and not args.interpret:
        fail("on CPU the Pallas kernels need --interpret")
    try:
        for spec in args.flash_blocks or []:
            from model.kernels.flash_attention import BlockSizes

            BlockSizes(*spec)
    except (ValueError, TypeError) as e:
        fail(f"--flash-blocks: {e}")
    for head_dim in args.head_dim:
        for seq in args.seq:
            for c in causal:
                print(json.dumps(bench_shape(args, seq, head_dim, c)), flush=True)
    if args.paged:
        from scripts import bench_paged_attention

        paged = bench_paged_attention.main(["--batch", "64", "--group", "8", "--context", "4096", "--splits", "1"]
                                           + (["--tiny", "--interpret"] if args.interpret else []))
        return paged
    return 0


if __name__ == "__main__":
    sys.exit(main())
