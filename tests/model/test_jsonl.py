"""model/jsonl.py: each record with `<path>:<line>`, and one error format naming the file and line, checked
against hand-written files and the messages written out by hand."""

import pytest

from model.jsonl import read_json_objects


def _file(tmp_path, text: str):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_records_come_with_their_line_and_blank_lines_are_skipped(tmp_path):
    path = _file(tmp_path, '{"a": 1}\n\n   \n{"b": [2, "é"]}\n')
    assert read_json_objects(path, "records") == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"b": [2, "é"]})]


@pytest.mark.parametrize("text,message", [
    ('{"a": 1}\n{not json\n', "data.jsonl:2: not JSON (Expecting property name enclosed in double quotes)"),
    ('\n[1, 2]\n', "data.jsonl:2: expected a JSON object, got [1, 2]"),
    ('"text"\n', "data.jsonl:1: expected a JSON object, got 'text'"),
    ("[" * 100_000 + "\n", "data.jsonl:1: not JSON ("),
    ("\n  \n", "data.jsonl holds no records"),
])
def test_errors_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError) as info:
        read_json_objects(_file(tmp_path, text), "records")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.jsonl"):
        read_json_objects(tmp_path / "missing.jsonl", "records")
