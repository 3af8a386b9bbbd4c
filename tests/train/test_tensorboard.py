"""TensorBoard scalars beside metrics.jsonl: read back with a hand-written event-file reader, they hold exactly
the numbers of metrics.jsonl, also after resumes that drop records (rewritten) or drop none (appended)."""

import json
import math

from tests.train.tensorboard_events import read_scalars
from train.metrics import MetricsLog


def record(step: int, **extra) -> dict:
    base = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3 * step, "grad_norm": 1.5, "tokens_per_s": None,
            "mfu": None, "tokens": 128 * step, "elapsed_s": 0.25 * step}
    return {**base, **extra}


def expected_points(metrics_path) -> list[tuple[int, str, float]]:
    """metrics.jsonl's numbers as (step, name, value), by hand: every finite number except the step."""
    points = []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        points += [(r["step"], k, v) for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
    return points


def as_float32(points):
    import numpy as np

    return sorted((s, k, float(np.float32(v))) for s, k, v in points)  # TensorBoard stores float32


def test_every_number_of_every_record_is_a_scalar(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    for step in (1, 2, 3):
        log.write(record(step, tokens_per_s=1000.0 * step, mfu=0.01, router_loss=0.5))
    log.write({"step": 3, "val_loss": 4.5, "val_bpb": 4.5 / math.log(2), "tokens": 384, "elapsed_s": 1.0})
    log.write(record(4, loss=float("nan")))  # a non-finite value is left out of both
    log.close()
    got = read_scalars(tmp_path / "tb")
    assert {k for _, k, _ in got} == {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "router_loss", "val_loss",
                                      "val_bpb", "tokens", "elapsed_s"}
    assert as_float32(got) == as_float32(expected_points(tmp_path / "metrics.jsonl"))


def test_a_resume_that_drops_records_rewrites_the_events(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    for step in range(1, 7):
        log.write(record(step))
    log.close()
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=4, tensorboard=tmp_path / "tb")  # died after 4
    for step in (5, 6):
        log.write(record(step, loss=1.0 + step))  # the rerun's values differ: the stale ones must be gone
    log.close()
    got = read_scalars(tmp_path / "tb")
    assert [s for s, k, _ in got if k == "loss"] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert as_float32(got) == as_float32(expected_points(tmp_path / "metrics.jsonl"))


def test_a_resume_that_drops_nothing_appends(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    for step in (1, 2):
        log.write(record(step))
    log.close()
    first = sorted((tmp_path / "tb").iterdir())
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=2, tensorboard=tmp_path / "tb")
    log.write(record(3))
    log.close()
    assert set(first) < set((tmp_path / "tb").iterdir())  # the old file kept, a new one added
    got = read_scalars(tmp_path / "tb")
    assert [s for s, k, _ in got if k == "loss"] == [1, 2, 3]
    assert as_float32(got) == as_float32(expected_points(tmp_path / "metrics.jsonl"))


def test_without_tensorboardx_the_log_writes_jsonl_only(tmp_path, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    missing = lambda name, *a: None if name == "tensorboardX" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tensorboard")
    log.write(record(1))
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1
    assert not (tmp_path / "tensorboard").exists()
    assert "tensorboardX is not installed" in caplog.text
