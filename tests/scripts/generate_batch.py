"""scripts/generate.py on a JSONL batch, as the generate tests run it."""

import json
from pathlib import Path

from scripts.generate import main


def generate_batch(folder, records: list[dict], argv: list[str]) -> tuple[int, list[dict]]:
    """`main(argv)` on `records` written to `folder`/p.jsonl, results to `folder`/out.jsonl: (exit code, result
    records in order)."""
    prompts, out = Path(folder) / "p.jsonl", Path(folder) / "out.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(list(argv) + ["--prompts", str(prompts), "--out", str(out)])
    return code, [json.loads(line) for line in out.read_text().splitlines()]
