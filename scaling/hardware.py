"""Peak FLOP/s of the devices we run on, for MFU. Dense (no sparsity) vendor figures; CPUs are estimated."""

from __future__ import annotations

import os

import jax

# TFLOP/s by device-kind substring and compute dtype (NVIDIA datasheets, SXM parts, dense).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},  # float32 runs as TF32 on tensor cores
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}
CPU_FLOPS_PER_CYCLE = {"float32": 32, "bfloat16": 32}  # 2 AVX2 FMA units x 8 float32 lanes x 2 FLOPs
CPU_GHZ = 2.5


def peak_flops(dtype: str, device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one `device` (default: the first) computing in `dtype`; None if unknown.

    A CPU's peak is estimated as cores x 2.5 GHz x 32 FLOPs/cycle (AVX2 FMA): rough, so CPU MFU is only for
    comparing runs on one machine."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return (os.cpu_count() or 1) * CPU_GHZ * 1e9 * CPU_FLOPS_PER_CYCLE.get(dtype, 32)
    for name, table in PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return table.get(dtype, table["bfloat16"]) * 1e12
    return None


def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s this process reaches on an n x n float32 matmul on the default device (best of `repeats`): a figure of
    the machine's speed today, so times measured on different days (the test suite's, a benchmark's) compare."""
    import time

    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
