"""`scripts.bench_kernels` on CPU: the tiny interpret-mode run prints a timed, finite row for our kernel, and bad
tile sizes are refused by name before anything runs."""

import json

import pytest

from scripts import bench_kernels


def test_tiny_interpret_run_prints_a_timed_row(capsys):
    assert bench_kernels.main(["--tiny", "--interpret"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = row["impls"]["flash[16,16,16,16]"]
    assert "error" not in entry and entry["fwd_ms"] > 0 and entry["fwd_bwd_ms"] > 0
    assert row["fwd_gflop"] == round(4 * 1 * 2 * 64 * 64 * 32 / 2 / 1e9, 1)


def test_bad_tile_sizes_are_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_kernels.main(["--tiny", "--interpret", "--flash-blocks", "16,48,16,16"])
    assert exit_info.value.code == 2
    assert "block_k must be a power of two >= 16, got 48" in capsys.readouterr().err
