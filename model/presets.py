"""Named model presets: `tiny` for tests, `small` for the CPU demo, and GPT-3/Llama-shaped larger models."""

from __future__ import annotations

from model.config import ModelConfig

BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD (train/tokenizer.py)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=BYTE_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        d_ff=192, max_seq_len=64),
    # The CPU demo model (0.83M params), tuned for the best validation bits per byte that `make demo` reaches in
    # about 6 minutes on 2 cores: at that budget a narrow model that sees more tokens beats a wider one
    # (docs/BENCHMARKS.md has the comparison).
    "small": ModelConfig(vocab_size=BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32,
                         d_ff=352, max_seq_len=256),
    # GPT-3 125M / 350M shapes with a SwiGLU MLP (d_ff ~ 8/3 d) and GPT-2's padded vocabulary, tied.
    "125m": ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                        d_ff=2048, max_seq_len=1024),
    "350m": ModelConfig(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, head_dim=64,
                        d_ff=2816, max_seq_len=1024),
    # Llama-3.2-1B-like body with a 32k vocabulary.
    "1b": ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                      d_ff=8192, max_seq_len=2048, rope_theta=500000.0),
    # Llama-2-7B exactly: 6,738,415,616 parameters.
    "7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                      d_ff=11008, max_seq_len=4096, tie_embeddings=False),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; raises ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
