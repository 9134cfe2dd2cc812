"""SIGTERM and SIGINT during training (issue 15 item 4): the run finishes its optimizer step, saves a checkpoint as a
periodic save would, releases its lock, prints one line and exits 128 + the signal number; ``--resume auto`` then
ends with exactly the weights of an uninterrupted run. A second signal aborts at once (under torchrun a repeat is
the launcher's forward and is ignored). Runs use swinv2_pico at 32 px; the subprocess runs go through
tests/fault_driver.py."""

import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import CPU_ENV, torchrun
from test_faults import DRIVER, PRETRAIN, one_line_error, start, wait_for
from test_pretrain import assert_same_weights, final_weights

from simmim.cli import main
from simmim.weights import read_checkpoint

RUN = [*PRETRAIN, "schedule.max_steps=12"]  # checkpoints every 4 steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 12-step run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*RUN, "--output", str(out)]) == 0
    return final_weights(out)


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt"))


def stop_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_sigterm_saves_at_the_step_releases_the_lock_and_resume_is_exact(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, DRIVER, "signal:TERM:0:6", "--", *RUN, "--output", str(out)], env=CPU_ENV,
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(DRIVER))
    assert proc.returncode == 143, proc.stderr[-3000:]  # 128 + SIGTERM, as a shell reports a killed job
    ckpt = out / "checkpoints" / "ckpt-00000006.pt"
    assert stop_line(proc.stderr) == f"error: stopped by SIGTERM at step 6; checkpoint {ckpt}; continue with " \
                                     "--resume auto"
    assert checkpoints(out) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    assert not (out / ".lock").exists()  # released, not left stale
    assert main([*RUN, "--output", str(out), "--resume", "auto"]) == 0
    assert_same_weights(final_weights(out), straight)


ACCUMULATED = [*RUN, "data.batch_size=4", "optim.accumulation_steps=2", "data.num_workers=2"]


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])  # Linux's default; Python 3.14's default
def test_ctrl_c_in_the_middle_of_a_step_reaches_the_data_workers_too_and_the_run_still_stops_cleanly(
        tmp_path, start_method):
    """A terminal's Ctrl-C signals the whole process group, DataLoader workers included. The signal lands in the
    first of a step's two micro-batches: the second must still come from the workers, which must not have died
    of it (the main process decides); then the run saves that step."""
    straight = tmp_path / "straight"
    assert main([*ACCUMULATED, "--output", str(straight)]) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, DRIVER, "pause_at:9", "--", *ACCUMULATED, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(DRIVER),
                            env={**CPU_ENV, "SIMMIM_TEST_START_METHOD": start_method}, start_new_session=True)
    try:
        wait_for(proc, "PAUSED")  # in the forward of micro-batch 9 = the first half of step 5
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]  # 128 + SIGINT
    assert stop_line(stderr).startswith("error: stopped by SIGINT at step 5; checkpoint ")
    assert checkpoints(out) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert main([*ACCUMULATED, "--output", str(out), "--resume", "auto"]) == 0
    assert_same_weights(final_weights(out), final_weights(straight))


@pytest.mark.parametrize("name,code", [("INT", -signal.SIGINT), ("TERM", -signal.SIGTERM)])
def test_a_second_signal_aborts_at_once_and_the_lock_dies_with_the_process(tmp_path, name, code):
    out = tmp_path / "run"
    proc = start(f"signal:{name},{name}:0:6", *RUN, "--output", str(out))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]  # killed by the signal: no save, no clean exit
    assert f"received SIG{name}: finishing the current step" in stderr  # the first one was only noted
    assert checkpoints(out) == ["ckpt-00000004.pt"]  # the step-6 save never happened
    # SIGINT unwinds (KeyboardInterrupt) and removes the lock file; SIGTERM's default action leaves it, stale
    assert main([*RUN, "schedule.max_steps=6", "--output", str(out), "--resume", "auto"]) == 0
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000006.pt")["step"] == 6


def test_a_signal_during_setup_stops_before_the_first_step_and_restores_the_handlers(tmp_path, capsys,
                                                                                    monkeypatch):
    import simmim.pretrain

    build = simmim.pretrain.build_dataset

    def build_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only notes it: setup goes on to the loop
        return build(*args, **kwargs)

    monkeypatch.setattr(simmim.pretrain, "build_dataset", build_then_signal)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    assert main([*RUN, "--output", str(out)]) == 143
    assert one_line_error(capsys) == ("error: stopped by SIGTERM before the first step; no checkpoint to write; "
                                      "continue with --resume auto")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not (out / ".lock").exists() and checkpoints(out) == []
    monkeypatch.undo()
    assert main([*RUN, "schedule.max_steps=4", "--output", str(out), "--resume", "auto"]) == 0
    assert checkpoints(out) == ["ckpt-00000004.pt"]


def test_fine_tuning_stops_on_sigint_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    from test_finetune import pretrain_checkpoint

    from simmim.engine import Engine

    ckpt = pretrain_checkpoint(tmp_path)
    original = Engine._optimizer_step

    def step_then_ctrl_c(self, loss):
        out = original(self, loss)
        if self.state.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Engine, "_optimizer_step", step_then_ctrl_c)
    out = tmp_path / "ft"
    args = ["finetune", "demo/finetune", "--pretrained", str(ckpt), "--output", str(out), "schedule.max_steps=6",
            "model.img_size=32", "model.window_size=4", "data.batch_size=8", "run.progress=false"]
    assert main(args) == 130
    assert one_line_error(capsys).startswith("error: stopped by SIGINT at step 3; checkpoint ")
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000003.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_outside_the_main_thread_leaves_the_signal_handlers_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main([*RUN, "schedule.max_steps=2", "--output",
                                                                str(tmp_path / "run")])))
    thread.start()
    thread.join(timeout=300)
    assert codes == [0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resume_is_exact(tmp_path):
    """Rank 0 alone is signalled, twice (as when a job's SIGTERM reaches it both from the scheduler and forwarded
    by torchrun): under the launcher the repeat does not abort, and the ranks vote every 5 steps, so both save
    step 5 and stop together."""
    args = [*PRETRAIN, "data.batch_size=4", "schedule.max_steps=8"]
    straight = subprocess.run(torchrun(2, "-m", "simmim", *args, "--output", str(tmp_path / "straight")),
                              env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "run"
    logs = tmp_path / "logs"  # each rank's output in its own files: on one shared stderr their lines interleave
    proc = subprocess.run(torchrun(2, "--log-dir", str(logs), "--redirects", "3", DRIVER, "signal:TERM,TERM:0:3", "--",
                                   *args, "--output", str(out)), env=CPU_ENV, capture_output=True, text=True,
                          timeout=300)
    ranks = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    printed = {int(f.parent.name): f.read_text() for f in logs.rglob("stdout.log")}
    assert proc.returncode != 0 and "SIGNALLED" in printed.get(0, ""), proc.stderr[-3000:]
    for rank in (0, 1):  # both ranks, the same step
        assert f"step 5: stopping on SIGTERM (process {rank} of 2); saving a checkpoint first" in ranks[rank], \
            ranks[rank][-3000:]
    # rank 0's one line (rank 1's too unless torchrun, seeing rank 0 exit first, ends it before it prints)
    stops = [line for text in ranks.values() for line in text.splitlines() if "error: stopped by SIGTERM" in line]
    assert stops and all("at step 5; checkpoint" in line for line in stops), ranks
    assert checkpoints(out) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert not (out / ".lock").exists()
    resumed = subprocess.run(torchrun(2, "-m", "simmim", *args, "--output", str(out), "--resume", "auto"),
                             env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(out), final_weights(tmp_path / "straight"))
