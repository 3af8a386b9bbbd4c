"""ByteTokenizer against Python's own UTF-8 codec: exact round trips of arbitrary text and arbitrary bytes."""

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
