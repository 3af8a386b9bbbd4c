"""scripts/stream_text.py, incremental detokenization: the pieces concatenate to the text itself, and a character
split over several tokens is never printed in halves -- with the byte tokenizer (a multi-byte character is several
tokens) and with a byte-level BPE tokenizer trained here (an emoji's bytes are several tokens). The references are
the strings the tokens were made from."""

import pytest

from scripts.stream_text import REPLACEMENT, IncrementalText
from tests.bpe import byte_level_bpe
from train.tokenizer import ByteTokenizer

TEXT = "héllo wörld: 3€ 😀 and 中文, done"


def pieces_of(decode, ids, context=()):
    stream = IncrementalText(decode, context)
    pieces = [stream.push(t) for t in ids]
    return pieces, stream.finish(), stream


def test_byte_tokens_print_whole_characters_only():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT).tolist()
    pieces, tail, stream = pieces_of(tok.decode, ids, tok.encode("prompt: ").tolist())
    assert "".join(pieces) + tail == TEXT == stream.text
    assert tail == ""  # the text ends complete: nothing was held back at the end
    assert all(REPLACEMENT not in p for p in pieces)
    # Each character appears at the token of its last byte: a 3-byte "€" is two empty pieces and then "€".
    expected = []
    for ch in TEXT:
        n = len(ch.encode())
        expected += [""] * (n - 1) + [ch]
    assert pieces == expected


def test_an_incomplete_character_at_the_end_is_held_then_flushed_by_finish():
    tok = ByteTokenizer()
    ids = tok.encode("ok €").tolist()[:-1]  # the euro sign cut after two of its three bytes
    pieces, tail, _ = pieces_of(tok.decode, ids)
    assert "".join(pieces) == "ok " and tail == tok.decode(ids[3:]) and REPLACEMENT in tail


def test_invalid_bytes_do_not_stall_the_stream():
    tok = ByteTokenizer()
    ids = [0xC3, ord("A"), ord("B")]  # a lead byte and then no continuation: one U+FFFD, then the letters
    pieces, tail, _ = pieces_of(tok.decode, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == REPLACEMENT + "AB"
    assert pieces[0] == ""


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained on a few lines here (no download), wrapped as transformers does."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(["hello world", "the world says hello", "hello there"] * 20, vocab_size=300)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_byte_level_bpe_splits_an_emoji_and_the_stream_prints_it_once(bpe):
    text = "hello 😀 world 中"
    ids = bpe.encode(text)
    assert any(REPLACEMENT in bpe.decode([t]) for t in ids)  # the test's premise: some token is half a character
    pieces, tail, _ = pieces_of(bpe.decode, ids, bpe.encode("the "))
    assert "".join(pieces) + tail == text and tail == ""
    assert all(REPLACEMENT not in p for p in pieces)
    assert sum("😀" in p for p in pieces) == 1
