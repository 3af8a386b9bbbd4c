"""The reader of a JSONL file (one JSON object per line) for every reader of records: multiple-choice items
(train/evaluation.py), chat conversations (train/sft.py), prompts (serve/prompts.py). Each record comes with where
it stands, `<path>:<line>`, so every error about a line names it in one format, e.g.
`chat.jsonl:2: not JSON (Expecting value)`. Plain Python beside model/checks.py, so that train/ and serve/ can
both use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.checks import shown


def read_json_objects(path: str | Path, what: str) -> list[tuple[str, dict[str, Any]]]:
    """(`<path>:<line>`, the object) for each non-empty line of the UTF-8 JSONL file `path`, in order. Raises
    FileNotFoundError `no such file: <path>`, ValueError `<path>:<line>: not JSON (<reason>)` or `<path>:<line>:
    expected a JSON object, got <value>`, or ValueError `<path> holds no <what>` when no line holds a record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # also an integer too long, or nesting too deep, to read
            raise ValueError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {shown(record)}")
        records.append((where, record))
    if not records:
        raise ValueError(f"{path} holds no {what}")
    return records
