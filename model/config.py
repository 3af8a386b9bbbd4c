"""`ModelConfig`: the shape and numerics of a decoder-only transformer, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from model.checks import check_bool, check_int, check_ints, check_number, check_numbers, check_one_of

ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "flash", "ring", "ulysses")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGITS_GRAD_DTYPES = ("float32", "compute")
MOE_DISPATCH = ("capacity", "dropless")
MOE_ROUTERS = ("softmax", "sigmoid")
ROPE_SCALINGS = ("none", "yarn")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts MLPs (model/moe.py); `n_experts=0` keeps every block's dense SwiGLU MLP.

    Each MoE block routes every token to `top_k` of `n_experts` SwiGLU experts of hidden size `d_ff`.
    `dispatch="capacity"` gives each expert a fixed number of slots per sequence, ceil(capacity_factor * T *
    top_k / n_experts) (GShard/Switch: overflow tokens skip the expert, the residual carries them; fixed shapes,
    experts shardable over the mesh's `expert` axis); `"dropless"` sorts the tokens by expert and runs grouped
    matmuls (`jax.lax.ragged_dot`), dropping nothing. The router's load-balancing loss (Switch) is weighted by
    `aux_loss_weight`, its z-loss (ST-MoE) by `z_loss_weight`; both are averaged over layers.

    DeepSeekMoE (model/router.py): `router="sigmoid"` scores experts with sigmoid affinities and keeps a
    per-expert bias that only chooses experts; `n_group`/`topk_group` first keep the `topk_group` best of
    `n_group` expert groups; the chosen weights are renormalised when `norm_topk_prob` (and top_k > 1) and
    scaled by `routed_scaling_factor`. `n_shared_experts` adds a SwiGLU of that many times `d_ff` hidden that
    every token takes. `bias_update_rate > 0` (sigmoid only; DeepSeek-V3: 0.001) balances load without a loss:
    after each step bias += rate * sign(mean load - load), outside the optimizer; `seq_aux_loss_weight` weighs
    DeepSeek-V3's sequence-wise balance loss.

    `d_ff` is each routed and shared expert's hidden size (0: `model.d_ff`; DeepSeek's moe_intermediate_size);
    the first `first_dense_layers` blocks keep the dense SwiGLU MLP of hidden `model.d_ff` (DeepSeek's
    first_k_dense_replace).
    """

    n_experts: int = 0
    top_k: int = 2
    dispatch: str = "capacity"
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    router: str = "softmax"
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_update_rate: float = 0.0
    seq_aux_loss_weight: float = 0.0
    d_ff: int = 0
    first_dense_layers: int = 0

    def __post_init__(self) -> None:
        check_ints("model.moe.", self, ("n_experts", "top_k", "n_shared_experts", "d_ff", "first_dense_layers"),
                   minimum=0)
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"model.moe.top_k must be between 1 and model.moe.n_experts ({self.n_experts}), "
                             f"got {self.top_k}")
        check_one_of("model.moe.dispatch", self.dispatch, MOE_DISPATCH)
        check_number("model.moe.capacity_factor", self.capacity_factor)
        check_numbers("model.moe.", self, ("aux_loss_weight", "z_loss_weight", "bias_update_rate",
                                           "seq_aux_loss_weight"), strict=False)
        check_one_of("model.moe.router", self.router, MOE_ROUTERS)
        check_ints("model.moe.", self, ("n_group", "topk_group"))
        check_number("model.moe.routed_scaling_factor", self.routed_scaling_factor)
        check_bool("model.moe.norm_topk_prob", self.norm_topk_prob)
        if self.topk_group > self.n_group:
            raise ValueError(f"model.moe.topk_group ({self.topk_group}) must be at most model.moe.n_group "
                             f"({self.n_group})")
        if self.n_experts and self.n_experts % self.n_group:
            raise ValueError(f"model.moe.n_experts ({self.n_experts}) must be divisible by model.moe.n_group "
                             f"({self.n_group})")
        if self.n_experts and self.top_k > self.topk_group * (self.n_experts // self.n_group):
            raise ValueError(f"model.moe.top_k ({self.top_k}) must be at most model.moe.topk_group "
                             f"({self.topk_group}) x experts per group ({self.n_experts // self.n_group})")
        if self.bias_update_rate and self.router != "sigmoid":
            raise ValueError(f"model.moe.bias_update_rate ({self.bias_update_rate}) needs model.moe.router "
                             f"'sigmoid' (the per-expert bias is DeepSeekMoE's), got {self.router!r}")

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_bias(self) -> bool:
        """Whether the router keeps a per-expert selection bias (DeepSeekMoE's sigmoid router)."""
        return self.router == "sigmoid"

    def expert_d_ff(self, model_d_ff: int) -> int:
        """Each routed expert's hidden size: `d_ff`, or the model's when 0."""
        return self.d_ff or model_d_ff

    def capacity(self, tokens: int) -> int:
        """Slots per expert for a group of `tokens` tokens under capacity dispatch."""
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts))


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, model/mla.py); `kv_lora_rank=0` keeps GQA attention.

    Keys and values come from one shared latent of `kv_lora_rank` per token (RMS-normalised, then expanded per
    head to `qk_nope_head_dim` key and `v_head_dim` value dims), plus one `qk_rope_head_dim` rotary key shared
    by all heads. Queries are `q_lora_rank`-ranked (down, RMSNorm, up) or, with `q_lora_rank=0`, one full-rank
    projection (DeepSeek-V2-Lite); each query head is `qk_nope_head_dim` plain dims and `qk_rope_head_dim` rotary
    ones. The softmax scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times `model.rope_scaling`'s
    `softmax_factor` under YaRN (DeepSeek's mscale).
    """

    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64

    def __post_init__(self) -> None:
        check_ints("model.mla.", self, ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim"), minimum=0)
        check_ints("model.mla.", self, ("qk_rope_head_dim", "v_head_dim"))
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.mla.qk_rope_head_dim must be even for rotary embeddings, got "
                             f"{self.qk_rope_head_dim}")

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Each query and key head's dims: the plain ones and the rotary ones."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched past the pretraining length; `kind="none"` keeps plain RoPE.

    `"yarn"` (YaRN, arXiv 2309.00071; DeepSeek-V3, Qwen's long-context configs): each rotary frequency is blended
    between itself (extrapolation) and itself / `factor` (interpolation) by a linear ramp over the dims whose
    wavelength fits `beta_fast` .. `beta_slow` rotations in `original_max_position_embeddings` positions (ramp
    ends rounded outward when `truncate`); fast dims keep their frequency, slow ones are interpolated. cos and sin
    are multiplied by `attention_factor`, and DeepSeek's attention (MLA) also multiplies its softmax scale by
    `softmax_factor` (both as transformers' `_compute_yarn_parameters` and DeepseekV3Attention). `mscale` and
    `mscale_all_dim` 0 mean unset (transformers' None). The fields are checked whatever the kind, so `--set`
    overrides may come in any order.
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self) -> None:
        check_one_of("model.rope_scaling.kind", self.kind, ROPE_SCALINGS)
        check_numbers("model.rope_scaling.", self, ("factor", "beta_fast", "beta_slow"))
        check_numbers("model.rope_scaling.", self, ("mscale", "mscale_all_dim"), strict=False)
        check_int("model.rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings)
        check_bool("model.rope_scaling.truncate", self.truncate)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: YaRN's mscale(factor, mscale) / mscale(factor, mscale_all_dim)
        when both are set, else mscale(factor); 1 without scaling."""
        if self.kind != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_factor(self) -> float:
        """What DeepSeek's attention (MLA) multiplies its softmax scale by: mscale(factor, mscale_all_dim)^2 under
        YaRN with `mscale_all_dim` set, else 1. Other attention takes only `attention_factor`."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 mscale ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder: pre-norm blocks of RMSNorm, GQA attention with RoPE, and a SwiGLU MLP.

    `dtype` is the compute dtype ("auto" = bfloat16 on GPU/TPU, float32 on CPU); parameters live in
    `param_dtype`; logits and the loss are always float32. `attention_impl="auto"` is cuDNN's fused attention on
    an NVIDIA GPU in bfloat16/float16 and XLA's elsewhere (model/attention.py). The logits' gradient is rounded to
    the compute dtype before the LM head's backward matmuls (`logits_grad_dtype="float32"` keeps them float32
    GEMMs), and the layer stack runs as an unrolled loop (`scan_layers=True`: one `jax.lax.scan` over the stacked
    layers: shorter compiles for deep models, and under FSDP one layer's gathered weights at a time, where the
    unrolled loop keeps every forward gather for the backward; but per-layer dynamic slices and gradient updates
    of the stacked weights); docs/BENCHMARKS.md has what these defaults gain. `loss_chunks=n` fuses the LM head
    with the cross-entropy over n chunks of the sequence (model/loss.py), so the float32 [B, T, vocab] logits
    and their gradient are never materialised whole; off by default. `pipeline_microbatches` cuts each
    micro-step's batch into that many micro-batches when the mesh has pipeline stages (0: one per stage); GPipe's
    idle share is (stages - 1) / (pipeline_microbatches + stages - 1). `qkv_bias` adds q/k/v biases (Qwen2);
    `qk_norm` RMS-normalises each query and key head (a learned head_dim scale each) before RoPE (Qwen3).
    `mla` with a `kv_lora_rank` makes every block's attention DeepSeek's multi-head latent attention over
    `n_heads` heads (each with its own key and value); `n_kv_heads` and `head_dim` are then unused, and `qkv_bias`
    and `qk_norm` are refused. `mtp_depth` adds DeepSeek-V3's multi-token prediction modules (model/mtp.py): the
    k-th predicts the token k + 1 after each position, and training adds `mtp_loss_weight` x their mean loss.
    Inference and serving never run them. `rope_scaling` stretches RoPE past the pretraining length (YaRN)."""

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 64
    d_ff: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "auto"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False
    logits_grad_dtype: str = "compute"
    loss_chunks: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    pipeline_microbatches: int = 0
    init_std: float = 0.02
    moe: MoEConfig = MoEConfig()
    mla: MLAConfig = MLAConfig()
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        check_ints("model.", self, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                    "d_ff", "max_seq_len"))
        check_int("model.pipeline_microbatches", self.pipeline_microbatches, 0, " (0: one per stage)")
        check_int("model.loss_chunks", self.loss_chunks, 0, " (0: whole logits)")
        check_int("model.mtp_depth", self.mtp_depth, 0, " (0: no multi-token prediction)")
        check_number("model.mtp_loss_weight", self.mtp_loss_weight, strict=False)
        if self.mtp_depth >= self.max_seq_len:
            raise ValueError(f"model.mtp_depth ({self.mtp_depth}) must be less than model.max_seq_len "
                             f"({self.max_seq_len})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_numbers("model.", self, ("rope_theta", "norm_eps", "init_std"))
        check_one_of("model.dtype", self.dtype, DTYPES)
        check_one_of("model.param_dtype", self.param_dtype, DTYPES[1:])
        check_one_of("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_one_of("model.remat", self.remat, REMAT_POLICIES)
        check_one_of("model.logits_grad_dtype", self.logits_grad_dtype, LOGITS_GRAD_DTYPES)
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"model.moe must be a MoEConfig, got {self.moe!r}")
        if not isinstance(self.mla, MLAConfig):
            raise ValueError(f"model.mla must be an MLAConfig, got {self.mla!r}")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"model.rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        if self.moe.first_dense_layers >= self.n_layers:
            raise ValueError(f"model.moe.first_dense_layers ({self.moe.first_dense_layers}) must be less than "
                             f"model.n_layers ({self.n_layers})")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm", "scan_layers"):
            check_bool(f"model.{name}", getattr(self, name))
        for name in ("qkv_bias", "qk_norm"):
            if self.mla.enabled and getattr(self, name):
                raise ValueError(f"model.{name} does not apply to multi-head latent attention (model.mla."
                                 f"kv_lora_rank {self.mla.kv_lora_rank}), got {getattr(self, name)!r}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The resolved compute dtype ("auto" picks bfloat16 on accelerators, float32 on CPU)."""
        if self.dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(self.dtype)

    @property
    def rope_dim(self) -> int:
        """Each head's rotary dims (its RoPE tables' width): `mla.qk_rope_head_dim` under MLA, else `head_dim`."""
        return self.mla.qk_rope_head_dim if self.mla.enabled else self.head_dim

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict, rejecting keys that are not fields (e.g. from a config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(names)}")
        values = dict(values)
        for name, kind in (("moe", MoEConfig), ("mla", MLAConfig), ("rope_scaling", RopeScaling)):
            if isinstance(values.get(name), dict):
                sub_names = {f.name for f in dataclasses.fields(kind)}
                unknown = sorted(set(values[name]) - sub_names)
                if unknown:
                    raise ValueError(f"unknown model.{name} config keys {unknown}; known keys are "
                                     f"{sorted(sub_names)}")
                values[name] = kind(**values[name])
        return cls(**values)
