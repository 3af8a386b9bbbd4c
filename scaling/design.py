"""Compute-optimal design: from a loss law and a budget to N and D, a concrete `ModelConfig` of that size, and the
smallest parallel layout whose training state fits a device.

Shape rule (documented, not fitted): SwiGLU with d_ff = 8/3 d_model rounded up to 256, heads of `head_dim`, and
an aspect ratio d_model / n_layers near r*(N) = clip(64 (N / 3e8)^0.22, 64, 128) inside Chinchilla's range
[32, 128] (Hoffmann et al. 2022, Table A9; Kaplan et al. 2020 found loss flat across it). r* passes through the
shapes of GPT-3 125M (64), Llama-2-7B (128) and Llama-2-70B (102). Among shapes inside the range whose total
parameter count (embeddings included) is within 5% of N, the one nearest r* wins.
"""

from __future__ import annotations

import dataclasses
import math

from model.config import ModelConfig
from scaling.accounting import Layout, param_count, train_memory
from scaling.hardware import PEAK_TFLOPS
from scaling.laws import LossLaw


def budget_flops(*, flops: float | None = None, gpu_hours: float | None = None, gpu: str = "H100",
                 mfu: float = 0.4, dtype: str = "bfloat16") -> float:
    """A compute budget in FLOPs, given directly or as `gpu_hours` on `gpu` at model-FLOPs utilisation `mfu`."""
    if (flops is None) == (gpu_hours is None):
        raise ValueError("give exactly one of flops or gpu_hours")
    if flops is not None:
        if not flops > 0:
            raise ValueError(f"budget flops must be positive, got {flops}")
        return float(flops)
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; known: {sorted(PEAK_TFLOPS)}")
    if not 0 < mfu <= 1 or not gpu_hours > 0:
        raise ValueError(f"need gpu_hours > 0 and 0 < mfu <= 1, got {gpu_hours}, {mfu}")
    return gpu_hours * 3600 * PEAK_TFLOPS[gpu][dtype] * 1e12 * mfu


def target_aspect_ratio(n_params: float) -> float:
    return min(128.0, max(64.0, 64.0 * (n_params / 3e8) ** 0.22))


def design_model(n_params: float, *, vocab_size: int = 32000, head_dim: int = 128, kv_groups: int = 1,
                 max_seq_len: int = 2048, tie_embeddings: bool = False, tolerance: float = 0.05) -> ModelConfig:
    """A `ModelConfig` with total parameters within `tolerance` of `n_params` and the aspect ratio rule above;
    `kv_groups` query heads share each KV head. Raises ValueError if no shape in the range gets close enough
    (e.g. N so small the embedding alone exceeds it)."""
    base = ModelConfig(vocab_size=vocab_size, head_dim=head_dim, max_seq_len=max_seq_len,
                       tie_embeddings=tie_embeddings, d_model=head_dim * kv_groups, n_heads=kv_groups, n_kv_heads=1,
                       d_ff=256)
    target = target_aspect_ratio(n_params)
    best, best_key = None, None
    step = head_dim * kv_groups  # heads must divide into KV groups
    for n_layers in range(1, 257):
        lo = max(step, math.ceil(32 * n_layers / step) * step)
        for d_model in range(lo, 128 * n_layers + 1, step):
            heads = d_model // head_dim
            cfg = base.replace(d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads // kv_groups,
                               d_ff=256 * math.ceil(8 * d_model / 3 / 256))
            total = param_count(cfg)["total"]
            if total > n_params * (1 + tolerance):
                break
            if total < n_params * (1 - tolerance):
                continue
            key = abs(math.log(d_model / n_layers / target))
            if best_key is None or key < best_key:
                best, best_key = cfg, key
    if best is None:
        raise ValueError(f"no shape with d_model/n_layers in [32, 128], head_dim {head_dim} and vocab {vocab_size} "
                         f"has {n_params:.3g} parameters within {tolerance:.0%}")
    return best


def smallest_layout(cfg: ModelConfig, device_bytes: float, *, micro_batch: int = 1, seq_len: int = 2048,
                    remat: str = "full", max_devices: int = 65536, headroom: float = 0.9) -> Layout:
    """The fewest devices (powers of two) whose per-device `train_memory` fits `headroom * device_bytes`:
    tensor parallelism inside a node (1-8, dividing the KV heads) times FSDP over the rest."""
    n = 1
    while n <= max_devices:
        for tensor in (1, 2, 4, 8):
            if tensor > n or n % tensor or cfg.n_kv_heads % tensor:
                continue
            layout = Layout(fsdp=n // tensor, tensor=tensor)
            if train_memory(cfg, layout, micro_batch, seq_len, remat=remat)["total"] <= headroom * device_bytes:
                return layout
        n *= 2
    raise ValueError(f"{cfg.d_model}x{cfg.n_layers} does not fit {device_bytes / 2**30:.0f} GiB devices even on "
                     f"{max_devices} of them")


@dataclasses.dataclass(frozen=True)
class Design:
    """The answer to "what should I train with this budget?"."""

    flops: float
    n_opt: float
    d_opt: float
    model: ModelConfig
    params: int
    predicted_loss: float
    layout: Layout | None


def design(law: LossLaw, flops: float, *, device_bytes: float | None = None, **model_kwargs) -> Design:
    """Compute-optimal N and D for `flops` under `law`, a model of that size, and (given a device memory) the
    smallest layout that trains it."""
    n_opt, d_opt = law.compute_optimal(flops)
    model = design_model(float(n_opt), **model_kwargs)
    params = param_count(model)["total"]
    layout = smallest_layout(model, device_bytes) if device_bytes else None
    return Design(flops=flops, n_opt=float(n_opt), d_opt=float(d_opt), model=model, params=params,
                  predicted_loss=float(law.loss(params, flops / (6 * params))), layout=layout)
