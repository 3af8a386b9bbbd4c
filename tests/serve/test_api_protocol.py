"""serve/api without a model: the server's contract with serve/stop_strings.py's TextStream (stop strings held back
while they may still match, excluded from the output, split across tokens and characters), and the request
checks' errors naming their field."""

import pytest

from serve.api.protocol import APIError, parse_generation
from serve.stop_strings import TextStream
from tests.serve.test_stop_strings import feed


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def run(text: str, stop, prompt=b"p"):
    """Feed `text`'s bytes one token each; the pieces released and whether a stop string matched."""
    out = TextStream(decode, stop, list(prompt))
    return feed(out, text.encode()), out.stopped


def test_no_stop_strings_release_everything():
    pieces, stopped = run("héllo wörld", [])
    assert "".join(pieces) == "héllo wörld" and not stopped
    assert "\ufffd" not in "".join(pieces)  # a two-byte character comes out once, whole


@pytest.mark.parametrize("stop, want", [("wor", "hello "), ("o w", "hell"), ("ld!", "hello world"),
                                        ("lo", "hel"), ("é", "hello world")])
def test_the_text_ends_before_the_stop_string(stop, want):
    pieces, stopped = run("hello world", [stop])
    assert "".join(pieces) == want and stopped == (want != "hello world")


def test_a_partial_match_is_held_back_then_released():
    out = TextStream(decode, ["worm"])
    released = [out.push(b) for b in b"hello wor"]
    assert "".join(released) == "hello "  # "wor" may still become "worm"
    assert out.push(ord("l")) == "worl" and not out.stopped
    assert out.finish() == ""


def test_a_multibyte_stop_string_split_inside_a_character():
    pieces, stopped = run("naïve café", ["é"])
    assert ("".join(pieces), stopped) == ("naïve caf", True)


def test_the_earliest_of_several_stop_strings_wins():
    pieces, _ = run("abcdef", ["de", "bc"])
    assert "".join(pieces) == "a"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "model": 3}, "model"),
])
def test_a_bad_field_is_named(body, param):
    with pytest.raises(APIError) as info:
        parse_generation(body, chat=False)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_good_requests_parse():
    g = parse_generation({"prompt": ["one"], "stop": "x", "top_k": -1, "max_tokens": 3, "logprobs": 0}, chat=False)
    assert (g.prompt, g.stop, g.top_k, g.max_tokens, g.logprobs, g.n) == ("one", ("x",), 0, 3, 0, 1)
    c = parse_generation({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 20, "stream": True,
                          "stream_options": {"include_usage": True}}, chat=True)
    assert (c.messages, c.max_tokens, c.logprobs, c.include_usage) == ([{"role": "user", "content": "hi"}], 5, 20,
                                                                        True)
