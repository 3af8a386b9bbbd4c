"""What the HF interop tests share: a transformers model with every weight moved off its initial value, its logits,
and the comparison (float32 on both sides, different matmul orders: 1e-5 relative, 1e-5 of the largest logit)."""

from __future__ import annotations

import numpy as np


def perturbed(model):
    """`model` (a transformers model) with 0.05 x N(0, 1) added to every weight, so norm scales are not all 1 and
    biases not all 0; the caller seeds torch."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    """The transformers model's logits for `tokens` [B, T] as float32 numpy."""
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens)).logits.float().numpy()


def assert_logits_close(actual: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(actual, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
