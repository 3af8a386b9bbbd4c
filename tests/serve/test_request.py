"""serve/request.py's `rejected`: a refused request's result carries the error's id and text, and the request's
prompt only when the request has a well-formed one."""

from types import SimpleNamespace

from serve.request import rejected
from serve.request_checks import RequestError


def test_rejected_keeps_the_error_and_a_well_formed_prompt():
    error = RequestError("request 'a': max_new_tokens must be >= 1, got 0", "a")
    for request, prompt in [(None, []), (SimpleNamespace(prompt_ids=(3, 4)), [3, 4]),
                            (SimpleNamespace(prompt_ids=[5]), [5]), (SimpleNamespace(prompt_ids="xy"), []),
                            (SimpleNamespace(), [])]:
        result = rejected(error, request)
        assert (result.request_id, result.prompt_ids, result.token_ids) == ("a", prompt, [])
        assert result.finished and result.finish_reason == "error" and result.error == str(error)
