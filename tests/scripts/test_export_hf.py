"""scripts/export_hf.py: a trained tiny run exported as a Hugging Face directory carries its tokenizer, so
`transformers` reads the same ids as meshlm's byte tokenizer (the independent reference: transformers' own
tokenizer loading) and `scripts.generate --hf` serves text with the run's greedy tokens."""

import json

import pytest

from scripts.export_hf import main as export
from scripts.generate import main as generate
from train.tokenizer import ByteTokenizer

TEXTS = ["def f(x):\n\treturn x  ", "héllo 🎉 日本", "<|eos|> is text here", ""]


@pytest.fixture(scope="module")
def exported(trained_tiny_run, tmp_path_factory):
    run, out = trained_tiny_run, tmp_path_factory.mktemp("hf")
    assert export(["--run", str(run), "--out", str(out)]) == 0
    return run, out


def test_transformers_reads_the_byte_tokenizer(exported):
    from transformers import AutoTokenizer

    _, out = exported
    hf = AutoTokenizer.from_pretrained(out)
    byte = ByteTokenizer()
    for text in TEXTS[:2]:  # special-token strings in text: transformers (as every HF tokenizer) reads them
        assert hf(text)["input_ids"] == byte.encode(text).tolist()
        assert hf.decode(byte.encode(text).tolist()) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ByteTokenizer.BOS, ByteTokenizer.EOS,
                                                                    ByteTokenizer.PAD)
    chat = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "user: hi\n\nassistant:"


def test_the_exported_run_serves_text_like_the_run(exported, tmp_path):
    run, out = exported
    results = {}
    for flag, source in (("--run", run), ("--hf", out)):
        path = tmp_path / f"{flag[2:]}.jsonl"
        assert generate([flag, str(source), "--prompt", "def main(", "--max-new-tokens", "8", "--temperature", "0",
                         "--decode-impl", "reference", "--out", str(path)]) == 0
        results[flag] = json.loads(path.read_text().splitlines()[0])
    assert results["--hf"]["token_ids"] == results["--run"]["token_ids"]
    assert results["--hf"]["text"] == results["--run"]["text"]
