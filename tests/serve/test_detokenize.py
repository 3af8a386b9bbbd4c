"""serve/detokenize.py, incremental detokenization, against decoding the whole output at once (the reference): for
random texts of many scripts, streamed token by token through a byte tokenizer and a byte-level BPE (trained here,
no download), the pieces concatenate to the whole decode, and no piece holds half a character (U+FFFD)."""

from __future__ import annotations

import numpy as np
import pytest

from serve.detokenize import REPLACEMENT, IncrementalText
from tests.bpe import byte_level_bpe
from train.tokenizer import ByteTokenizer, TextTokenizer

RANGES = [(0x20, 0x7E), (0xE0, 0xFF), (0x4E00, 0x4E40), (0x1F600, 0x1F640), (0x3B1, 0x3C9)]
SEEN = "hello world, the world says hello 中文 and 😀 here\n"


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return TextTokenizer(byte_level_bpe([SEEN] * 20, vocab_size=400), special_tokens={"eos_token": "<eos>"})


def random_text(rng: np.random.Generator, n: int) -> str:
    parts = []
    for _ in range(n):
        low, high = RANGES[int(rng.integers(len(RANGES)))]
        parts.append(chr(int(rng.integers(low, high + 1))))
        if rng.random() < 0.2:
            parts.append(" ")
    return "".join(parts)


def stream(decode, ids, context=()) -> tuple[list[str], str]:
    text = IncrementalText(decode, context)
    pieces = [text.push(t) for t in ids]
    return pieces, text.finish()


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_pieces_concatenate_to_the_whole_decode_and_never_split_a_character(kind, bpe):
    tok = ByteTokenizer() if kind == "bytes" else None
    encode = (lambda s: tok.encode(s).tolist()) if tok else bpe.encode
    decode = tok.decode if tok else bpe.decode
    rng = np.random.default_rng(1)
    for _ in range(40):
        text = random_text(rng, int(rng.integers(1, 30)))
        ids = encode(text)
        pieces, tail = stream(decode, ids, encode("prompt "))
        assert "".join(pieces) + tail == decode(ids) == text
        assert all(REPLACEMENT not in p for p in pieces) and tail == ""


def test_a_special_token_in_the_output_is_skipped_not_stalled(bpe):
    eos = bpe.backend.token_to_id("<eos>")
    ids = bpe.encode("hello 😀") + [eos] + bpe.encode(" world")
    pieces, tail = stream(bpe.decode, ids)
    assert "".join(pieces) + tail == bpe.decode(ids) == "hello 😀 world"


def test_a_cut_character_is_held_until_finish():
    tok = ByteTokenizer()
    ids = tok.encode("a😀").tolist()[:-1]
    pieces, tail = stream(tok.decode, ids)
    assert pieces == ["a", "", "", ""] and tail == REPLACEMENT == tok.decode(ids[1:])
