"""train/tokenizer.py against independent references: ByteTokenizer against Python's own UTF-8 codec (exact round
trips of arbitrary text and bytes); the SmolLM2-135M-Instruct GGUF's tokenizer, built here from the file's header
with the `tokenizers` library, against transformers' own GGUF import of the same file (ids of English, code, emoji,
CJK, whitespace runs and special-token strings; decodes; chat prompts); and a tokenizer.json that transformers
saves, read back by `load_tokenizer`."""

from __future__ import annotations

import numpy as np
import pytest

from model.presets import BYTE_VOCAB
from train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
LENGTHS = [0, 1, 2, 3, 17, 255, 256, 1000, 2000]

# code point ranges: ASCII (incl. NUL and controls), Latin-1, combining marks, CJK, emoji, the rest of the
# BMP below the surrogates, the BMP above them, and the supplementary planes
RANGES = [(0x00, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x100, 0xD7FF),
          (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]


def random_text(rng: np.random.Generator, n: int) -> str:
    picks = rng.integers(0, len(RANGES), size=n)
    return "".join(chr(int(rng.integers(RANGES[i][0], RANGES[i][1] + 1))) for i in picks)


@pytest.mark.parametrize("n", LENGTHS)
def test_text_round_trip(n):
    rng = np.random.default_rng(n)
    text = random_text(rng, n)
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode(ids.tolist()) == text


def test_special_text_round_trips():
    for text in ["", "\x00", "a\x00b", "e\u0301\u0327", "👩‍👩‍👧", "日本語", "\uffff\U0010ffff", "\r\n\t"]:
        assert TOK.decode(TOK.encode(text)) == text


@pytest.mark.parametrize("n", LENGTHS)
def test_arbitrary_bytes_round_trip(n):
    data = np.random.default_rng(100 + n).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    assert TOK.decode_bytes(np.frombuffer(data, np.uint8)) == data
    framed = np.concatenate([[TOK.BOS], np.frombuffer(data, np.uint8), [TOK.EOS, TOK.PAD]]).astype(np.uint16)
    assert TOK.decode_bytes(framed) == data
    # invalid UTF-8 decodes as Python's replacement decoding would, never raises
    assert TOK.decode(framed) == data.decode("utf-8", errors="replace")


def test_bos_eos_framing_and_specials():
    assert (TOK.BOS, TOK.EOS, TOK.PAD, TOK.vocab_size) == (256, 257, 258, 259)
    assert TOK.vocab_size == BYTE_VOCAB
    text = "héllo ✓"
    raw = list(text.encode("utf-8"))
    assert TOK.encode(text, bos=True).tolist() == [256, *raw]
    assert TOK.encode(text, eos=True).tolist() == [*raw, 257]
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids.tolist() == [256, *raw, 257]
    assert ids.max() < TOK.vocab_size
    assert TOK.decode(ids) == text
    assert TOK.decode([258, *ids.tolist(), 258, 256]) == text
    assert TOK.encode("", bos=True, eos=True).tolist() == [256, 257]
    assert TOK.decode([]) == ""


# --- real tokenizers: the SmolLM2 GGUF, against transformers -----------------------------------------------------

TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x**2  # ok\n",
         "for (int i = 0; i < n; ++i) { sum += a[i]; }", "emoji 😀👩‍👩‍👧 end 🇫🇷", "中文 日本語 한국어 ελληνικά",
         "   spaces\t\ttabs\n\n\nnewlines  ", " leading space", "naïve café Ünïcödé", "",
         "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "<|im_end|><|im_end|>", "<repo_name>x/y",
         "1234567890 3.14159 1e-9", "'s 't 're 've 'm 'll 'd", "\u200b\u00a0\ufeff", "a" * 300]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello 😀"}, {"role": "assistant", "content": "Hi! 中文?"},
     {"role": "user", "content": "def f():\n    pass"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  "},
     {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers of the SmolLM2-135M-Instruct GGUF file."""
    from model.gguf import smollm2_path
    from train.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_tokenizer(path), reference


@pytest.mark.slow
def test_gguf_ids_match_transformers(smollm2):
    ours, ref = smollm2
    assert ours.vocab_size == len(ref) == 49152
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_gguf_special_tokens_and_stops(smollm2):
    ours, ref = smollm2
    assert ours.bos_id == ref.bos_token_id == 1
    assert ours.special_tokens == {"bos_token": ref.bos_token, "eos_token": ref.eos_token,
                                   "unk_token": ref.unk_token, "pad_token": ref.pad_token}
    assert ref.eos_token_id in ours.eos_ids and ours.encode("<|im_end|>") == [ours.eos_ids[0]]
    assert ours.encode("hi")[0] != ours.bos_id  # the file says add_bos_token false: no BOS on text


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_prompts_match_transformers(smollm2, add_generation_prompt):
    ours, ref = smollm2
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        assert ours.encode_chat(messages, add_generation_prompt) == list(getattr(ids, "input_ids", ids))


@pytest.mark.slow
def test_tokenizer_json_saved_by_transformers_round_trips(smollm2, tmp_path):
    from train.tokenizer import load_tokenizer

    ours, ref = smollm2
    ref.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == ours.chat_template and loaded.eos_ids == ours.eos_ids
    assert (loaded.vocab_size, loaded.bos_id, loaded.special_tokens) == (ours.vocab_size, ours.bos_id,
                                                                         ours.special_tokens)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
    messages = CONVERSATIONS[2]
    assert loaded.encode_chat(messages) == ours.encode_chat(messages)
    ours.save(tmp_path / "ours")  # and ours written out reads back in transformers
    again = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)


def word_level_dir(folder, config: dict, post_processor: bool) -> None:
    """A small tokenizer.json (Llama-like special tokens) and its tokenizer_config.json in `folder`."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[INST]": 2, "hi": 3, "[/INST]": 4, "<unk>": 5},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "[INST]", "[/INST]"])
    if post_processor:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
         "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast", **config}))


@pytest.mark.parametrize("config, post_processor", [({}, True), ({"add_bos_token": True}, False),
                                                    ({"add_bos_token": False}, True),
                                                    ({"add_bos_token": True, "add_eos_token": True}, True)])
def test_bos_is_added_once_as_transformers_adds_it(tmp_path, config, post_processor):
    """Text gets the BOS that the tokenizer.json's post-processor adds -- whatever the config's add_bos_token says,
    as transformers 5's generic tokenizer does; a chat whose template writes BOS gets no second one (encoded without
    special tokens, as transformers' apply_chat_template(tokenize=True))."""
    import json

    from train.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    word_level_dir(tmp_path, config, post_processor)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    tok, ref = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hi", "hi hi", "[INST] hi [/INST]", ""]:
        assert tok.encode(text) == ref.encode(text), (text, config)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    chat = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert tok.encode_chat(messages) == list(getattr(chat, "input_ids", chat)) == [0, 2, 3, 4]
    assert tok.eos_ids == (1, 4) and tok.bos_id == 0
    if post_processor and not config:
        assert tok.encode("hi") == [0, 3]


def test_byte_text_tokenizer_meets_the_interface():
    from train.tokenizer import ByteTextTokenizer, Tokenizer, load_tokenizer

    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTextTokenizer) and isinstance(tok, Tokenizer)
    assert tok.encode("hé") == list("hé".encode()) and tok.decode(tok.encode("hé") + [tok.eos_ids[0]]) == "hé"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == "system: Be brief.\n\nuser: Hi\n\nassistant:"
    assert tok.encode_chat(messages, add_generation_prompt=False) == list(b"system: Be brief.\n\nuser: Hi\n\n")


def test_unsupported_and_missing_tokenizers_are_named(tmp_path):
    from train.tokenizer import UnsupportedTokenizer, load_tokenizer, tokenizer_from_gguf_metadata

    with pytest.raises(UnsupportedTokenizer, match="tokenizer.ggml.model 'llama' is not supported"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.ggml.pre 'mystery'"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path)
