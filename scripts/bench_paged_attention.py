"""Paged decode-attention benchmark: our Pallas kernel against the pure-JAX reference, JAX's own Triton paged
attention (`jax.experimental.pallas.ops.gpu.paged_attention`, when importable) and a device copy of as many bytes.

    python -m scripts.bench_paged_attention                                   # GPU: the default shapes
    python -m scripts.bench_paged_attention --tiny --interpret                # CPU smoke test

Every sequence holds `context` tokens in shuffled pages. Printed: one JSON line per shape with, per
implementation, the time per call (ms), GB/s = K/V bytes the attention needs (lengths x kv heads x head dim x 2
x itemsize) / time, and that as a fraction of the copy's GB/s (a jitted `x * 2` over an array of the same bytes,
counted as read + write: the bandwidth the device actually reaches). `max_err` is our kernel's largest
difference from the reference. Times: `time.perf_counter` around `jax.block_until_ready`, after warm-up.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scripts.common import add_timing_args, fail, ints, seconds_per_call, setup_logging
from serve.kernels.paged_attention import paged_attention, paged_attention_reference


def make_inputs(batch: int, kv_heads: int, group: int, head_dim: int, page_size: int, context: int, dtype,
                seed: int = 0) -> tuple[jax.Array, ...]:
    """q [B, H, D]; pools [K, N, P, D] with a null page and every sequence's pages shuffled; tables; lengths."""
    rng = np.random.default_rng(seed)
    pages = -(-context // page_size)
    n_pages = 1 + batch * pages
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, kv_heads * group, head_dim), dtype)
    k = jax.random.normal(keys[1], (kv_heads, n_pages, page_size, head_dim), dtype)
    v = jax.random.normal(keys[2], (kv_heads, n_pages, page_size, head_dim), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, n_pages)).reshape(batch, pages), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, k, v, lengths, tables


def jax_ops_paged_attention(pages: int) -> Callable | None:
    """JAX's Triton paged attention in our argument order and layout (it does not scale the scores: q is scaled
    by D ** -0.5 first, a [B, H, D] multiply), or None."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as ops
    except Exception:  # deprecated or removed upstream
        return None
    k_splits = max(s for s in range(1, 17) if pages % s == 0)  # it needs pages % k_splits == 0
    per_block = max(c for c in range(1, 9) if (pages // k_splits) % c == 0)
    return lambda q, k, v, lengths, tables, interpret: ops.paged_attention(
        q * q.shape[-1] ** -0.5, k, v, tables, lengths, k_splits=k_splits, pages_per_compute_block=per_block,
        interpret=interpret)


def bench_shape(args: argparse.Namespace, batch: int, group: int, context: int) -> dict:
    dtype = jnp.dtype(args.dtype)
    q, k, v, lengths, tables = make_inputs(batch, args.kv_heads, group, args.head_dim, args.page_size, context,
                                           dtype)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * dtype.itemsize
    timing = {"warmup": args.warmup, "iters": args.iters}
    copy_s = seconds_per_call(jax.jit(lambda x: x * 2), jnp.ones((kv_bytes // dtype.itemsize,), dtype), **timing)
    copy_gbps = 2 * kv_bytes / copy_s / 1e9
    row: dict = {"device": jax.devices()[0].device_kind, "batch": batch, "kv_heads": args.kv_heads, "group": group,
                 "head_dim": args.head_dim, "page_size": args.page_size, "context": context, "dtype": dtype.name,
                 "kv_bytes": kv_bytes, "copy_GBps": round(copy_gbps, 1), "impls": {}}
    impls: dict[str, Callable] = {}
    for splits in args.splits:
        impls[f"ours_splits{splits}"] = jax.jit(lambda *a, s=splits: paged_attention(
            *a, pages_per_chunk=args.pages_per_chunk, num_splits=s, interpret=args.interpret))
    impls["reference"] = jax.jit(paged_attention_reference)
    ops = jax_ops_paged_attention(tables.shape[1])
    if ops is not None:
        impls["jax_ops_gpu"] = jax.jit(lambda *a: ops(*a, interpret=args.interpret))
    outputs = {}
    for name, fn in impls.items():
        try:
            seconds = seconds_per_call(fn, q, k, v, lengths, tables, **timing)
        except Exception as e:  # an implementation that cannot lower or run here is reported, not fatal
            row["impls"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        outputs[name] = fn(q, k, v, lengths, tables)
        gbps = kv_bytes / seconds / 1e9
        row["impls"][name] = {"ms": round(seconds * 1e3, 4), "GBps": round(gbps, 1),
                              "frac_copy": round(gbps / copy_gbps, 3)}
    if "reference" in outputs:
        ref = np.asarray(outputs["reference"], np.float32)
        for name, out in outputs.items():
            row["impls"][name]["max_err"] = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=ints, default=[32, 64], help="comma-separated")
    p.add_argument("--group", type=ints, default=[4, 8], help="query heads per kv head, comma-separated")
    p.add_argument("--context", type=ints, default=[1024, 4096, 8192], help="tokens per sequence, comma-separated")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--pages-per-chunk", type=int, default=None, help="default: the kernel's own choice")
    p.add_argument("--splits", type=ints, default=[1, 4], help="num_splits values to time, comma-separated")
    add_timing_args(p, warmup=3, iters=20)
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    args = p.parse_args(argv)
    setup_logging()
    if args.tiny:
        args.batch, args.group, args.context = [2], [2], [40]
        args.kv_heads, args.head_dim, args.page_size, args.dtype = 2, 16, 8, "float32"
        args.splits, args.warmup, args.iters = [1, 2], 1, 2
    if jax.default_backend() == "cpu" and not args.interpret:
        fail("on CPU the Pallas kernels need --interpret")
    for batch in args.batch:
        for group in args.group:
            for context in args.context:
                print(json.dumps(bench_shape(args, batch, group, context)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
