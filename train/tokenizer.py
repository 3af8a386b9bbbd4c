"""Tokenizers: one small interface (`Tokenizer`) met by the byte tokenizer of meshlm's own runs and by real
models' tokenizers (a Hugging Face `tokenizer.json`, or the vocabulary in a GGUF file), and `load_tokenizer` for
any of them.

A real tokenizer is a `tokenizers.Tokenizer` (the Rust library transformers' fast tokenizers wrap) plus what
`tokenizer_config.json` says around it: the BOS/EOS tokens, the chat template. Serving needs no `transformers`.
BOS is added once: plain text is encoded with the special tokens its tokenizer adds (`add_special_tokens=True`,
as transformers' `encode`), a rendered chat with none (the template writes BOS itself when the model wants it,
as transformers' `apply_chat_template(tokenize=True)`). `eos_ids` are the ids that end generation: EOS, the
generation config's EOS ids, and the end-of-turn tokens of chat models (e.g. `<|im_end|>`), as llama.cpp does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tokenizers

from train.chat_template import render_chat

# Control-token texts that end a turn in the chat formats llama.cpp knows (its end-of-generation list).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>")
CONFIG_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class UnsupportedTokenizer(ValueError):
    """A tokenizer meshlm cannot build (e.g. a GGUF file's sentencepiece vocabulary); the message names it."""


@runtime_checkable
class Tokenizer(Protocol):
    """What serving and generation need of a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]: ...


class ByteTokenizer:
    """Bytes as tokens: no vocabulary file, no unknown tokens, every UTF-8 string encodes and decodes exactly.
    `encode` gives uint16 arrays for training data; `ByteTextTokenizer` puts it behind the `Tokenizer` interface."""

    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Token ids (uint16) of `text`'s UTF-8 bytes, optionally framed by BOS/EOS."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = ([np.array([self.BOS], np.uint16)] if bos else []) + [ids]
        parts += [np.array([self.EOS], np.uint16)] if eos else []
        return np.concatenate(parts)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of the byte ids in `ids`; special ids are dropped and invalid UTF-8 is replaced, never raised."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: np.ndarray | list[int]) -> bytes:
        """The raw bytes of `ids` (special ids dropped): exact inverse of `encode` for any byte string."""
        arr = np.asarray(ids, dtype=np.int64)
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()


# The byte tokenizer's chat format: plain text, since it has no turn tokens. A turn is "<role>: <content>" and a
# blank line; a reply starts after "assistant:". A model trained on it ends its turn with "\n\n" -- give that as
# a stop string.
BYTE_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


BYTE_SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}  # ids 256, 257, 258


class ByteTextTokenizer:
    """`ByteTokenizer` behind the `Tokenizer` interface: no BOS added to text (meshlm's runs train on documents
    separated by EOS, no BOS), EOS ends generation, and `BYTE_CHAT_TEMPLATE` as its chat format."""

    vocab_size = ByteTokenizer.vocab_size
    bos_id = ByteTokenizer.BOS
    eos_ids = (ByteTokenizer.EOS,)
    chat_template = BYTE_CHAT_TEMPLATE

    def __init__(self) -> None:
        self.bytes = ByteTokenizer()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.bytes.encode(text).tolist()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.bytes.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def as_text_tokenizer(self) -> TextTokenizer:
        """The same ids as a `tokenizers` byte-level BPE without merges (id b is byte b; then BOS, EOS, PAD), so
        a run exported as a Hugging Face directory carries a tokenizer.json (`TextTokenizer.save`)."""
        chars = _bytes_to_unicode()
        backend = tokenizers.Tokenizer(tokenizers.models.BPE({chars[b]: b for b in range(256)}, []))
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS.values()))  # ids 256, 257, 258
        backend.encode_special_tokens = True  # text is bytes: "<|eos|>" in a text is seven bytes, as in ByteTokenizer
        return TextTokenizer(backend, special_tokens=BYTE_SPECIAL_TOKENS, chat_template=self.chat_template)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template its config names.
    `special_tokens` maps bos_token/eos_token/unk_token/pad_token to their text (what templates see)."""

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: dict[str, str | None],
                 chat_template: str | None = None, extra_eos_ids: Sequence[int] = (),
                 clean_up_spaces: bool = False):
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id(special_tokens.get("bos_token"))
        eos = [self._id(special_tokens.get("eos_token")), *extra_eos_ids]
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        if chat_template:  # the end-of-turn tokens this template writes
            eos += [self._id(t) for t in END_OF_TURN_TOKENS if t in specials and t in chat_template]
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template: give a text prompt, not messages")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (tokens, chat template) into `directory`, so that
        `load_tokenizer(directory)` -- or transformers' AutoTokenizer -- reads this tokenizer back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=self.clean_up_spaces)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _set_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Make encoding with special tokens add `bos` before and `eos` after the text (None: not that one), as
    transformers' `update_post_processor` does (for a GGUF file's add_bos_token/add_eos_token)."""
    bos = bos if bos is not None and backend.token_to_id(bos) is not None else None
    eos = eos if eos is not None and backend.token_to_id(eos) is not None else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    backend.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                      special_tokens=specials)


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for tokenizers whose config asks for it
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _chat_template_of(config: dict[str, Any], directory: Path | None) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and directory is not None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")  # transformers 5 saves it so
    if template is None and directory is not None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def tokenizer_from_json(path: str | Path, config_path: str | Path | None = None) -> TextTokenizer:
    """A Hugging Face `tokenizer.json` (and the `tokenizer_config.json`, `chat_template.jinja` and
    `generation_config.json` beside it, or `config_path`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    directory = path.parent
    config_path = Path(config_path) if config_path else directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception type for a malformed file
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read ({e})") from None
    # BOS/EOS on text come from tokenizer.json's post-processor alone (config's add_bos_token is not read): what
    # transformers 5's generic tokenizer does with the same files
    special = {k: _token_text(config.get(k)) for k in CONFIG_TOKENS}
    extra_eos: list[int] = []
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = _read_json(generation).get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    return TextTokenizer(backend, special_tokens=special, chat_template=_chat_template_of(config, directory),
                         extra_eos_ids=extra_eos,
                         clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


# --- GGUF: llama.cpp keeps the vocabulary in the file's header ----------------------------------------------------

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how text is split before BPE (None: GPT-2's own split, ByteLevel's default regex). Others
# are refused rather than split wrongly; transformers' integrations/gguf knows more of them.
GGUF_PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None, "starcoder": None, "refact": None, "codeshell": None,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: byte-level BPE vocabularies spell every byte as one of these."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_from_gguf_metadata(meta: dict[str, Any], where: str = "the GGUF file") -> TextTokenizer:
    """The tokenizer a GGUF header describes (`model.gguf.gguf_metadata`). Only byte-level BPE
    (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, Qwen2, SmolLM, ...) is built; other models raise
    UnsupportedTokenizer. Built as transformers' GGUF import builds it: BPE over the tokens and merges, control
    tokens (token_type 3) as special added tokens, user-defined ones (4) as plain added tokens, BOS prepended
    (EOS appended) when tokenizer.ggml.add_bos_token (add_eos_token) says so."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedTokenizer(f"{where}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', "
                                   f"byte-level BPE; 'llama' is a sentencepiece vocabulary)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_SPLITS:
        raise UnsupportedTokenizer(f"{where}: tokenizer.ggml.pre {pre!r} (how text is split before BPE) is not "
                                   f"known; known: {sorted(GGUF_PRE_SPLITS)}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                                         continuing_subword_prefix="", end_of_word_suffix="",
                                                         fuse_unk=False))
    prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    split = GGUF_PRE_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    else:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = tokenizers.decoders.ByteLevel()
    # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel: transformers skips it too
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True)
                                if ty == GGUF_CONTROL and set(t) <= alphabet])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == GGUF_USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    _set_bos_eos(backend, special["bos_token"] if meta.get("tokenizer.ggml.add_bos_token") else None,
                 special["eos_token"] if meta.get("tokenizer.ggml.add_eos_token") else None)
    extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if isinstance(meta.get(k), int)]
    return TextTokenizer(backend, special_tokens=special, chat_template=meta.get("tokenizer.chat_template"),
                         extra_eos_ids=extra_eos)


def tokenizer_from_gguf(path: str | Path) -> TextTokenizer:
    """The tokenizer in a GGUF file's header (see `tokenizer_from_gguf_metadata`)."""
    from model.gguf import gguf_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return tokenizer_from_gguf_metadata(gguf_metadata(path), str(path))


def load_tokenizer(source: str | Path) -> ByteTextTokenizer | TextTokenizer:
    """The tokenizer of `source`: "bytes" (meshlm's byte tokenizer), a `tokenizer.json` file, a Hugging Face model
    directory holding one, or a `.gguf` file (its vocabulary: `tokenizer_from_gguf`)."""
    if str(source) == "bytes":
        return ByteTextTokenizer()
    path = Path(source)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_json(path / "tokenizer.json")
        raise FileNotFoundError(f"{path} has no tokenizer.json (a sentencepiece tokenizer.model alone is not "
                                f"supported)")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_file():
        return tokenizer_from_json(path)
    raise FileNotFoundError(f"no tokenizer at {source!r}: give 'bytes', a tokenizer.json, a model directory or a "
                            f".gguf file")
