"""scripts/train.py's controls, without training: the progress bar's ETA leaves compilation out, the signal
handler asks once and then lets a second signal kill, and --profile's START:STOP is checked."""

import os
import signal

import pytest
from tqdm import tqdm

from scripts.interrupt import StopOnSignal
from scripts.train import progress_to
from train.profile import parse_steps


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_eta_counts_only_steps_after_the_first_record():
    bar = tqdm(total=100, disable=False, file=open(os.devnull, "w"), mininterval=0)
    bar._time = clock = Clock()
    bar.start_t = bar.last_print_t = 0.0
    clock.now = 60.0  # a minute of compilation before the first record, at step 10 (a resumed run, say)
    progress_to(bar, 10)
    clock.now = 62.0  # then 10 steps in 2 s: 5 steps/s, 80 steps to go -> 16 s
    progress_to(bar, 20)
    info = bar.format_dict
    rate = info["rate"] or (info["n"] - info["initial"]) / info["elapsed"]
    assert rate == pytest.approx(5.0)
    assert (info["total"] - info["n"]) / rate == pytest.approx(16.0)
    assert "00:16" in bar.format_meter(**info)  # what the bar shows as remaining time
    bar.close()


def test_the_first_signal_asks_to_stop_and_a_second_would_kill(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.exit_code == 143
        # the next signal is no longer caught: the default action (death) applies
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.exit_code == 130


@pytest.mark.parametrize("text, expected", [("2:3", (2, 3)), ("5:5", (5, 5))])
def test_profile_steps_parse(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["3", "3:2", "0:1", "a:b", ""])
def test_bad_profile_steps_are_refused_naming_them(text):
    with pytest.raises(ValueError, match="--profile"):
        parse_steps(text)
