"""User errors and bugs are told apart (simmim.errors): bad input from a hostile user ends in one line and exit 2,
with no traceback; an unexpected exception anywhere is shown as what it is, a bug, and never as exit 2."""

import subprocess
import sys

import pytest
from conftest import CPU_ENV

from simmim.cli import main

BAD_INPUT = {
    "unknown recipe": ["pretrain", "nosuch/recipe", "--output", "{tmp}/run"],
    "missing data": ["pretrain", "demo/pretrain", "--data", "{tmp}/nothing", "--output", "{tmp}/run"],
    "missing checkpoint for eval": ["eval", "{tmp}/none.pt", "--data", "embedded:digits"],
    "missing checkpoint for export": ["export", "{tmp}/none.pt", "--out", "{tmp}/x.safetensors"],
    "missing pretrained": ["finetune", "demo/finetune", "--pretrained", "{tmp}/none.pt", "--output", "{tmp}/ft"],
    "unknown benchmark model": ["benchmark", "--model", "swinv2_tinny"],
    "half a size": ["eval", "{tmp}/none.pt", "--data", "embedded:digits", "--img-size", "64"],
    "size that does not tile": ["models", "swinv2_tiny", "--img-size", "100"],
    "unknown config key": ["pretrain", "demo/pretrain", "--output", "{tmp}/run", "optim.base_lrr=1"],
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in BAD_INPUT[case]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()  # refused before anything is written


def test_a_bug_is_raised_not_reported_as_bad_input(monkeypatch):
    import simmim.models as models

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # what a bug in the toolkit or a dependency looks like

    monkeypatch.setattr(models, "create_encoder", broken)  # what `simmim models` builds with
    with pytest.raises(ValueError, match="internal invariant"):
        main(["models", "swinv2_pico"])


def test_a_bug_in_a_subprocess_shows_its_traceback_and_exits_1():
    code = ("import simmim.models as m, sys\n"
            "def broken(*a, **k): raise ValueError('an internal invariant broke')\n"
            "m.create_encoder = broken\n"
            "from simmim.cli import main\nsys.exit(main(['models', 'swinv2_pico']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CPU_ENV)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ValueError: an internal invariant broke" in out.stderr
    assert "error: an internal" not in out.stderr
