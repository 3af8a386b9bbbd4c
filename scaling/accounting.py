"""Parameter and FLOP accounting from a `ModelConfig` alone (no model is built).

Training FLOPs per token follow Kaplan et al./PaLM: 6 FLOPs per parameter that takes part in a matmul
(2 forward + 4 backward), plus attention's score and value matmuls, 12 * layers * seq_len * heads * head_dim per
token, optionally halved for causal masking (MaxText halves; PaLM and Levanter do not). Embedding lookups are free;
the LM head is a matmul and counts.
"""

from __future__ import annotations

from model.config import ModelConfig


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, embedding (input table + untied head), non-embedding."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = d * h * hd + 2 * d * k * hd + h * hd * d + (h * hd + 2 * k * hd if cfg.qkv_bias else 0)
    mlp = 3 * d * f
    per_layer = attn + mlp + 2 * d
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    non_embedding = cfg.n_layers * per_layer + d
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token: every weight matrix, and the LM head (tied or not)."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_halved: bool = False,
                    training: bool = True) -> float:
    """FLOPs per token of a forward (`training=False`) or forward + backward pass at `seq_len`."""
    attention = 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim  # QK^T and PV, forward, 2 FLOPs/MAC
    if causal_halved:
        attention /= 2
    forward = 2 * matmul_params(cfg) + attention
    return 3 * forward if training else forward
