"""`scripts.bench_moe_balance`: a two-step run prints both runs' JSON lines from the same skewed start, and bad
arguments are refused before anything runs."""

import json

import pytest

from scripts import bench_moe_balance


@pytest.mark.slow
def test_a_short_run_prints_both_runs_from_the_same_skewed_start(capsys):
    assert bench_moe_balance.main(["--steps", "2", "--every", "1", "--batch-size", "4", "--seq-len", "16"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["run"], r["step"]) for r in rows] == [("plain", s) for s in range(3)] + [("bias", s) for s in range(3)]
    assert rows[0]["load_max_over_mean"] == rows[3]["load_max_over_mean"] > 1.5  # skewed, before any update


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_moe_balance.main(["--skewed", "8"])
    assert exit_info.value.code == 2
    assert "--skewed between 1 and --experts - 1" in capsys.readouterr().err
