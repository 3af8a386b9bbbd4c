"""scaling.accounting against independent references: the real model's parameters, published parameter counts,
XLA's FLOP count of the real forward and backward, and hand arithmetic written out below."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from model.config import MoEConfig
from model.hf import config_from_hf
from model.presets import PRESETS, get_preset
from model.transformer import create_model
from scaling.accounting import (
    Layout,
    activation_bytes_per_layer,
    comm_bytes,
    expert_params,
    flops_per_token,
    kv_cache_bytes,
    matmul_params,
    param_count,
    train_memory,
)
from train.step import loss_fn, objective_fn

# --- parameters ----------------------------------------------------------------------------------------------


def model_param_count(cfg) -> int:
    abstract = nnx.eval_shape(lambda: create_model(cfg))  # shapes only: the 7b preset allocates nothing
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_equals_model_for_every_preset(name):
    cfg = get_preset(name)
    counts = param_count(cfg)
    assert counts["total"] == model_param_count(cfg)
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert counts["active"] == counts["total"]  # dense


@pytest.mark.parametrize("changes", [{"qkv_bias": True, "tie_embeddings": False}, {"n_kv_heads": 1},
                                     {"n_heads": 8, "n_kv_heads": 2, "head_dim": 8, "d_ff": 100}, {"qk_norm": True},
                                     {"moe": MoEConfig(n_experts=8, top_k=2, router="sigmoid", n_shared_experts=2,
                                                       n_group=4, topk_group=2)}])
def test_param_count_equals_model_for_variants(changes):
    cfg = get_preset("tiny").replace(**changes)
    assert param_count(cfg)["total"] == model_param_count(cfg)


def test_moe_param_count_equals_model_and_active_params_by_hand():
    cfg = get_preset("tiny").replace(moe=MoEConfig(n_experts=8, top_k=2))
    counts = param_count(cfg)
    assert counts["total"] == model_param_count(cfg)
    experts = 2 * 8 * 3 * 64 * 192  # layers * experts * SwiGLU
    assert expert_params(cfg) == experts
    assert counts["total"] - counts["active"] == experts * 6 // 8  # 6 of 8 experts idle per token
    dense = get_preset("tiny")
    assert matmul_params(cfg) - matmul_params(dense) == 2 * (3 * 64 * 192 + 64 * 8)  # a 2nd expert + router


def test_param_count_tiny_by_hand():
    # tiny: h=64, a=4 heads, k=2 KV heads, d=16, f=192, L=2, v=259, tied.
    attention = 64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64  # q, k+v, o = 4096 + 4096 + 4096
    per_layer = attention + 3 * 64 * 192 + 2 * 64  # + SwiGLU 36864 + two norms 128 = 49280
    assert param_count(get_preset("tiny")) == {
        "total": 115_200, "embedding": 259 * 64, "non_embedding": 2 * per_layer + 64, "active": 115_200}


def llama_config(**fields) -> dict:
    """A hand-written Llama config.json (no rope_scaling: config_from_hf rejects scaled RoPE)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            **fields}


# Published totals (the model cards / safetensors metadata of meta-llama/* and Qwen/*).
PUBLISHED = {
    "llama-2-7b": (llama_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rope_theta=10000.0), 6_738_415_616),
    "llama-2-70b": (llama_config(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                                 rope_theta=10000.0), 68_976_648_192),
    "llama-3-8b": (llama_config(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rope_theta=500000.0), 8_030_261_248),
    # q/k/v biases and tied embeddings: exercises the qwen2 branch.
    "qwen2-0.5b": ({"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "vocab_size": 151936,
                    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False},
                   494_032_768),
}
# GPT-2 small (124,439,808) is not expressible: learned position embeddings, LayerNorm with biases and a GELU
# MLP with biases are outside ModelConfig, and config_from_hf rejects model_type "gpt2".


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
    hf_config, published = PUBLISHED[name]
    assert param_count(config_from_hf(hf_config))["total"] == published


# --- FLOPs ---------------------------------------------------------------------------------------------------
# XLA's cost analysis counts a matmul as exactly 2*M*N*K FLOPs, and also counts elementwise work (softmax,
# RMSNorm, RoPE, SiLU, residual adds) that the analytic formula leaves out, so XLA / analytic must be >= 1 and
# a little above it. Observed (jax 0.10.2 CPU, batch 2 x 64 tokens): forward tiny 1.028, small 1.013;
# forward + backward tiny 1.036, small 1.016. The tolerance, XLA within [1.00, 1.05] x analytic, is tighter than
# any term we could get wrong: for tiny, the LM head is 12.6% of forward FLOPs, attention's QK^T and PV 12.5%,
# and counting k/v projections with a instead of k heads would add 6%.
# XLA counts a while-loop body once, not once per trip, so the layer scan is unrolled for the count. The
# reference attention materialises the full s x s scores (no causal skipping): compare with causal_halved=False.

FLOP_CASES = [("tiny", 2, 64), ("small", 2, 64)]


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of dicts in some jax versions
    return float(cost["flops"])


@pytest.fixture
def unrolled_scan(monkeypatch):
    monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))


def abstract_model(name: str):
    cfg = get_preset(name).replace(attention_impl="reference")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))
    return cfg, graphdef, state


@pytest.mark.parametrize("name,batch,seq_len", FLOP_CASES)
def test_forward_flops_match_xla(name, batch, seq_len, unrolled_scan):
    cfg, graphdef, state = abstract_model(name)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    measured = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, tokens)
    analytic = flops_per_token(cfg, seq_len, training=False) * batch * seq_len
    assert 1.0 <= measured / analytic <= 1.05, measured / analytic


@pytest.mark.parametrize("name,batch,seq_len", FLOP_CASES)
def test_training_flops_match_xla(name, batch, seq_len, unrolled_scan):
    cfg, graphdef, state = abstract_model(name)
    params = nnx.to_pure_dict(state)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)  # the loss predicts tokens[:, 1:]
    measured = xla_flops(jax.grad(lambda p, x: loss_fn(p, graphdef, x)), params, tokens)
    analytic = flops_per_token(cfg, seq_len) * batch * seq_len
    assert 1.0 <= measured / analytic <= 1.05, measured / analytic


def test_flops_per_token_by_hand():
    cfg = get_preset("tiny")  # matmul params: 2 * (12288 + 36864) + 64 * 259 = 114880
    attention = 4 * 2 * 64 * 4 * 16  # 4 * L * s * a * d at s = 64: 32768
    assert flops_per_token(cfg, 64, training=False) == 2 * 114_880 + attention
    assert flops_per_token(cfg, 64) == 3 * (2 * 114_880 + attention)
    assert flops_per_token(cfg, 64, causal_halved=True) == 3 * (2 * 114_880 + attention / 2)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)


# --- memory --------------------------------------------------------------------------------------------------

LLAMA2_7B = 6_738_415_616


def test_train_memory_7b_fsdp8_by_hand():
    cfg = get_preset("7b")  # h = 4096, a = 32, L = 32, v = 32000
    mem = train_memory(cfg, Layout(fsdp=8), micro_batch=1, seq_len=4096)
    assert mem["params"] == LLAMA2_7B * 4 // 8 == 3_369_207_808
    assert mem["grads"] == mem["params"]
    assert mem["optimizer"] == LLAMA2_7B * 8 // 8  # two fp32 moments
    sbh = 4096 * 1 * 4096
    per_layer = sbh * (34 + 5 * 32 * 4096 / 4096)  # s*b*h*(34 + 5as/h) = 16,777,216 * 194
    head = 2 * 2 * sbh + 4 * 4096 * 32000  # final-norm + head inputs in bf16, fp32 logits
    assert mem["activations"] == 32 * per_layer + head == 104_744_353_792
    assert mem["total"] == mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"]


def test_train_memory_remat_and_tensor_parallel_by_hand():
    cfg = get_preset("7b")
    sbh, t = 2048 * 2 * 4096, 8
    selective = train_memory(cfg, Layout(tensor=t), 2, 2048, remat="selective")
    head = (2 * 2 * sbh + 4 * 2048 * 2 * 32000) / t
    assert selective["activations"] == 32 * sbh * 34 / t + head
    assert selective["params"] == math.ceil(LLAMA2_7B * 4 / t)
    full = train_memory(cfg, Layout(), 2, 2048, remat="full")
    assert full["activations"] == 32 * 2 * sbh + 2 * 2 * sbh + 4 * 2048 * 2 * 32000
    # Tensor parallelism without sequence parallelism keeps 10 s*b*h per layer unsplit.
    no_sp = activation_bytes_per_layer(cfg, 2, 2048, tensor=t, tp_sequence_parallel=False)
    assert no_sp == sbh * (10 + 24 / t + 5 * 32 * 2048 / (4096 * t))
    # 16-bit params: fp32 master copy + two moments = 12 bytes per parameter (ZeRO).
    bf16 = train_memory(cfg, Layout(fsdp=4), 1, 1024, param_bytes=2)
    assert bf16["optimizer"] == LLAMA2_7B * 12 // 4 and bf16["params"] == LLAMA2_7B * 2 // 4


def test_train_memory_pipeline_and_sequence_by_hand():
    cfg = get_preset("7b")
    sbh = 4096 * 1 * 4096
    per_layer = sbh * (34 + 5 * 32 * 4096 / 4096)
    head = 2 * 2 * sbh + 4 * 4096 * 32000  # the head's input and norm (bf16), float32 logits
    # 4 stages, GPipe with 1 micro-batch: 1 + 3 loop iterations, each keeping a stage's 8 layers, and the head.
    mem = train_memory(cfg, Layout(stage=4), 1, 4096)
    assert mem["activations"] == 4 * 8 * per_layer + head
    # 4 micro-batches: 4 + 3 iterations' activations; the head runs over all 4 micro-batches.
    mem = train_memory(cfg, Layout(stage=4), 1, 4096, pipeline_microbatches=4)
    assert mem["activations"] == 7 * 8 * per_layer + 4 * head
    assert mem["params"] == LLAMA2_7B * 4 // 4
    # Sequence parallelism divides every activation, the scores included, and no parameter.
    mem = train_memory(cfg, Layout(sequence=4), 1, 4096)
    assert mem["activations"] == (32 * per_layer + 2 * 2 * sbh + 4 * 4096 * 32000) / 4
    assert mem["params"] == LLAMA2_7B * 4


def test_train_memory_data_parallel_replicates():
    cfg = get_preset("125m")
    assert train_memory(cfg, Layout(data=8), 4, 1024) == train_memory(cfg, Layout(), 4, 1024)


@pytest.mark.parametrize("kwargs,match", [({"optimizer": "adagrad"}, "optimizer"), ({"remat": "some"}, "remat"),
                                          ({"micro_batch": 0}, "micro_batch"), ({"param_bytes": 3}, "param_bytes")])
def test_train_memory_rejects_bad_arguments(kwargs, match):
    args = {"micro_batch": 1, "seq_len": 64} | kwargs
    with pytest.raises(ValueError, match=match):
        train_memory(get_preset("tiny"), Layout(), **args)
    with pytest.raises(ValueError, match="layout.stage"):
        train_memory(get_preset("tiny"), Layout(stage=4), 1, 64)


# --- KV cache ------------------------------------------------------------------------------------------------

def test_kv_cache_bytes():
    assert kv_cache_bytes(get_preset("7b"), 1) == 524_288  # 2 * 32 layers * 32 heads * 128 * 2 bytes
    llama3 = config_from_hf(PUBLISHED["llama-3-8b"][0])
    assert kv_cache_bytes(llama3, 8192) == 2 * 32 * 8 * 128 * 2 * 8192  # GQA: 8 KV heads, 1 GiB at 8k tokens
    assert kv_cache_bytes(get_preset("7b"), 10, "float32") == 10 * 2 * 524_288
    with pytest.raises(ValueError, match="dtype"):
        kv_cache_bytes(get_preset("7b"), 1, "bfloat17")


# --- communication -------------------------------------------------------------------------------------------
# tiny: P = 115,200 params, h = 64, a = 4, k = 2, d = 16, L = 2; b = 1, s = 64, fp32 grads, bf16 activations.

TINY_P = 115_200


def comm(layout: Layout, **kwargs) -> dict[str, int]:
    return comm_bytes(get_preset("tiny"), layout, 1, 64, **kwargs)


def test_comm_zero_without_parallelism():
    assert set(comm(Layout()).values()) == {0}


def test_comm_data_parallel_ring_all_reduce():
    out = comm(Layout(data=4))
    assert out["data"] == 2 * 3 / 4 * TINY_P * 4 == 691_200
    assert out["total"] == out["data"]


def test_comm_fsdp():
    out = comm(Layout(fsdp=4), n_microbatches=2)  # per micro-batch: 2 all-gathers (fp32) + 1 reduce-scatter
    assert out["fsdp"] == 2 * 3 / 4 * (4 + 4 + 4) * TINY_P == 2_073_600
    assert out["total"] == out["fsdp"]
    hsdp = comm(Layout(data=2, fsdp=4))  # the data all-reduce is of the fsdp shard
    assert hsdp["data"] == 2 * 1 / 2 * TINY_P / 4 * 4


def test_comm_tensor_parallel():
    out = comm(Layout(tensor=2))  # 2 layers * 4 all-reduces * 2*(1/2) * (1*64*64 * 2 bytes)
    assert out["tensor"] == 2 * 4 * 1 * 8192 == 65_536
    assert out["total"] == out["tensor"]


def test_comm_pipeline():
    x = 1 * 64 * 64 * 2  # one micro-batch's activation
    # 2 stages, 4 micro-batches: 5 iterations, activations forward and gradients back (each end stage really
    # sends one way, counted as both); the outputs' and the input gradient's all-reduces (2 * 1/2 * 4x each)
    assert comm(Layout(stage=2), n_microbatches=4)["stage"] == 2 * 5 * x + 2 * 4 * x
    deeper = comm_bytes(get_preset("tiny").replace(n_layers=4), Layout(stage=4), 1, 64, n_microbatches=4)
    # a middle stage sends activations forward and gradients backward in each of 7 iterations
    assert deeper["stage"] == 2 * 7 * x + 2 * (2 * 3 / 4 * 4 * x)
    assert deeper["total"] == deeper["stage"]
    # two flushes (gradient accumulation) of 2 micro-batches: 2 * (2 + 1) iterations
    assert comm(Layout(stage=2), n_microbatches=4, pipeline_flushes=2)["stage"] == 2 * 6 * x + 2 * 4 * x
    assert comm(Layout(stage=2, tensor=2))["stage"] == (2 * 2 * x + 2 * x) / 2  # the residual stream is sharded over t
    with pytest.raises(ValueError, match=r"n_microbatches \(3\) must be a multiple of pipeline_flushes \(2\)"):
        comm(Layout(stage=2), n_microbatches=3, pipeline_flushes=2)
    with pytest.raises(ValueError, match="layout.stage"):
        comm(Layout(stage=4))  # tiny has 2 layers


def test_comm_sequence_parallel():
    ulysses = comm(Layout(sequence=4))  # s' = 16; q, k, v, out all-to-alls, forward and backward
    # tiny's 2 KV heads cannot split 4 ways, so K and V go as 4 heads each, like q
    assert ulysses["sequence"] == 2 * 2 * 3 / 4 * 1 * 16 * 16 * (2 * 4 + 2 * 4) * 2 == 24_576
    assert ulysses["data"] == 2 * 3 / 4 * TINY_P * 4  # params replicated over the sequence group
    split_kv = comm(Layout(sequence=2))  # 2 KV heads split 2 ways: K and V go as they are
    assert split_kv["sequence"] == 2 * 2 * 1 / 2 * 1 * 32 * 16 * (2 * 4 + 2 * 2) * 2 == 24_576
    # ring: 3 ppermutes of the local K and V forward, 3 again backward, and 4 of their float32 gradients
    ring = comm(Layout(sequence=4), sequence_impl="ring")
    kv_block = 1 * 16 * 2 * 2 * 16  # b * s' * (K and V) * k * d elements
    assert ring["sequence"] == 2 * (3 * kv_block * 2 + 3 * kv_block * 2 + 4 * kv_block * 4) == 57_344  # 2 layers


def test_comm_expert_hook_is_zero_for_dense():
    assert comm(Layout(expert=2))["expert"] == 0


def test_comm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sequence_impl"):
        comm(Layout(sequence=2), sequence_impl="star")
    with pytest.raises(ValueError, match="n_microbatches"):
        comm(Layout(), n_microbatches=0)


# --- Layout --------------------------------------------------------------------------------------------------

def test_layout_parse_and_devices():
    layout = Layout.parse("data=2, fsdp=4,tensor=1")
    assert layout == Layout(data=2, fsdp=4) and layout.devices == 8
    assert Layout.parse("") == Layout()


@pytest.mark.parametrize("text,match", [("data=2,foo=3", "'foo=3'"), ("data=x", "'data=x'"), ("fsdp", "'fsdp'"),
                                        ("data=0", "layout.data"), ("data=2,data=4", "given twice")])
def test_layout_parse_errors_name_the_bad_part(text, match):
    with pytest.raises(ValueError, match=match):
        Layout.parse(text)


def test_layout_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="layout.tensor must be an integer >= 1, got 0"):
        Layout(tensor=0)
    with pytest.raises(ValueError, match="layout.stage"):
        Layout(stage=True)


# --- scripts/estimate.py -------------------------------------------------------------------------------------

def test_estimate_cli_prints_table(capsys, tmp_path):
    from scripts.estimate import main

    assert main(["--preset", "7b", "--layout", "fsdp=8", "--micro-batch", "1", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "524,288" in out
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(PUBLISHED["llama-2-70b"][0]))
    assert main(["--hf-config", str(path), "--layout", "fsdp=64,tensor=8"]) == 0
    assert "68,976,648,192" in capsys.readouterr().out


def test_estimate_cli_bad_layout_exits_2(capsys):
    from scripts.estimate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--layout", "data=2,tensr=2"])
    assert exit_info.value.code == 2
    assert "'tensr=2'" in capsys.readouterr().err


@pytest.mark.parametrize("depth", [1, 2])
def test_training_flops_with_mtp_modules_match_xla(depth, unrolled_scan):
    """Training's objective with D multi-token prediction modules (train/step.py `objective_fn`): XLA's count of
    its gradient within [1.00, 1.05] x flops_per_token, which adds the modules; without them it would be short by
    about D / (L + 1) blocks plus D heads."""
    cfg = get_preset("tiny").replace(attention_impl="reference", mtp_depth=depth)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))
    batch, seq_len = 2, 64
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    measured = xla_flops(jax.grad(lambda p, x: objective_fn(p, graphdef, x)[0]), nnx.to_pure_dict(state), tokens)
    analytic = flops_per_token(cfg, seq_len) * batch * seq_len
    assert 1.0 <= measured / analytic <= 1.05, measured / analytic
    assert measured / (flops_per_token(cfg.replace(mtp_depth=0), seq_len) * batch * seq_len) > 1.1
