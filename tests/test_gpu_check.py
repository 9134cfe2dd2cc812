"""tools/gpu_check.sh (issue 18 item 11) is prepared on the CPU: it parses, fits its 8-minute budget, and every
command it would run on a GPU machine exists with the flags and config keys it passes (its dry run lists them)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simmim.cli import parse_command_line
from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.configs import resolve

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def check_simmim(argv: list[str]) -> str:
    """Parse a simmim command line as `simmim` would (a bad flag exits); a run also loads its config with the
    overrides (an unknown or ill-typed key raises). Returns the command."""
    _, args = parse_command_line(argv)
    if args.command in ("pretrain", "finetune"):
        cls = PretrainConfig if args.command == "pretrain" else FinetuneConfig
        load_config(cls, resolve(args.config), list(args.overrides))
    return args.command


def test_the_script_parses_and_its_time_limits_fit_8_minutes():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    limits = [int(m) for m in re.findall(r"^step \S+ (\d+) ", SCRIPT.read_text(), flags=re.M)]
    assert len(limits) == 7 and sum(limits) <= 8 * 60


def test_every_command_of_the_dry_run_exists_with_its_flags(tmp_path):
    proc = subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[0] for line in (tmp_path / "summary.txt").read_text().splitlines()] == [
        "env", "tests", "model", "memory", "pipeline", "fsdp", "save"]
    commands = [line.split("\x1f") for line in (tmp_path / "commands.txt").read_text().splitlines()]
    seen = []
    for program, *argv in commands:
        if program == "simmim":
            seen.append(check_simmim(argv))
        elif program == "accelerate-launch":
            from accelerate.commands.launch import launch_command_parser

            launch = launch_command_parser().parse_args(argv)
            assert Path(launch.config_file).is_file() and launch.num_processes == 1 and launch.module
            assert launch.training_script == "simmim"
            seen.append("launch " + check_simmim(launch.training_script_args))
        elif program == "pytest":
            assert "cuda" in (ROOT / argv[-1]).read_text()
            seen.append("pytest")
        else:
            raise AssertionError(f"unknown program {program}")
    assert seen == ["pytest", "benchmark", "benchmark", "pretrain", "finetune", "export", "launch pretrain",
                    "benchmark"]
    what = [argv[argv.index("--what") + 1] for _, *argv in commands if "--what" in argv]
    assert what == ["model", "memory", "save"]
