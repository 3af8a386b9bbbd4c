"""Compute-optimal design: budgets, model shapes whose real size matches N, and the smallest fitting layout."""

import jax
import pytest
from flax import nnx

from model.transformer import create_model
from scaling.accounting import Layout, train_memory
from scaling.design import budget_flops, design, design_model, smallest_layout
from scaling.laws import LossLaw
from tests.subprocesses import child_env, run_module, tail

BESIROGLU = LossLaw(E=1.817, A=482.0, B=2085.4, alpha=0.3478, beta=0.3658)


def real_params(cfg) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param)))


def test_budget_from_gpu_hours():
    # 1000 H100-hours at 40% MFU of the 989 TFLOP/s dense bf16 peak.
    assert budget_flops(gpu_hours=1000, gpu="H100", mfu=0.4) == pytest.approx(1000 * 3600 * 989e12 * 0.4)
    assert budget_flops(flops=1e21) == 1e21
    with pytest.raises(ValueError, match="exactly one"):
        budget_flops()
    with pytest.raises(ValueError, match="unknown gpu 'TPU9'"):
        budget_flops(gpu_hours=1, gpu="TPU9")


@pytest.mark.parametrize("n", [3e7, 1.2e8, 1e9, 7e9, 7e10])
def test_designed_model_has_the_requested_size_and_a_sane_shape(n):
    cfg = design_model(n)
    assert abs(real_params(cfg) - n) / n <= 0.05  # the real model, not the formula
    assert 32 <= cfg.d_model / cfg.n_layers <= 128
    assert cfg.n_heads * cfg.head_dim == cfg.d_model and cfg.d_ff % 256 == 0


def test_design_model_with_gqa_and_errors():
    cfg = design_model(1e9, kv_groups=4)
    assert cfg.n_heads == 4 * cfg.n_kv_heads
    with pytest.raises(ValueError, match="no shape"):
        design_model(1e6)  # the 32k x 128 embedding alone is 4M parameters


def test_compute_optimal_design_spends_the_budget():
    c = 1e21
    d = design(BESIROGLU, c)
    # The closed form, written out independently: G = (alpha A / (beta B))^(1/(alpha+beta)).
    law = BESIROGLU
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    n_opt = g * (c / 6) ** (law.beta / (law.alpha + law.beta))
    assert d.n_opt == pytest.approx(n_opt, rel=1e-9)
    assert 6 * d.n_opt * d.d_opt == pytest.approx(c, rel=1e-9)
    assert abs(d.params - n_opt) / n_opt <= 0.05
    assert 15 < d.d_opt / d.n_opt < 30  # ~20 tokens per parameter (Besiroglu et al.)


def test_smallest_layout_fits_and_half_as_many_devices_do_not():
    cfg = design_model(7e9)
    gib80 = 80 * 2**30
    layout = smallest_layout(cfg, gib80, seq_len=4096)
    assert train_memory(cfg, layout, 1, 4096, remat="full")["total"] <= 0.9 * gib80
    half = layout.devices // 2
    for tensor in (1, 2, 4, 8):
        if half >= tensor and half % tensor == 0:
            smaller = Layout(fsdp=half // tensor, tensor=tensor)
            assert train_memory(cfg, smaller, 1, 4096, remat="full")["total"] > 0.9 * gib80


def test_estimate_cli_designs_for_a_budget():
    env = child_env(JAX_PLATFORMS="cpu")
    out = run_module("scripts.estimate", "--budget", "1e21", env=env)
    assert out.returncode == 0, tail(out.stderr)
    assert "N_opt 2.778e+09" in out.stdout and "model   designed: d_model" in out.stdout
    bad = run_module("scripts.estimate", "--gpu-hours", "10", "--gpu", "B200", env=env)
    assert bad.returncode == 2 and "unknown gpu 'B200'" in bad.stderr
