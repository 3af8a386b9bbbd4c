"""serve/stop_strings.py against a brute-force reference written here: scan the output one character at a time and
stop at the first place where some stop string ends. Streamed in pieces of any sizes, the released text must be
that reference's text (nothing after a stop string, nothing of it, every character before it), and text that
could start a stop string must never be released before it is known not to."""

from __future__ import annotations

import numpy as np
import pytest

from serve.stop_strings import MAX_STOP_STRINGS, StopStrings, TextStream, stop_strings_problem, truncate_at_stop
from train.tokenizer import ByteTokenizer


def feed(ts: TextStream, ids) -> list[str]:
    """Push `ids` one at a time until a stop string matches, then finish: the pieces released, in order."""
    pieces = []
    for t in ids:
        pieces.append(ts.push(t))
        if ts.stopped:
            break
    pieces.append(ts.finish())
    return pieces


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)  # ending at one place: the longest started first
            return text[:end - len(stop)], stop
    return text, None


def stream(text: str, stops: list[str], cuts: list[int]) -> tuple[list[str], str, StopStrings]:
    matcher = StopStrings(stops)
    bounds = [0, *sorted(cuts), len(text)]
    pieces = [matcher.push(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return pieces, matcher.finish(), matcher


def test_random_texts_and_chunkings_match_the_reference():
    rng = np.random.default_rng(0)
    alphabet = list("ab\n:U")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 20))))
        stops = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 4)))]
        cuts = rng.integers(0, len(text) + 1, size=int(rng.integers(0, 6))).tolist()
        pieces, tail, matcher = stream(text, stops, cuts)
        want, stop = reference(text, stops)
        assert "".join(pieces) + tail == want, (text, stops, cuts)
        assert matcher.matched == stop and matcher.stopped == (stop is not None)
        assert truncate_at_stop(text, stops) == (want, stop)
        released = ""
        for piece in pieces:  # what was released at each step was final: a prefix of the answer
            released += piece
            assert want.startswith(released)


def test_a_stop_string_split_across_pieces_is_found_and_excluded():
    matcher = StopStrings(["\n\nUser:"])
    assert matcher.push("Sure, here") == "Sure, here"
    assert matcher.push(".\n") == "."  # "\n" could start the stop string: held
    assert matcher.push("\nUs") == ""
    assert not matcher.stopped
    assert matcher.push("er: next") == "" and matcher.stopped and matcher.matched == "\n\nUser:"
    assert matcher.push("more") == "" and matcher.finish() == ""


def test_held_text_is_released_when_it_cannot_be_a_stop_or_at_finish():
    matcher = StopStrings(["END"])
    assert matcher.push("the E") == "the "
    assert matcher.push("N") == ""
    assert matcher.push("D") == "" and matcher.stopped
    matcher = StopStrings(["END"])
    assert matcher.push("EN") == "" and matcher.push("X") == "ENX"
    assert matcher.push("E") == "" and matcher.finish() == "E" and not matcher.stopped


def test_token_stream_with_stops_cuts_the_detokenized_text():
    tok = ByteTokenizer()
    text = "héllo 😀\n\nUser: more"
    ts = TextStream(tok.decode, ["\n\nUser:"])
    out = feed(ts, tok.encode(text).tolist())
    assert "".join(out) == "héllo 😀" == ts.text and ts.matched == "\n\nUser:"
    ts = TextStream(tok.decode, ["zzz"])  # no stop: all the text, the last held characters at finish
    pieces = [ts.push(t) for t in tok.encode("ab zz").tolist()]
    assert "".join(pieces) == "ab " and ts.finish() == "zz" and ts.text == "ab zz"


@pytest.mark.parametrize("value, message", [
    (5, "stop must be a string or a list of strings, got 5"),
    (["a", 3], r"stop[1] must be a string, got 3"),
    (["a", ""], "stop[1] is empty"),
    (["x"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"),
])
def test_bad_stop_strings_are_named(value, message):
    problem = stop_strings_problem(value)
    assert problem is not None and message in problem
    with pytest.raises(ValueError, match="stop"):
        StopStrings(value)


def test_good_stop_strings():
    assert stop_strings_problem("x") is None and stop_strings_problem([]) is None
    assert stop_strings_problem(("a", "b")) is None
