"""The transformer against a naive numpy forward pass, the causal property, attention implementations against a
numpy per-head loop, remat invariance, and bf16 compute.

Tolerances: float32 vs a float64 numpy reference: `atol = 1e-5 * max|ref|` (fp32 eps 1.2e-7 accumulated over
64-192-wide dot products, 2 layers and a softmax stays ~1e-6 of the scale; any wiring error moves results by
O(scale)). remat only changes what is recomputed, not the arithmetic: 1e-6. bf16 compute (8-bit mantissa)
through 2 layers: 2e-2 norm-wise (see the test).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import attention, flash_attention, reference_attention, xla_attention
from model.presets import get_preset
from model.transformer import create_model
from train.step import loss_fn

TINY = get_preset("tiny")  # d_model 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, d_ff 192


def graphdef_of(cfg):
    """The model's graph for `cfg` without running an initialiser (shapes only)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))
    return graphdef


def random_params(cfg, seed: int = 0) -> dict:
    """Params of the model's shapes with every leaf random: matrices ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1),
    biases ~ N(0, 0.1), so a wrong scale, bias or transposition cannot hide behind an initial value of 1 or 0."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        x = 0.1 * rng.standard_normal(leaf.shape)
        if path[-1].key == "scale":
            x += 1.0
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def forward_fn(cfg):
    graphdef = graphdef_of(cfg)
    return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))


# ---------------------------------------------------------------- naive numpy reference (float64)

def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x_BxTxNxD, theta):
    D = x_BxTxNxD.shape[-1]
    inv_freq = theta ** (-np.arange(0, D // 2) * 2.0 / D)  # theta^(-2i/D), i = 0 .. D/2-1
    angles = np.arange(x_BxTxNxD.shape[1])[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    out = np.empty_like(x_BxTxNxD)
    for i in range(D // 2):  # rotate pair (i, i + D/2) by angle pos * inv_freq[i]
        a, b = x_BxTxNxD[..., i], x_BxTxNxD[..., i + D // 2]
        out[..., i] = a * cos[..., i] - b * sin[..., i]
        out[..., i + D // 2] = b * cos[..., i] + a * sin[..., i]
    return out


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_forward(p: dict, cfg, tokens_BxT: np.ndarray) -> np.ndarray:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens_BxT.shape
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = p["embed"][tokens_BxT]  # [B, T, d]
    causal = np.tril(np.ones((T, T), bool))
    blocks = p["blocks"]
    for layer in range(cfg.n_layers):
        at = {k: v[layer] for k, v in blocks["attn"].items()}
        h = np_rms_norm(x, blocks["attn_norm"]["scale"][layer], cfg.norm_eps)
        q = np.einsum("btd,dhk->bthk", h, at["wq"])
        k = np.einsum("btd,dhk->bthk", h, at["wk"])
        v = np.einsum("btd,dhk->bthk", h, at["wv"])
        if cfg.qkv_bias:
            q, k, v = q + at["bq"], k + at["bk"], v + at["bv"]
        q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
        k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # query head h uses kv head h // (H/K)
        scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(D)
        scores = np.where(causal, scores, -np.inf)
        out = np.einsum("bhts,bshk->bthk", np_softmax(scores), v)
        x = x + np.einsum("bthk,hkd->btd", out, at["wo"])
        h = np_rms_norm(x, blocks["mlp_norm"]["scale"][layer], cfg.norm_eps)
        ml = {k: v[layer] for k, v in blocks["mlp"].items()}
        x = x + (np_silu(h @ ml["w_gate"]) * (h @ ml["w_up"])) @ ml["w_down"]
    x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def assert_close_to_ref(actual, ref, rel=1e-5):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(actual), ref, rtol=rel, atol=rel * np.abs(ref).max())


TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(2, 16)).astype(np.int32)


# ---------------------------------------------------------------- forward pass vs numpy

@pytest.mark.parametrize("changes", [
    {},  # GQA 4 query heads on 2 kv heads, tied head, xla attention
    {"n_kv_heads": 1, "tie_embeddings": False, "qkv_bias": True},  # MQA, untied head, biases
    {"n_kv_heads": 4, "attention_impl": "reference", "rope_theta": 500.0, "qkv_bias": True},  # MHA, fast RoPE
], ids=["gqa_tied", "mqa_untied_bias", "mha_reference_bias"])
def test_forward_matches_numpy(changes):
    cfg = TINY.replace(dtype="float32", **changes)
    params = random_params(cfg, seed=3)
    logits = forward_fn(cfg)(params, jnp.asarray(TOKENS))
    assert logits.dtype == jnp.float32 and logits.shape == (*TOKENS.shape, cfg.vocab_size)
    assert_close_to_ref(logits, np_forward(params, cfg, TOKENS))


def test_create_model_params_have_expected_shapes_and_init():
    """The real initialiser: stacked layer axis, norm scales at 1, biases at 0, matrices ~ N(0, init_std)."""
    cfg = TINY.replace(qkv_bias=True, tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.state(create_model(cfg, seed=0), nnx.Param))
    L, d, H, K, D, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn, mlp = params["blocks"]["attn"], params["blocks"]["mlp"]
    shapes = {"wq": (L, d, H, D), "wk": (L, d, K, D), "wv": (L, d, K, D), "wo": (L, H, D, d),
              "bq": (L, H, D), "bk": (L, K, D), "bv": (L, K, D)}
    assert {k: v.shape for k, v in attn.items()} == shapes
    assert {k: v.shape for k, v in mlp.items()} == {"w_gate": (L, d, F), "w_up": (L, d, F), "w_down": (L, F, d)}
    assert params["embed"].shape == (cfg.vocab_size, d) and params["lm_head"].shape == (d, cfg.vocab_size)
    for scale in (params["blocks"]["attn_norm"]["scale"], params["final_norm"]["scale"]):
        np.testing.assert_array_equal(scale, 1.0)
    np.testing.assert_array_equal(attn["bq"], 0.0)
    # 16k samples: the sample std is within ~1% of init_std (3 sigma = 3 / sqrt(2 * 16384) = 1.7%)
    assert abs(float(jnp.std(params["embed"])) / cfg.init_std - 1) < 0.03
    # layers are initialised independently
    assert not np.allclose(attn["wq"][0], attn["wq"][1])


# ---------------------------------------------------------------- causality

@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_causal(impl):
    cfg = TINY.replace(dtype="float32", attention_impl=impl)
    params = random_params(cfg, seed=5)
    T = 16
    changed = [0, 5, 11, 15]
    base = np.random.default_rng(7).integers(0, 256, size=T)
    rows = [base]
    for t in changed:
        row = base.copy()
        row[t] = (row[t] + 1 + t) % 256
        rows.append(row)
    logits = np.asarray(forward_fn(cfg)(params, jnp.asarray(np.stack(rows), jnp.int32)))
    scale = np.abs(logits).max()
    for i, t in enumerate(changed, start=1):
        # positions before t: unchanged (to fp32 noise; rows of a batch may be computed in different orders)
        np.testing.assert_allclose(logits[i, :t], logits[0, :t], rtol=0, atol=1e-6 * scale)
        # positions t and later all see token t: every one of them moves by O(scale)
        moved = np.abs(logits[i, t:] - logits[0, t:]).max(axis=-1)
        assert (moved > 1e-3 * scale).all(), (t, moved)


# ---------------------------------------------------------------- attention implementations

def np_attention(q, k, v, causal: bool) -> np.ndarray:
    """One head at a time, float64; causal masking aligns the last query with the last key."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            scores = q[b, :, h] @ k[b, :, kv].T / np.sqrt(D)  # [T, S]
            if causal:
                allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
                scores = np.where(allowed, scores, -np.inf)
            out[b, :, h] = np_softmax(scores) @ v[b, :, kv]
    return out


def qkv(T: int, S: int, H: int, K: int, D: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((2, T, H, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, S, K, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, S, K, D)), jnp.float32))


IMPLS = {"reference": reference_attention, "xla": xla_attention, "flash": flash_attention}  # flash: interpreted


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy(impl, group, causal):
    q, k, v = qkv(T=7, S=7, H=4, K=4 // group, seed=group)
    out = IMPLS[impl](q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_ref(out, np_attention(q, k, v, causal))
    assert_close_to_ref(attention(q, k, v, impl=impl, causal=causal), np_attention(q, k, v, causal))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_attention_fewer_queries_than_keys(impl):
    """T < S (decoding with a prefix): query i is at absolute position i + S - T; the last query sees every key."""
    q, k, v = qkv(T=3, S=9, H=4, K=2, seed=11)
    causal_out = IMPLS[impl](q, k, v, causal=True)
    assert_close_to_ref(causal_out, np_attention(q, k, v, causal=True))
    full = np_attention(q, k, v, causal=False)
    assert_close_to_ref(causal_out[:, -1], full[:, -1])
    assert not np.allclose(causal_out[:, 0], full[:, 0], atol=1e-3)  # the first query does not see the last keys
    assert_close_to_ref(IMPLS[impl](q, k, v, causal=False), full)


def test_auto_attention_picks_cudnn_only_where_it_runs(monkeypatch):
    """"auto" (the default) is cuDNN on a GPU in half precision with a supported head dim, XLA otherwise. Which
    one ran is read from the dispatch itself: each stand-in returns its own name."""
    import model.attention as attn

    monkeypatch.setattr(attn, "cudnn_attention", lambda q, k, v, causal: "cudnn")
    monkeypatch.setattr(attn, "xla_attention", lambda q, k, v, causal: "xla")
    q, k, v = qkv(T=2, S=2, H=2, K=2, D=64)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert attention(*half) == "xla"  # this machine is a CPU
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    assert attention(*half) == "cudnn"
    assert attention(*[a.astype(jnp.float16) for a in (q, k, v)]) == "cudnn"
    assert attention(q, k, v) == "xla"  # float32
    wide = [jnp.zeros((1, 2, 2, 256), jnp.bfloat16)] * 3  # head dim 256: beyond cuDNN's flash kernel
    assert attention(*wide) == "xla"
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention(*half) == "xla"  # a sequence-sharded step: GSPMD partitions XLA's attention


@pytest.mark.parametrize("impl, pattern", [
    ("cudnn", "'cudnn' needs an NVIDIA GPU; this backend is 'cpu'"),  # this machine is a CPU
    ("flash9", "'flash9'"),  # no such implementation
])
def test_attention_impl_refused_by_name(impl, pattern):
    q, k, v = qkv(T=2, S=2, H=2, K=2)
    with pytest.raises(ValueError, match=pattern):
        attention(q, k, v, impl=impl)


# ---------------------------------------------------------------- remat and bf16

def test_remat_policies_same_loss_and_grads():
    params = random_params(TINY, seed=9)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(2, 17)), jnp.int32)
    policies = ("none", "full", "dots")
    graphdefs = [graphdef_of(TINY.replace(dtype="float32", remat=policy)) for policy in policies]
    # remat is really applied (a checkpoint in the traced program) exactly when asked for
    for policy, graphdef in zip(policies, graphdefs, strict=True):
        jaxpr = str(jax.make_jaxpr(lambda p, t, g=graphdef: loss_fn(p, g, t))(params, tokens))
        assert ("checkpoint[" in jaxpr or "remat" in jaxpr) == (policy != "none"), policy
    # one compilation for all three (compile time dominates this test)
    outs = jax.jit(lambda p, t: [jax.value_and_grad(loss_fn)(p, g, t) for g in graphdefs])(params, tokens)
    results = dict(zip(policies, outs, strict=True))
    loss_ref, grads_ref = results["none"]
    for policy in ("full", "dots"):
        loss, grads = results[policy]
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6 * np.abs(g_ref).max())
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_ref))  # every parameter gets a gradient


def test_bfloat16_compute_close_to_float32():
    """bf16 rounds (unit roundoff 2^-9 = 2e-3) at ~10 places per layer (activations, q/k/v, probabilities,
    residual adds): the observed norm-wise error is ~1.1e-2 and the worst logit ~1.7e-2 of max|logit| over seeds."""
    params = random_params(TINY, seed=4)
    ref = np.asarray(forward_fn(TINY.replace(dtype="float32"))(params, jnp.asarray(TOKENS)))
    logits = forward_fn(TINY.replace(dtype="bfloat16"))(params, jnp.asarray(TOKENS))
    assert logits.dtype == jnp.float32
    diff = np.asarray(logits) - ref
    assert np.linalg.norm(diff) / np.linalg.norm(ref) < 2e-2
    assert np.abs(diff).max() / np.abs(ref).max() < 4e-2
    assert np.linalg.norm(diff) / np.linalg.norm(ref) > 1e-4  # it really computed in bf16 (fp32 would give ~1e-7)


# ---------------------------------------------------------------- layer loop and head-gradient dtype

def _loss_and_grads(cfg, tokens: jax.Array):
    model = create_model(cfg)
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


def test_unrolled_layers_equal_scanned_layers():
    """scan_layers=False (the default: a Python loop over the same stacked weights) against the scan: logits and
    gradients."""
    cfg = TINY.replace(dtype="float32", remat="full", scan_layers=True)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    scanned, unrolled = _loss_and_grads(cfg, tokens), _loss_and_grads(cfg.replace(scan_layers=False), tokens)
    np.testing.assert_allclose(unrolled[1], scanned[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(unrolled[2]), jax.tree.leaves(scanned[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_logits_grad_in_compute_dtype():
    """logits_grad_dtype="compute" (the default) against "float32". float32 compute: the same logits, gradients to
    float32 rounding (rtol 1e-5: the two graphs fuse differently, and XLA may then sum in another order; 7e-6 was
    seen on a busy machine, so bit-equality is not promised). bfloat16 compute: the same logits, and gradients
    within bfloat16 rounding of the float32-cotangent ones (the head's backward is the only change)."""
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, TINY.vocab_size)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        cfg = TINY.replace(dtype=dtype, logits_grad_dtype="float32")
        base, rounded = _loss_and_grads(cfg, tokens), _loss_and_grads(cfg.replace(logits_grad_dtype="compute"),
                                                                       tokens)
        np.testing.assert_array_equal(rounded[1], base[1])
        for a, b in zip(jax.tree.leaves(rounded[2]), jax.tree.leaves(base[2]), strict=True):
            scale = float(jnp.max(jnp.abs(b))) or 1.0
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)
    with pytest.raises(ValueError, match="logits_grad_dtype must be one of"):
        TINY.replace(logits_grad_dtype="bfloat16")
