"""Preemption and requeue on SLURM (issue 18 item 5): examples/slurm/pretrain.sbatch is run here by bash as SLURM
would run it, with ``srun``, ``scontrol`` and ``accelerate`` replaced by stubs that start the very command the
script builds in one CPU process (through tests/fault_driver.py). The job is told its time is up (SIGUSR1 to the
batch shell), forwards SIGTERM to the run, which saves and exits 143, and requeues itself; the requeued start, the
same script again, resumes with ``--resume auto`` and ends bit-identical to an uninterrupted job: weights and
optimizer state."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENV
from test_faults import DRIVER, wait_for
from test_pretrain import TINY

from simmim.cli import main
from simmim.weights import read_checkpoint

SCRIPT = Path(__file__).parents[1] / "examples" / "slurm" / "pretrain.sbatch"
OVERRIDES = [*TINY, "run.save_every=4", "schedule.max_steps=12"]

STUBS = {
    # srun: drop its options, run the task here (one node)
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node-001; else echo "$@" >> "$STUB_LOG"; fi\n',
    # accelerate launch: note its options, then start what follows `-m simmim` (in one process, under a fault)
    "accelerate": '#!/bin/bash\necho "accelerate $*" >> "$STUB_LOG"\nwhile [ "$1" != -m ]; do shift; done\n'
                  'exec "$PYTHON" "$DRIVER" "$FAULT" -- "${@:3}"\n',
}


@pytest.fixture
def slurm(tmp_path):
    """Run the job script with the stubs on PATH, as job 42 on one node; returns (start, log file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"

    def start(output: Path, fault: str = "none") -> subprocess.Popen:
        env = {**CPU_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "PYTHON": sys.executable,
               "DRIVER": DRIVER, "FAULT": fault, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[001-002]",
               "SLURM_NNODES": "1", "SLURM_NODEID": "0", "CONFIG": "demo/pretrain", "DATA": "embedded:all",
               "OUTPUT": str(output), "ACCELERATE_CONFIG": "ddp.yaml"}
        return subprocess.Popen(["bash", str(SCRIPT), *OVERRIDES], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=Path(DRIVER).parent)

    return start, log


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_the_job_script_is_valid_bash_and_asks_for_the_signal_and_the_requeue():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    directives = re.findall(r"^#SBATCH (\S+)", SCRIPT.read_text(), flags=re.M)
    assert "--requeue" in directives and "--signal=B:USR1@300" in directives
    assert "--open-mode=append" in directives  # a requeued job appends to its log


def test_time_limit_signal_stops_with_a_checkpoint_requeues_and_the_requeued_job_ends_bit_identical(tmp_path, slurm):
    start, log = slurm
    out = tmp_path / "run"
    job = start(out, fault="pause_at:6")  # waits in the forward of step 6 until a stop signal arrives
    wait_for(job, "PAUSED")
    command = ["pretrain", "demo/pretrain", "--data", "embedded:all", "--output", str(out), "--resume", "auto",
               *OVERRIDES]
    assert log.read_text().splitlines() == [  # what srun / accelerate launch were asked to run
        "accelerate launch --config_file ddp.yaml --num_machines 1 --machine_rank 0 --num_processes 8 "
        f"--main_process_ip node-001 --main_process_port 29500 -m simmim {' '.join(command)}"]
    os.kill(job.pid, signal.SIGUSR1)  # SLURM's --signal=B:USR1: to the batch shell only
    code, stdout, err = finish(job)
    assert code == 143, err[-3000:]  # the run's own code: 128 + SIGTERM
    assert "stopped by SIGTERM at step 6; checkpoint" in err
    assert "requeueing job 42" in stdout and log.read_text().splitlines()[-1] == "requeue 42"
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]

    code, _, err = finish(start(out))  # the requeued job: the same script, the same command
    assert code == 0, err[-3000:]
    assert "resuming from" in err and "ckpt-00000006.pt" in err
    assert log.read_text().count("requeue") == 1
    straight = tmp_path / "straight"  # the same command, uninterrupted (in this process: the same arithmetic)
    assert main([arg if arg != str(out) else str(straight) for arg in command]) == 0
    a, b = (read_checkpoint(d / "checkpoints" / "ckpt-00000012.pt") for d in (straight, out))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a["train_state"] == b["train_state"]
