"""README.md's snippets run as written: every fenced python block and the quick shell commands run in a child, in
a scratch directory that mirrors the repository (so their `runs/...` land there, never in the repository's runs/);
the long commands are listed below with the reason they are not run, and every command is one or the other, so a
new snippet cannot slip in untried and unlisted."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocesses import HANG_LIMIT_S, ROOT, child_env, tail

pytestmark = pytest.mark.slow  # a dozen children that import JAX, eight of them training runs: minutes on 2 cores

# Commands (`.venv/bin/python` written `python`, continuation lines joined) run from the scratch directory, in
# README order, each block's commands in one shell.
RUN = (
    "python -m scripts.estimate --preset 7b",
    "python -m scripts.estimate --budget 1e21",
    "python -c \"from transformers import DeepseekV3Config",
    "python -m scripts.estimate --hf-config deepseek-v3.json",
    "python -m scripts.train --preset tiny --steps 200 --out runs/tiny --profile 20:22",
    "python -m scripts.plot_runs runs/tiny",
    "python -m scripts.train --preset tiny --steps 200 --out runs/tiny --extend 100",
    "python -m scripts.train_tokenizer --vocab-size 8192",
    "python -m scripts.train --preset tiny --steps 20 --out runs/tiny-bpe",
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m scripts.train --preset tiny",  # ring, MoE, stages
    # these use runs/mine, for which the test trains a stand-in (STAND_IN)
    "python -m scripts.generate --run runs/mine",
    "printf '{\"prompt\"",
    "python -m scripts.export_hf --run runs/mine",
    "python -m scripts.generate --hf runs/mine-hf",
    "python -m scripts.evaluate --run runs/mine",
)
# runs/mine is the 500-step `small` run of the README's "Train" (minutes); its users get a 5-step `tiny` run.
STAND_IN = ("-m", "scripts.train", "--preset", "tiny", "--steps", "5", "--out", "runs/mine")
# Commands not run here, by their first words, with the reason.
NOT_RUN = {
    "make demo": "trains the demo model for ~6 min; CI runs it",
    "make test": "the suite itself",
    "python -m scripts.train --preset small --steps 500": "500 steps of `small`: minutes",
    "SMOLLM2=": "fine-tunes SmolLM2-135M: ~5 min (tests/train/test_sft_smollm2)",
    "python -m scripts.train --init gguf": "fine-tunes SmolLM2-135M: ~5 min (tests/train/test_sft_smollm2)",
    "python -m scripts.generate --run runs/smollm2-sft": "needs the fine-tuned run above",
    "python -m scripts.evaluate --gguf": "SmolLM2-135M over 2k tokens: minutes (tests/scripts/test_evaluate)",
    "python -m scripts.generate --gguf": "SmolLM2-135M: a minute on 2 cores",
    "python -m scripts.train --preset 125m": "a 125m model on 8 devices",
    "python -m scripts.launch_local": "two processes training on 4 fake devices each (tests/parallel)",
    "srun": "a SLURM job on 32 GPUs",
    "make serve": "a server that runs until stopped (tests/serve/test_api)",
    "curl": "needs `make serve` running",
    "python -m scripts.sweep": "16 training runs",
    "python -m scripts.bench_": "benchmarks: minutes, most of them GPU only",
    "JAX_PLATFORMS=cuda": "GPU only",
    "make bench-gpu": "GPU only",
}
NOT_RUN_PYTHON = {"from openai import OpenAI": "needs `make serve` running and the openai client"}

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """README.md's fenced blocks as (language, text), in order."""
    return FENCE.findall((ROOT / "README.md").read_text())


def commands(block: str) -> list[str]:
    """A shell block's commands: comments and blank lines dropped, continuation lines joined, `.venv/bin/python`
    written `python`."""
    joined = re.sub(r"\\\n\s*", "", block)
    lines = (re.sub(r"\s+#[^'\"]*$", "", line).strip() for line in joined.splitlines())
    return [line.replace(".venv/bin/python", "python") for line in lines if line and not line.startswith("#")]


def is_run(command: str) -> bool:
    """Whether the test runs this README command."""
    return command.startswith(RUN)


def is_listed(command: str) -> bool:
    """Whether this README command is listed as not run."""
    return command.startswith(tuple(NOT_RUN))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that looks like the repository (its top-level entries linked) with its own empty runs/."""
    directory = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in {"runs", ".venv", ".git"}:
            (directory / entry.name).symlink_to(entry)
    (directory / "runs").mkdir()
    return directory


def run_in(directory: Path, argv: list[str], what: str) -> None:
    """Run argv on the CPU in `directory`; fail with the child's last output if it fails or hangs."""
    env = child_env(JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    try:
        done = subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"README {what} did not finish in {HANG_LIMIT_S:.0f} s:\n{tail(hung.stderr)}")
    assert done.returncode == 0, f"README {what} exited {done.returncode}:\n{tail(done.stdout)}\n{tail(done.stderr)}"


def test_every_command_is_run_or_listed() -> None:
    found = blocks()
    assert sum(language == "python" for language, _ in found) >= 3 and len(found) > 15, "README parsing broke"
    for language, text in found:
        if language == "python":
            continue
        assert language == "bash", f"a {language} block: give it a rule here"
        for command in commands(text):
            verdict = "both run and listed" if is_run(command) else "neither run nor listed"
            assert is_run(command) != is_listed(command), (
                f"README command {command!r} is {verdict} in tests/test_readme.py: add it to RUN (quick) or NOT_RUN"
                " (with the reason)")
    firsts = [text.splitlines()[0] for language, text in found if language == "python"]
    assert all(first in firsts for first in NOT_RUN_PYTHON), "a listed python block is gone from README.md"


def test_every_listed_command_is_still_there() -> None:
    everything = [c for language, text in blocks() if language == "bash" for c in commands(text)]
    assert all(any(c.startswith(prefix) for c in everything) for prefix in (*RUN, *NOT_RUN)), (
        "RUN or NOT_RUN names a command README.md no longer has")


@pytest.mark.parametrize("index", [i for i, (language, text) in enumerate(blocks())
                                   if language == "python" and text.splitlines()[0] not in NOT_RUN_PYTHON])
def test_python_block_runs(index: int, scratch: Path) -> None:
    run_in(scratch, [sys.executable, "-c", blocks()[index][1]], f"python block {index}")


def test_quick_shell_commands_run(scratch: Path) -> None:
    run_in(scratch, [sys.executable, *STAND_IN], "stand-in for runs/mine")
    for index, (language, text) in enumerate(blocks()):
        chosen = [c for c in commands(text) if language == "bash" and is_run(c)]
        if chosen:
            python = shlex.quote(sys.executable)
            script = "set -e\n" + "\n".join(re.sub(r"(^|\s)python ", rf"\g<1>{python} ", c) for c in chosen)
            run_in(scratch, ["bash", "-c", script], f"block {index}: {' ; '.join(chosen)}")
    assert (scratch / "runs" / "tiny.png").stat().st_size > 0
    assert len((scratch / "runs" / "results.jsonl").read_text().splitlines()) == 2
