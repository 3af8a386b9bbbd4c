"""The OpenAI-compatible server with `--speculative ngram`: greedy completions are the plain offline engine's text,
and /metrics reports the drafted and accepted tokens (vLLM's spec_decode figures)."""

import pytest

from tests.serve.test_api import KEY, Server, model_dir, serve_config


@pytest.mark.slow
def test_speculative_server_matches_plain_decoding_and_reports_acceptance(tmp_path_factory):
    from model.hf import load_hf
    from serve.engine import Engine, Request
    from train.tokenizer import load_tokenizer

    server = Server(tmp_path_factory.mktemp("serve-spec"), "--speculative", "ngram", "--num-speculative-tokens", "3",
                    env={"MESHLM_API_KEY": KEY}, api_key=KEY)
    try:
        prompts = ["ab ab ab ab ab ab ab", "def f(x):\n    return x\ndef f(x):\n", "la la la la"]
        served = [server.client().completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0,
                                                      extra_body={"ignore_eos": True}).choices[0].text
                  for p in prompts]
        drafted = server.metric("meshlm_spec_decode_num_draft_tokens")
        accepted = server.metric("meshlm_spec_decode_num_accepted_tokens")
    finally:
        server.stop()
    tok = load_tokenizer("bytes")
    engine = Engine(load_hf(model_dir(str(tmp_path_factory.getbasetemp()))), serve_config())
    offline = engine.generate([Request(tuple(tok.encode(p)), 24) for p in prompts])
    assert served == [tok.decode(c.token_ids) for c in offline]
    assert drafted > 0 and 0 <= accepted <= drafted
