"""scripts/plot_runs.py on hand-written metrics files: the curves it extracts are the file's numbers, and the PNG
it draws is a real image (real runs: tests/scripts/test_train_interrupt.py)."""

import json

import pytest

from scripts.plot_runs import main, run_curves


def write_run(directory, slope: float) -> list[dict]:
    directory.mkdir()
    records = []
    for step in range(1, 21):
        records.append({"step": step, "loss": 5 - slope * step, "lr": 1e-3, "tokens": 256 * step,
                        "elapsed_s": 0.5 * step})
        if step % 10 == 0:
            records.append({"step": step, "val_loss": 4 - slope * step, "val_bpb": 6 - slope * step,
                            "tokens": 256 * step, "elapsed_s": 0.5 * step + 0.1})
    records.append({"step": 21, "loss": 1.0})  # an old record without tokens or wall time: left out
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_the_curves_are_the_files_numbers(tmp_path):
    write_run(tmp_path / "a", 0.1)
    curves = run_curves(tmp_path / "a")
    assert curves["loss"]["value"] == [5 - 0.1 * s for s in range(1, 21)]
    assert curves["loss"]["tokens"] == [256 * s for s in range(1, 21)]
    assert curves["loss"]["elapsed_s"] == [0.5 * s for s in range(1, 21)]
    assert curves["val_bpb"] == {"tokens": [2560, 5120], "elapsed_s": [5.1, 10.1], "value": [5.0, 4.0]}


def test_two_runs_make_one_png(tmp_path):
    write_run(tmp_path / "a", 0.1)
    write_run(tmp_path / "b", 0.05)
    png = tmp_path / "plot.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # four panels of lines, not a blank canvas


def test_a_directory_without_metrics_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--out", str(tmp_path / "plot.png")])
    assert info.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err
