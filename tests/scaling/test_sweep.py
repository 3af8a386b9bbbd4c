"""The sweep launcher: the plan's arithmetic, resumable execution with failures recorded, SLURM output, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from model.transformer import create_model
from scaling.accounting import flops_per_token
from scaling.sweep import SweepConfig, collect, execute, plan, read_status, slurm_script
from tests.subprocesses import child_env, run_module, tail


def test_plan_ties_each_schedule_to_its_own_tokens():
    cfg = SweepConfig(sizes=((64, 2), (96, 3)), tokens=(10_000, 40_000), batch_size=4, seq_len=64)
    runs = plan(cfg)
    assert [r.name for r in runs] == ["d64_l2_t9984", "d64_l2_t39936", "d96_l3_t9984", "d96_l3_t39936"]
    for run in runs:
        assert run.steps == round(run.tokens / 256) and run.tokens == run.steps * 256
        assert f"train.steps={run.steps}" in run.overrides  # cosine length = this run's length
        assert f"train.eval_every={run.steps}" in run.overrides
        real = sum(x.size for x in __import__("jax").tree.leaves(
            nnx.state(nnx.eval_shape(lambda m=run.model: create_model(m)), nnx.Param)))
        assert run.params == real
        assert run.flops == pytest.approx(flops_per_token(run.model, 64) * run.tokens)
        assert run.model.n_heads * run.model.head_dim == run.model.d_model


def test_isoflop_plan_spends_each_budget():
    cfg = SweepConfig(sizes=((32, 2), (64, 2), (128, 2)), flop_budgets=(1e11, 4e11), batch_size=4, seq_len=64)
    for run in plan(cfg):
        budget = 1e11 if "c1.00e11" in run.name else 4e11
        step_flops = run.flops / run.steps
        assert abs(run.flops - budget) <= step_flops / 2 + 1  # rounded to whole steps


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=()), "sizes is empty"),
    (dict(sizes=((100, 2),), tokens=(10,)), "multiple of head_dim"),
    (dict(sizes=((64, 2),)), "exactly one of"),
    (dict(sizes=((64, 2),), tokens=(10,), flop_budgets=(1e9,)), "exactly one of"),
    (dict(sizes=((64, 2),), tokens=(0,)), "budgets must be positive"),
    (dict(sizes=((64, 2),), tokens=(10,), batch_size=0), r"sweep.batch_size must be a positive integer, got 0"),
    (dict(sizes=((64, 2),), tokens=(10,), head_dim=0), r"sweep.head_dim must be a positive integer, got 0"),
])
def test_bad_sweeps_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def fake_trainer(log: Path):
    """A stand-in for scripts.train: records its run, writes a val loss, and fails for runs named *_l3_*."""
    def command(cfg, run, out):
        code = (f"import json, pathlib, sys; d = pathlib.Path({str(out / 'runs' / run.name)!r}); "
                f"open({str(log)!r}, 'a').write({run.name!r} + '\\n'); "
                f"(d / 'metrics.jsonl').write_text(json.dumps({{'step': 1, 'val_loss': {run.params / 1e6}}}) + '\\n'); "
                f"sys.exit('boom: diverged' if '_l3_' in {run.name!r} else 0)")
        return [sys.executable, "-c", code]
    return command


def test_execute_skips_finished_runs_and_records_failures(tmp_path):
    cfg = SweepConfig(sizes=((32, 2), (32, 3), (64, 2)), tokens=(1000,), batch_size=2, seq_len=16)
    runs, log = plan(cfg), tmp_path / "invocations.txt"
    statuses = execute(cfg, runs, tmp_path, workers=2, command=fake_trainer(log))
    assert [s["state"] for s in statuses] == ["done", "failed", "done"]
    failed = read_status(tmp_path / "runs" / runs[1].name)
    assert failed["returncode"] == 1 and "boom: diverged" in failed["error"]
    assert sorted(log.read_text().split()) == sorted(r.name for r in runs)

    execute(cfg, runs, tmp_path, workers=2, command=fake_trainer(log))  # nothing left to do
    assert len(log.read_text().split()) == 3
    execute(cfg, runs, tmp_path, workers=1, retry_failed=True, command=fake_trainer(log))
    assert log.read_text().split()[3:] == [runs[1].name]  # only the failed run again

    rows = collect(runs, tmp_path)
    assert [r["state"] for r in rows] == ["done", "failed", "done"]
    assert rows[0]["val_loss"] == pytest.approx(runs[0].params / 1e6)
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "name,d_model,n_layers,params,tokens,flops,val_loss,wall_s,state"


def test_slurm_script_has_one_array_task_per_run(tmp_path):
    cfg = SweepConfig(sizes=((32, 2), (64, 2)), tokens=(1000, 2000), batch_size=2, seq_len=16)
    runs = plan(cfg)
    script = slurm_script(cfg, runs, tmp_path, gpus_per_run=2).read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gpus-per-task=2" in script
    assert "SLURM_ARRAY_TASK_ID" in script
    commands = (tmp_path / "runs.txt").read_text().splitlines()
    assert len(commands) == 4 and all("-m scripts.train" in c and "train.steps=" in c for c in commands)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("scripts.sweep", *args, env=child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=""))


def test_cli_dry_run_and_bad_sizes(tmp_path):
    result = run_cli("--out", str(tmp_path), "--sizes", "32x2,64x2", "--tokens", "1e4,2e4", "--dry-run")
    assert result.returncode == 0, tail(result.stderr)
    assert "d32_l2_t10240" in result.stdout and "4 runs" in result.stdout and "predicted" in result.stdout
    assert not (tmp_path / "runs").exists()
    bad = run_cli("--out", str(tmp_path), "--sizes", "64by2", "--tokens", "1e4")
    assert bad.returncode == 2 and "'64by2' is not D_MODELxN_LAYERS" in bad.stderr


@pytest.mark.slow  # a whole run in child processes: make test-slow (CI runs it)
def test_a_real_sweep_trains_collects_and_reports(tmp_path):
    result = run_cli("--out", str(tmp_path), "--sizes", "32x1", "--tokens", "2048,4096", "--batch-size", "4",
                     "--seq-len", "32")
    assert result.returncode == 0, tail(result.stderr)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(row.endswith(",done") for row in rows[1:])
    losses = [float(row.split(",")[6]) for row in rows[1:]]
    assert all(0 < loss < 6.0 for loss in losses)  # a real validation loss, below uniform (ln 259 = 5.56) + noise
    assert "Fewer than 5 finished runs" in (tmp_path / "report.md").read_text()
    status = json.loads((tmp_path / "runs" / "d32_l1_t2048" / "sweep_status.json").read_text())
    assert status["state"] == "done" and status["wall_s"] > 0


@pytest.mark.slow
def test_report_fits_the_law_and_draws_the_plot(tmp_path):
    from scaling.laws import LossLaw
    from scaling.report import write_report

    truth = LossLaw(E=1.5, A=300.0, B=800.0, alpha=0.35, beta=0.3)
    rows = [{"name": f"r{n}_{d}", "params": n, "tokens": d, "flops": 6 * n * d, "val_loss": float(truth.loss(n, d)),
             "wall_s": 1.0, "state": "done"} for n in (3e4, 1e5, 3e5, 1e6) for d in (1e5, 1e6, 1e7, 1e8)]
    rows.append({**rows[0], "name": "broken", "val_loss": None, "wall_s": None, "state": "failed"})
    report = write_report(rows, tmp_path).read_text()
    assert "| broken |" in report and "| failed |" in report
    a = truth.beta / (truth.alpha + truth.beta)  # noiseless points: the fit recovers the law's exponent
    assert f"N_opt ∝ C^{a:.3f}" in report
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_isoflop_report_recovers_the_exponent(tmp_path):
    import re

    import numpy as np

    from scaling.laws import LossLaw
    from scaling.report import write_report

    truth = LossLaw(E=1.5, A=300.0, B=800.0, alpha=0.35, beta=0.3)
    rows = [{"name": "r", "params": n, "tokens": c / (6 * n), "flops": c, "val_loss": float(truth.loss(n, c / (6 * n))),
             "wall_s": 1.0, "state": "done"} for c in (1e12, 1e13, 1e14) for n in np.geomspace(1e4, 1e7, 7)]
    report = write_report(rows, tmp_path, isoflop=True).read_text()
    a = float(re.search(r"IsoFLOP fit.*?N_opt ∝ C\^([0-9.]+)", report, re.S).group(1))
    # A parabola in ln N around each budget's minimum only approximates the law: about 0.01 off the closed form.
    assert abs(a - truth.beta / (truth.alpha + truth.beta)) < 0.03
