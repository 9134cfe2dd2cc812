"""Bugs must not look like user errors (issue 15 item 13): an exception that is not one of the toolkit's own
(UserError: exit 2; RunStopped: its exit code) is a bug. The command line shows its traceback and exits 1, and the
run's train.log holds the traceback too."""

import subprocess
import sys

import pytest
from conftest import CPU_ENV
from test_faults import DRIVER, PRETRAIN

from simmim.cli import main
from simmim.errors import UserError

BUG = "injected bug: operands could not be broadcast together"


def test_a_value_error_inside_a_training_step_is_raised_as_a_bug_and_logged(tmp_path, monkeypatch):
    import simmim.pretrain

    original, calls = simmim.pretrain.PretrainTask.loss, []

    def loss_with_a_bug(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError(BUG)
        return original(self, model, batch)

    monkeypatch.setattr(simmim.pretrain.PretrainTask, "loss", loss_with_a_bug)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=BUG) as raised:
        main([*PRETRAIN, "schedule.max_steps=8", "--output", str(out)])  # not a return code: not a user error
    assert not isinstance(raised.value, UserError)
    log = (out / "train.log").read_text()
    assert "a bug, not a problem with your input" in log and "Traceback (most recent call last)" in log
    assert f"ValueError: {BUG}" in log and "in loss_with_a_bug" in log
    assert not (out / ".lock").exists()


def test_a_bug_on_the_command_line_shows_its_traceback_and_exits_1(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, DRIVER, "bug_in_step:3", "--", *PRETRAIN, "schedule.max_steps=8", "--output",
                           str(out)], env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 2 would tell the user their input was wrong
    assert "Traceback (most recent call last)" in proc.stderr and f"ValueError: {BUG}" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())
    assert f"ValueError: {BUG}" in (out / "train.log").read_text()
