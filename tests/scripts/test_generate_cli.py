"""scripts/generate.py on a freshly trained tiny run: a JSONL batch with per-request settings and a bad request
gives one result line per request in order (the bad one with its error); greedy results are the same through the
engine and through static batching, and equal the naive decoder's."""

import dataclasses
import json

import pytest

from model.presets import get_preset
from scripts.generate import main
from serve.naive import generate
from tests.scripts.generate_batch import generate_batch
from train.loop import load_params


@pytest.fixture(scope="module")
def run_dir(trained_tiny_run):
    return trained_tiny_run


def test_jsonl_batch_through_engine_and_static(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "def f(", "max_new_tokens": 6, "temperature": 0, "id": "a"},
        {"prompt_ids": [1, 2, 3], "max_new_tokens": 4, "temperature": 0},
        {"prompt_ids": [1, 999], "max_new_tokens": 4, "id": "bad"},
        {"prompt": "x = ", "max_new_tokens": 5, "temperature": 0.9, "top_k": 20, "seed": 3},
    ]) + "\n")
    results = {}
    for mode in ("engine", "static"):
        out = tmp_path / f"{mode}.jsonl"
        args = ["--run", str(run_dir), "--prompts", str(prompts), "--out", str(out), "--decode-impl", "reference"]
        assert main(args + (["--static"] if mode == "static" else [])) == 0
        results[mode] = [json.loads(line) for line in out.read_text().splitlines()]
    engine, static = results["engine"], results["static"]
    assert [r["id"] for r in engine][:1] == ["a"] and len(engine) == 4
    assert engine[2]["finish_reason"] == "error" and "token id 999 is outside the vocabulary" in engine[2]["error"]
    assert [r["token_ids"] for r in engine[:2]] == [r["token_ids"] for r in static[:2]]
    assert engine[3]["token_ids"] == static[3]["token_ids"]  # seeded sampling: same stream in both servers
    _, model = load_params(run_dir)
    assert engine[1]["token_ids"] == generate(model, [[1, 2, 3]], 4)[0]
    assert {"id", "text", "token_ids", "finish_reason", "error", "ttft_s", "tokens_per_s",
            "cached_tokens"} <= set(engine[0])


def test_bad_prompts_file_line_is_named(run_dir, tmp_path, capsys):
    """A line that is not a JSON object is no request at all: the file is refused before anything runs. (A JSON
    object with bad fields is a request with an error result of its own: tests/scripts/test_generate_faults.py.)"""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n["a", 1]\n')
    with pytest.raises(SystemExit) as info:
        main(["--run", str(run_dir), "--prompts", str(prompts)])
    assert info.value.code == 2 and f"{prompts}:2: expected a JSON object" in capsys.readouterr().err


# --- chats and stop strings (issue 18, item 6), in-process on a tiny random model with the byte tokenizer --------

TINY = dataclasses.replace(get_preset("tiny"), dtype="float32", init_std=0.1)
FLAGS = ["--run", "unused (load is replaced)", "--temperature", "0", "--page-size", "8", "--max-running", "4",
         "--token-budget", "64", "--decode-impl", "reference"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny():
    from model.transformer import create_model

    return create_model(TINY, seed=3)


def patch_load(monkeypatch, model, chat=True):
    import scripts.generate
    from train.tokenizer import ByteTextTokenizer

    tok = ByteTextTokenizer()
    monkeypatch.setattr(scripts.generate, "load", lambda args: (model, tok.encode, tok.decode, (),
                                                                tok.encode_chat if chat else None))
    return tok


def run_batch(tmp_path, records, *flags):
    return generate_batch(tmp_path, records, FLAGS + list(flags))


def a_stop_string(text: str) -> str:
    """An ASCII character of the greedy output after its first two characters: a stop string that will occur."""
    return next(ch for ch in text[2:] if ch.isascii())


@pytest.mark.parametrize("static", [False, True])
def test_chats_and_stop_strings_against_the_naive_decoder(tiny, tmp_path, monkeypatch, static):
    tok = patch_load(monkeypatch, tiny)
    plain = tok.encode("def f(")
    greedy = generate(tiny, [tok.encode_chat(CHAT), plain], 16)
    text = tok.decode(greedy[1])
    stop = a_stop_string(text)
    code, results = run_batch(tmp_path, [
        {"messages": CHAT, "max_new_tokens": 16, "id": "chat"},
        {"prompt": "def f(", "max_new_tokens": 16, "stop": [stop, "never in it \u2603"], "id": "stop"},
        {"prompt_ids": plain, "max_new_tokens": 4, "stop": [], "id": "old"},  # token-id stops, as before
    ], *(["--static"] if static else []))
    assert code == 0
    chat, stopped, old = results
    assert chat["token_ids"] == greedy[0] and chat["text"] == tok.decode(greedy[0]) and chat["error"] is None
    assert stopped["text"] == text[:text.index(stop)] and stopped["finish_reason"] == "stop"
    n = len(stopped["token_ids"])
    assert stopped["token_ids"] == greedy[1][:n] and stop in tok.decode(stopped["token_ids"])
    if static:
        assert n == 16  # static batching decodes on; the text is cut afterwards
    assert old["token_ids"] == greedy[1][:4] and old["finish_reason"] == "length"


def test_bad_chat_and_stop_fields_are_errors_of_their_own_requests(tiny, tmp_path, monkeypatch):
    patch_load(monkeypatch, tiny)
    code, results = run_batch(tmp_path, [
        {"messages": "hi"},
        {"messages": [{"role": "user"}]},
        {"messages": CHAT, "prompt": "x"},
        {"prompt": "x", "stop": ["ok", 3]},
        {"prompt": "x", "stop": ""},
        {"messages": CHAT, "max_new_tokens": 2, "temperature": "hot"},
        {"prompt": "x", "max_new_tokens": 2},
    ])
    assert code == 0 and [r["error"] is None for r in results] == [False] * 6 + [True]
    where = f"{tmp_path / 'p.jsonl'}"
    assert f"request 'req-0': {where}:1: messages must be a list of messages, got 'hi'" == results[0]["error"]
    assert "messages[0].content must be a string, got None" in results[1]["error"]
    assert "give exactly one of 'prompt', 'prompt_ids' and 'messages'" in results[2]["error"]
    assert "stop[1] must be a string, got 3" in results[3]["error"]
    assert "stop[0] is empty" in results[4]["error"]
    assert "temperature must be a number, got 'hot'" in results[5]["error"]


def test_a_model_without_a_chat_template_refuses_messages_only(tiny, tmp_path, monkeypatch):
    patch_load(monkeypatch, tiny, chat=False)
    code, results = run_batch(tmp_path, [{"messages": CHAT, "max_new_tokens": 2}, {"prompt": "x", "max_new_tokens": 2}])
    assert code == 0 and "this model has no chat template for 'messages'" in results[0]["error"]
    assert results[1]["error"] is None and len(results[1]["token_ids"]) == 2


def test_chat_flag_and_default_stop_strings_stream(tiny, monkeypatch, capsys):
    tok = patch_load(monkeypatch, tiny)
    chat, plain = generate(tiny, [tok.encode_chat([{"role": "user", "content": "Hi"}]), tok.encode("def f(")], 12)
    assert main(FLAGS + ["--chat", "Hi", "--max-new-tokens", "12", "--stream"]) == 0
    assert "user: Hi\n\nassistant:" + tok.decode(chat) + "\n" + "=" * 72 in capsys.readouterr().out
    text = tok.decode(plain)
    stop = a_stop_string(text)
    assert main(FLAGS + ["--prompt", "def f(", "--max-new-tokens", "12", "--stop", stop, "--stream"]) == 0
    assert "def f(" + text[:text.index(stop)] + "\n" + "=" * 72 in capsys.readouterr().out


def test_a_prompts_file_that_is_not_a_batch_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import scripts.generate

    def load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(scripts.generate, "load", load)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(SystemExit) as info:
        main(FLAGS + ["--prompts", str(prompts)])
    assert info.value.code == 2 and f"{prompts}:2: not JSON" in capsys.readouterr().err
