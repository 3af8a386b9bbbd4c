"""What a model COSTS, from a `ModelConfig` alone (no model is built): parameters, training FLOPs, memory per
device, KV-cache bytes, and the bytes each device sends per step under a parallel `Layout`.

Notation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"):
s sequence length, b micro-batch (sequences one device processes per micro-step), h = d_model, a = n_heads,
k = n_kv_heads, d = head_dim, f = d_ff, L = n_layers, v = vocab_size, P parameters; t, p, n are the sizes of the
tensor, stage (pipeline) and other parallel dimensions.

MoE (`cfg.moe`, E experts, top-k routing): an MoE block's MLP is E SwiGLU experts of hidden f_e = `moe.d_ff`
(0: f), 3*h*f_e each, a router h*E and S = `moe.n_shared_experts` shared experts, one SwiGLU of S*f_e hidden;
the first L_d = `moe.first_dense_layers` blocks keep a dense SwiGLU of f, so L_m = L - L_d blocks are MoE.
`expert_params` counts the routed experts, `_inactive_params` the (E - k) / E of them a token does not use, and
every count below picks them up.

MLA (`cfg.mla`, DeepSeek-V2/V3's multi-head latent attention; `mla.enabled` when kv_lora_rank > 0): r_q =
q_lora_rank (0: a direct query projection), r_kv = kv_lora_rank, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim,
d_v = v_head_dim; each head's query and key have d_qk = d_n + d_r dims, its value d_v (GQA: d_qk = d_v = d).
The KV cache keeps the latent and the shared RoPE key, r_kv + d_r numbers per layer and token. Counts follow
transformers' DeepseekV3ForCausalLM, which (like meshlm) has no multi-token-prediction module: DeepSeek-V3's
released 685B include 14B of MTP weights that these 671B leave out.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from model.checks import check_int, is_int, parse_axis_sizes
from model.config import ModelConfig

LAYOUT_AXES = ("data", "fsdp", "tensor", "stage", "sequence", "expert")
REMATS = ("none", "selective", "full", "dots")  # "dots" = ModelConfig.remat's name for (about) selective
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "momentum": 1, "sgd": 0}  # fp32 tensors per parameter
SEQUENCE_IMPLS = ("ulysses", "ring")


# --- the parallel layout -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes of a resolved `parallel.mesh.MeshConfig` (every size given, no -1), as plain numbers: how many
    devices split each parallel dimension; the job uses `devices` = their product. (Its own class, not a
    MeshConfig, so that the accounting imports nothing from parallel/.)

    data: replicas that all-reduce gradients; fsdp: ZeRO-3 shards of params, grads and optimizer state (and of
    the batch); tensor: Megatron tensor parallelism (heads and d_ff); stage: pipeline stages (layers); sequence:
    context parallelism (Ulysses all-to-all or ring attention); expert: MoE expert parallelism (for a dense model,
    expert devices are extra data-parallel replicas).
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    stage: int = 1
    expert: int = 1

    def __post_init__(self) -> None:
        for name in LAYOUT_AXES:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"layout.{name} must be an integer >= 1, got {value!r}")

    @property
    def devices(self) -> int:
        return math.prod(getattr(self, name) for name in LAYOUT_AXES)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """`"data=2,fsdp=4"` -> Layout(data=2, fsdp=4); unnamed dimensions are 1. Raises ValueError naming the
        bad part."""
        return cls(**parse_axis_sizes(text, LAYOUT_AXES, "layout"))


# --- parameters ----------------------------------------------------------------------------------------------

def moe_layers(cfg: ModelConfig) -> int:
    """Blocks with an MoE MLP: L_m = L - `moe.first_dense_layers` (0 for a dense config)."""
    return cfg.n_layers - cfg.moe.first_dense_layers if cfg.moe.enabled else 0


def head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(d_qk, d_v): the dims of each head's query and key, and of its value (GQA: (d, d); MLA: (d_n + d_r,
    d_v))."""
    if cfg.mla.enabled:
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def _attention_weights(cfg: ModelConfig) -> int:
    """One block's attention projection matrices (matmul weights; no biases, no norm scales).

    GQA: h*a*d (q) + 2*h*k*d (k, v) + a*d*h (o). MLA: the query h*r_q + r_q*a*d_qk (h*a*d_qk when r_q = 0),
    the joint KV down-projection with the RoPE key h*(r_kv + d_r), the up-projection of keys and values
    r_kv*a*(d_n + d_v), and o a*d_v*h."""
    h, a = cfg.d_model, cfg.n_heads
    if not cfg.mla.enabled:
        k, d = cfg.n_kv_heads, cfg.head_dim
        return h * a * d + 2 * h * k * d + a * d * h
    m = cfg.mla
    qk, v = head_dims(cfg)
    q = h * m.q_lora_rank + m.q_lora_rank * a * qk if m.q_lora_rank else h * a * qk
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * a * (m.qk_nope_head_dim + v)
    return q + kv + a * v * h


def _mlp_weights(cfg: ModelConfig, *, dense: bool, active: bool) -> int:
    """One block's MLP weights: a dense SwiGLU 3*h*f; an MoE MLP E*3*h*f_e experts (`active`: the top-k
    routed ones, k*3*h*f_e) + the router h*E + the shared experts 3*h*S*f_e."""
    h = cfg.d_model
    if dense or not cfg.moe.enabled:
        return 3 * h * cfg.d_ff
    e, fe = cfg.moe.n_experts, cfg.moe.expert_d_ff(cfg.d_ff)
    routed = cfg.moe.top_k if active else e
    return routed * 3 * h * fe + h * e + 3 * h * cfg.moe.n_shared_experts * fe


def layer_params(cfg: ModelConfig, *, dense: bool = False) -> dict[str, int]:
    """Parameters of one block (of an MoE config: an MoE block; `dense=True`: one of its first
    `moe.first_dense_layers` blocks, whose MLP is a dense SwiGLU of d_ff).

    attention: `_attention_weights` [+ a*d + 2*k*d q/k/v biases]; mlp: `_mlp_weights` (the selection bias
    of DeepSeekMoE is not a parameter; a buffer in transformers); norms: two RMSNorm scales 2*h [+ 2*d:
    the q and k norms of `qk_norm`] [MLA: + r_q + r_kv, the scales of the query and KV latents' RMSNorms
    (no query norm when r_q = 0); `ModelConfig` refuses q/k/v biases and q/k norms with MLA]."""
    h, a, k, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attention = _attention_weights(cfg) + ((a + 2 * k) * d if cfg.qkv_bias else 0)
    norms = 2 * h + (2 * d if cfg.qk_norm else 0)
    if cfg.mla.enabled:
        norms += cfg.mla.q_lora_rank + cfg.mla.kv_lora_rank
    return {"attention": attention, "mlp": _mlp_weights(cfg, dense=dense, active=False), "norms": norms}


def expert_params(cfg: ModelConfig) -> int:
    """Parameters in routed MoE experts, which `Layout.expert` shards: L_m * E * 3*h*f_e (0 for a dense config;
    shared experts and routers are dense parameters)."""
    return moe_layers(cfg) * cfg.moe.n_experts * 3 * cfg.d_model * cfg.moe.expert_d_ff(cfg.d_ff)


def _inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use: (E - k) / E of `expert_params` (0 for a dense model)."""
    e = cfg.moe.n_experts
    return expert_params(cfg) * (e - cfg.moe.top_k) // e if e else 0


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts.

    total = embedding + non_embedding; embedding = v*h (input table) + v*h more when the LM head is untied;
    non_embedding = L_d * dense block + L_m * MoE block (L * block for dense models) + h (final norm) + the MTP
    modules (`mtp_params`), see `layer_params`; active = total minus the parameters a token does not use at
    inference (= total for dense models without MTP; see `_inactive_params`); mtp (only with MTP modules).

    Exact for the Llama family (Llama 2/3, Mistral without sliding windows, Qwen2 with q/k/v biases), Mixtral,
    Qwen3-MoE and DeepSeek-V3 (transformers' counts, without MTP: 671,026,404,352 total, 37,552,282,624 active).
    GPT-2 is not expressible: it has learned position embeddings, LayerNorm (scale and bias) and a 4h GELU MLP
    with biases, none of which `ModelConfig` describes.
    """
    sparse = moe_layers(cfg)
    dense = cfg.n_layers - sparse
    blocks = sparse * sum(layer_params(cfg).values()) + dense * sum(layer_params(cfg, dense=True).values())
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    mtp = mtp_params(cfg)
    non_embedding = blocks + cfg.d_model + mtp
    total = embedding + non_embedding
    counts = {"total": total, "embedding": embedding, "non_embedding": non_embedding,
              "active": total - _inactive_params(cfg) - mtp}
    return {**counts, "mtp": mtp} if cfg.mtp_depth else counts


def mtp_params(cfg: ModelConfig) -> int:
    """Parameters of the multi-token prediction modules (model/mtp.py), which training alone uses: D x (a block
    + the 2h x h projection + three RMSNorm scales 3h); they share the embedding and LM head. Part of `total`, not
    of `active` (a token's forward at inference). FLOPs per token leave them out."""
    return cfg.mtp_depth * (sum(layer_params(cfg).values()) + 2 * cfg.d_model * cfg.d_model + 3 * cfg.d_model)


# --- FLOPs ---------------------------------------------------------------------------------------------------

def matmul_params(cfg: ModelConfig) -> int:
    """Weights a token multiplies by: L * attention weights (`_attention_weights`) + L_d * 3*h*f (dense MLPs)
    + L_m * (k*3*h*f_e + h*E + 3*h*S*f_e) (the top-k routed experts, router and shared experts; dropped tokens
    and capacity padding not counted: model FLOPs) + h*v (the LM head, tied or not); a dense model's L blocks
    all have 3*h*f. Embedding lookups, norms and biases are not matmuls. MLA counts its up-projections as
    training runs them (keys and values expanded per head), not the absorbed form of a decode kernel."""
    sparse = moe_layers(cfg)
    mlp = (sparse * _mlp_weights(cfg, dense=False, active=True)
           + (cfg.n_layers - sparse) * _mlp_weights(cfg, dense=True, active=True))
    return cfg.n_layers * _attention_weights(cfg) + mlp + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_halved: bool = False,
                    training: bool = True) -> float:
    """FLOPs per token of a forward pass (`training=False`) or of forward + backward (`training=True`, 3x).

    forward = 2 * matmul_params + 2 * L * s * a * (d_qk + d_v), where the second term is attention's QK^T and PV
    matmuls (2 * s * a * d_qk and 2 * s * a * d_v per query token; GQA: 4 * L * s * a * d). Backward costs twice
    the forward (gradients with respect to both the inputs and the weights of every matmul), so training =
    6 * matmul_params + 6 * L * s * a * (d_qk + d_v) (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, App. B).
    Elementwise work (softmax, norms, SwiGLU, RoPE) is not counted. Training a model with MTP modules adds
    3 x `mtp_flops_per_token`.

    Causal masking: PaLM and Levanter count the full s x s score matrix (`causal_halved=False`, our default and
    what bench_train's MFU uses); MaxText halves the attention term, since only the lower triangle is needed
    (`causal_halved=True`). No recomputation is counted: this is model FLOPs (MFU), not hardware FLOPs (HFU);
    likewise MLA's d_qk + d_v, where model/mla.py, whose attention takes one head dim, zero-pads the shorter
    of them and computes 4 * s * a * max(d_qk, d_v).
    """
    check_int("seq_len", seq_len)
    qk, v = head_dims(cfg)
    attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * (qk + v)
    if causal_halved:
        attention /= 2
    forward = 2 * matmul_params(cfg) + attention
    return 3 * (forward + mtp_flops_per_token(cfg, seq_len, causal_halved=causal_halved)) if training else forward


def mtp_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_halved: bool = False) -> float:
    """Forward FLOPs of the multi-token prediction modules (model/mtp.py) per main-model token, which training
    adds (`flops_per_token(training=True)` counts them, inference does not run them): depth k runs over the first
    s - k positions, each through its projection 2h x h, one block of the main model's kind (`matmul_params`'
    attention and MLP terms, attention over s - k keys) and the shared LM head h x v."""
    qk, v = head_dims(cfg)
    per_position = 2 * (_attention_weights(cfg) + _mlp_weights(cfg, dense=not cfg.moe.enabled, active=True)
                        + 2 * cfg.d_model * cfg.d_model + cfg.d_model * cfg.vocab_size)
    total = 0.0
    for k in range(1, cfg.mtp_depth + 1):
        n = seq_len - k
        attention = 2 * n * cfg.n_heads * (qk + v) / (2 if causal_halved else 1)
        total += n / seq_len * (per_position + attention)
    return total


# --- memory --------------------------------------------------------------------------------------------------

def activation_bytes_per_layer(cfg: ModelConfig, micro_batch: int, seq_len: int, *, tensor: int = 1,
                               remat: str = "none", tp_sequence_parallel: bool = True,
                               compute_bytes: int = 2) -> float:
    """Activation bytes one transformer layer keeps for its backward pass (Korthikanti et al. 2022, Table 2):

      remat      no tensor parallelism   tensor parallel t          tensor + sequence parallel
      none       s*b*h*(34 + 5*a*s/h)    s*b*h*(10 + 24/t + 5*a*s/(h*t))   s*b*h*(34 + 5*a*s/h)/t
      selective  s*b*h*34                s*b*h*(10 + 24/t)                 s*b*h*34/t
      full       2*s*b*h (the layer input only; /t with sequence parallelism)

    The paper's block is GPT's (multi-head attention, a 4h GELU MLP, dropout masks, 16-bit activations); for a
    SwiGLU/GQA block without dropout it is an estimate, not an exact count. The 16-bit bytes are scaled by
    `compute_bytes / 2`. Selective recompute drops the 5*a*s/h term (softmax, its dropout mask and the attention
    over V are recomputed); "dots" (`ModelConfig.remat`, which saves only weight-matmul outputs) counts as
    selective.
    """
    check_int("micro_batch", micro_batch)
    check_int("seq_len", seq_len)
    check_int("tensor", tensor)
    if remat not in REMATS:
        raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
    s, b, h, a, t = seq_len, micro_batch, cfg.d_model, cfg.n_heads, tensor
    sbh = s * b * h
    if remat == "full":
        per_layer = 2 * sbh / (t if tp_sequence_parallel else 1)
    else:
        scores = 0.0 if remat in ("selective", "dots") else 5 * a * s / h
        per_layer = sbh * (34 + scores) / t if tp_sequence_parallel else sbh * (10 + 24 / t + scores / t)
    return per_layer * compute_bytes / 2


def _check_layout(cfg: ModelConfig, layout: Layout, seq_len: int) -> None:
    if layout.stage > cfg.n_layers:
        raise ValueError(f"layout.stage ({layout.stage}) exceeds model.n_layers ({cfg.n_layers})")
    if layout.sequence > seq_len:
        raise ValueError(f"layout.sequence ({layout.sequence}) exceeds seq_len ({seq_len})")
    if cfg.moe.enabled and cfg.moe.n_experts % layout.expert:
        raise ValueError(f"model.moe.n_experts ({cfg.moe.n_experts}) must be divisible by layout.expert "
                         f"({layout.expert})")


def _params_per_device(cfg: ModelConfig, layout: Layout) -> float:
    """Parameters one device holds: (P - E) / (fsdp*tensor*stage) + E / (fsdp*tensor*stage*expert), E =
    `expert_params`. Data, sequence (and, for dense params, expert) devices hold replicas. Norm scales, which
    tensor parallelism really replicates (< 0.1% of a large model), are divided too."""
    shard = layout.fsdp * layout.tensor * layout.stage
    experts = expert_params(cfg)
    return (param_count(cfg)["total"] - experts) / shard + experts / (shard * layout.expert)


def train_memory(cfg: ModelConfig, layout: Layout, micro_batch: int, seq_len: int, optimizer: str = "adamw",
                 remat: str = "none", param_bytes: int = 4, compute_bytes: int = 2, *,
                 tp_sequence_parallel: bool = True, pipeline_microbatches: int = 1) -> dict[str, int]:
    """Training memory per device in bytes: params, grads, optimizer, activations and their total.

    With N = `_params_per_device` (params sharded by fsdp, tensor, stage; expert params also by expert):
      params     = N * param_bytes
      grads      = N * param_bytes (gradients have the params' dtype; FSDP reduce-scatters them to shards)
      optimizer  = N * (4 * moments + (4 if param_bytes < 4 else 0)): AdamW keeps 2 fp32 moments; 16-bit params
                   also need an fp32 master copy (ZeRO's 12 bytes per parameter, Rajbhandari et al. 2020)
      activations: `activation_bytes_per_layer` for this device's micro-batch, divided by `sequence` (Ulysses
                   holds s/n tokens and a/n heads' s x s scores; ring attention s/n queries against all keys),
                   times the layers whose activations a device holds, plus the LM head's. Without a pipeline: L
                   layers. With p stages, meshlm's GPipe schedule (parallel/pipeline.py: all forwards, then all
                   backwards) keeps, on every stage, its ceil(L/p) layers' activations for each of the
                   m + p - 1 iterations of its loop (m = `pipeline_microbatches`, `micro_batch` sequences each;
                   the p - 1 bubble iterations keep theirs too), and the LM head runs on every stage over all m
                   micro-batches. (1F1B would keep only p micro-batches on the first stage, Korthikanti et al.
                   §4.2.3.) The head keeps its input and the final norm's, 2 * compute_bytes * s*b*h, and the fp32
                   logits for the loss, 4*s*b*v, divided by t (vocabulary-parallel head).
    Not counted: FSDP's gathered copy of the layer being computed, temporary buffers, fragmentation.
    `micro_batch` is sequences per device per micro-step (the global batch / (data * fsdp * expert * grad_accum)),
    and with a pipeline per pipeline micro-batch (that, / `pipeline_microbatches`).
    """
    check_int("pipeline_microbatches", pipeline_microbatches)
    check_int("micro_batch", micro_batch)
    check_int("seq_len", seq_len)
    _check_layout(cfg, layout, seq_len)
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)}, got {optimizer!r}")
    for name, value in (("param_bytes", param_bytes), ("compute_bytes", compute_bytes)):
        if value not in (1, 2, 4, 8):
            raise ValueError(f"{name} must be 1, 2, 4 or 8, got {value!r}")
    n = _params_per_device(cfg, layout)
    optimizer_bytes = 4 * OPTIMIZER_MOMENTS[optimizer] + (4 if param_bytes < 4 else 0)

    t, p, s, b = layout.tensor, layout.stage, seq_len, micro_batch
    per_layer = activation_bytes_per_layer(cfg, b, s, tensor=t, remat=remat, tp_sequence_parallel=tp_sequence_parallel,
                                           compute_bytes=compute_bytes) / layout.sequence
    head = (2 * compute_bytes * s * b * cfg.d_model + 4 * s * b * cfg.vocab_size) / t / layout.sequence
    stage_layers = math.ceil(cfg.n_layers / p)
    m = pipeline_microbatches
    if p == 1:
        activations = cfg.n_layers * per_layer + head
    else:
        activations = (m + p - 1) * stage_layers * per_layer + m * head
    out = {"params": n * param_bytes, "grads": n * param_bytes, "optimizer": n * optimizer_bytes,
           "activations": activations}
    out = {key: math.ceil(value) for key, value in out.items()}
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype: str = "bfloat16") -> int:
    """Bytes of the KV cache for `tokens` cached tokens: L * c * bytes_per_element * tokens, c the numbers one
    layer keeps per token: GQA's keys and values, c = 2*k*d (Llama-2-7B in bfloat16: 2 * 32 * 32 * 128 * 2 =
    524,288 bytes = 0.5 MiB per token); MLA's latent and shared RoPE key, c = r_kv + d_r (DeepSeek-V3 in
    bfloat16: 61 * (512 + 64) * 2 = 70,272 bytes per token)."""
    check_int("tokens", tokens, minimum=0)
    try:
        itemsize = jnp.dtype(dtype).itemsize
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r} for the KV cache") from None
    if cfg.mla.enabled:
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * per_layer * itemsize * tokens


# --- communication -------------------------------------------------------------------------------------------

def expert_all_to_all_bytes(cfg: ModelConfig, expert: int, tokens: float, seq_len: int, compute_bytes: int = 2
                            ) -> float:
    """Bytes one device sends in ONE MoE layer's forward all-to-alls under expert parallelism over `expert`
    devices, for its `tokens` local tokens (in sequences of `seq_len`): the dispatch sends each token's routed
    copies of its d_model activation to their experts' devices and the combine brings the experts' outputs
    back, (e-1)/e of them to other devices: 2 * (e-1)/e * tokens * r * h * compute_bytes, e = `expert`, with
    r the routed rows per token: top_k under dropless dispatch (each token's top_k copies: what an all-to-all
    dropless dispatch such as DeepEP's sends; meshlm's, parallel/expert_dropless.py, all-gathers the tokens and
    reduce-scatters the outputs instead, 2 * (e-1) * tokens * h * compute_bytes, e / top_k times more), E*C/s
    under capacity dispatch (every expert's C = `MoEConfig.capacity(s)` slots per sequence, padding included:
    about capacity_factor * top_k). 0 for a dense model or e = 1. DeepSeek-V3 in bfloat16 at e = 64:
    2 * 63/64 * 8 * 7168 * 2 = 225,792 bytes per token and MoE layer."""
    check_int("expert", expert)
    check_int("seq_len", seq_len)
    if not cfg.moe.enabled or expert == 1:
        return 0.0
    if cfg.moe.dispatch == "dropless":
        rows = tokens * cfg.moe.top_k
    else:
        rows = tokens / seq_len * cfg.moe.n_experts * cfg.moe.capacity(seq_len)
    return 2 * (expert - 1) / expert * rows * cfg.d_model * compute_bytes


def _expert_comm_bytes(cfg: ModelConfig, layout: Layout, tokens: float, seq_len: int, compute_bytes: int
                       ) -> float:
    """Every MoE layer's dispatch and combine all-to-alls, forward and again backward (their gradients go the
    opposite way): L_m * 2 * `expert_all_to_all_bytes` per device; 0 for a dense model or layout.expert = 1."""
    return moe_layers(cfg) * 2 * expert_all_to_all_bytes(cfg, layout.expert, tokens, seq_len, compute_bytes)


def comm_bytes(cfg: ModelConfig, layout: Layout, micro_batch: int, seq_len: int, *, n_microbatches: int = 1,
               sequence_impl: str = "ulysses", param_bytes: int = 4, compute_bytes: int = 2,
               tp_sequence_parallel: bool = True, pipeline_flushes: int = 1) -> dict[str, int]:
    """Bytes each device SENDS per training step, per parallel dimension, and their total.

    Ring collectives over n devices: an all-reduce of M bytes sends 2*(n-1)/n * M per device; an all-gather or
    reduce-scatter of a full M-byte tensor sends (n-1)/n * M; an all-to-all of the local M bytes sends (n-1)/n * M.
    With m = `n_microbatches` (gradient-accumulation or pipeline micro-batches per step), P the params,
    P' = P / (tensor * stage) a model replica's share on one device before FSDP, L' = ceil(L/p) layers per
    device, s' = s / sequence the local sequence length, and X = b*s'*h*compute_bytes one residual activation:

      data      gradient all-reduce among the replicas (data * sequence * expert; params are replicated across
                all three), once per step: 2*(r-1)/r * P'/fsdp * param_bytes; MoE experts (X' = expert_params'
                share, sharded over expert) reduce among data * sequence only: their X'/expert use r' = r/expert
      fsdp      per micro-batch, all-gather params in the forward and again in the backward, reduce-scatter the
                grads: m * (n-1)/n * P' * 3 * param_bytes (P' with the experts' share divided by expert)
      tensor    per layer and micro-batch, 2 all-reduces in the forward (after attention and MLP) and 2 in the
                backward of X (with sequence parallelism: all-gather + reduce-scatter pairs, the same bytes):
                m * L' * 4 * 2*(t-1)/t * X
      stage     meshlm's GPipe (parallel/pipeline.py), which fills and drains F = `pipeline_flushes` times per
                step (once per gradient-accumulation micro-step), m / F micro-batches each: every one of its
                m + F*(p-1) loop iterations a stage sends its output to the next stage, and the backward sends
                the gradients back, and per flush the last stage's outputs are all-reduced to every stage for
                the LM head and the input's gradient from the first stage:
                (2 * (m + F*(p-1)) + 4*(p-1)/p * m) * X / t (the residual stream is sharded over t under
                sequence parallelism, Megatron's scatter/gather otherwise). A middle stage sends both ways; the
                first and last stages send one way, (m + F*(p-1)) * X / t less, but are counted like the
                middle, as `parallel.explain` counts a collective-permute for every device of the mesh
      sequence  ulysses: per layer, all-to-alls of q, k, v before attention and of its output after, forward and
                again backward: m * L' * 2 * (n-1)/n * b*s'*d*(2a + 2k')/t * compute_bytes, with k' = k when
                each tensor shard's k/t KV heads split n ways, else a (K and V repeated per query head first)
                ring: per layer, n-1 ppermutes of the local K and V blocks forward; backward, K and V go
                around again (n-1 hops) with their float32 gradients beside them (n hops: the last brings them
                home): m * L' * b*s'*2k*d/t * (2*(n-1) * compute_bytes + n * 4)
                MLA: 2d becomes d_qk + d_v and k becomes a (keys and values expanded per head from the latent)
      expert    MoE all-to-alls, dispatch and combine, forward and backward, in the L_m MoE blocks
                (`expert_all_to_all_bytes`); 0 for dense models

    Every entry is 0 when its dimension is 1 (the data entry also needs sequence = expert = 1). Not counted: the
    embedding/LM-head all-reduces under tensor parallelism, recomputed forwards' collectives under remat, and
    the small scalar all-reduces (loss, grad norm).
    """
    check_int("micro_batch", micro_batch)
    check_int("seq_len", seq_len)
    check_int("n_microbatches", n_microbatches)
    check_int("pipeline_flushes", pipeline_flushes)
    if n_microbatches % pipeline_flushes:
        raise ValueError(f"n_microbatches ({n_microbatches}) must be a multiple of pipeline_flushes "
                         f"({pipeline_flushes})")
    _check_layout(cfg, layout, seq_len)
    if sequence_impl not in SEQUENCE_IMPLS:
        raise ValueError(f"sequence_impl must be one of {SEQUENCE_IMPLS}, got {sequence_impl!r}")
    m, b, t, p, n = n_microbatches, micro_batch, layout.tensor, layout.stage, layout.sequence
    experts = expert_params(cfg) / (t * p * layout.expert)
    dense = (param_count(cfg)["total"] - expert_params(cfg)) / (t * p)
    layers = math.ceil(cfg.n_layers / p)
    s_local = seq_len / n
    x = b * s_local * cfg.d_model * compute_bytes
    replicas = layout.data * layout.sequence * layout.expert
    expert_replicas = layout.data * layout.sequence

    out = {
        "data": (2 * (replicas - 1) / replicas * dense + 2 * (expert_replicas - 1) / expert_replicas * experts)
        / layout.fsdp * param_bytes,
        "fsdp": m * (layout.fsdp - 1) / layout.fsdp * (dense + experts) * 3 * param_bytes,
        "tensor": m * layers * 4 * 2 * (t - 1) / t * x,
        "stage": 0.0 if p == 1 else (2 * (m + pipeline_flushes * (p - 1)) + 4 * (p - 1) / p * m) * x
        / (t if tp_sequence_parallel else 1),
        "sequence": 0.0,
        "expert": _expert_comm_bytes(cfg, layout, m * b * s_local, seq_len, compute_bytes),
    }
    (qk, v), a = head_dims(cfg), cfg.n_heads
    k = a if cfg.mla.enabled else cfg.n_kv_heads  # MLA's keys and values, expanded from the latent, are per head
    if sequence_impl == "ulysses":
        k_sent = k if (k // t) % n == 0 else a
        per_token = a * (qk + v) + k_sent * (qk + v)  # q and the output; k and v
        out["sequence"] = m * layers * 2 * (n - 1) / n * b * s_local * per_token / t * compute_bytes
    else:
        out["sequence"] = m * layers * b * s_local * k * (qk + v) / t * (2 * (n - 1) * compute_bytes + n * 4)
    out = {key: math.ceil(value) for key, value in out.items()}
    out["total"] = sum(out.values())
    return out
