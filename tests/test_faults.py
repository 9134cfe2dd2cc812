"""Fault injection (issue 8): hostile inputs and interruptions end in one line naming the fix, and nothing already
saved is lost or overwritten. Runs use swinv2_pico at 32 px for a few steps; the slow ones start subprocesses."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENV, torchrun
from safetensors.torch import load_file
from test_pretrain import TINY, assert_same_weights, final_weights

from simmim.cli import main
from simmim.weights import read_checkpoint

DRIVER = str(Path(__file__).with_name("fault_driver.py"))
PRETRAIN = ["pretrain", "demo/pretrain", *TINY, "run.save_every=4"]


def snapshot(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``directory`` (what "nothing was lost or changed" compares)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def start(fault: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, DRIVER, fault, "--", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CPU_ENV, cwd=Path(__file__).parent)


def wait_for(proc: subprocess.Popen, marker: str) -> None:
    for line in proc.stdout:
        if marker in line:
            return
    raise AssertionError(f"the process ended before printing {marker}: {proc.stderr.read()[-2000:]}")


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------------------------------------------
# reusing and sharing an output directory


def test_a_fresh_run_into_another_runs_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=8"]) == 0
    before = snapshot(out)
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "optim.base_lr=1e-2"]) == 2
    line = one_line_error(capsys)
    assert "already holds a run" in line and "--resume auto" in line and "--output" in line
    assert "--overwrite" in line
    assert snapshot(out) == before  # config.yaml, train.log, checkpoints, events: untouched

    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    assert "max_steps: 6" in (out / "config.yaml").read_text()
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "--resume", "auto"]) == 0  # done already
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000006.pt")["step"] == 6


def test_a_rejected_resume_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4"]) == 0
    before = snapshot(out)
    assert main([*PRETRAIN, "--output", str(out), "model.name=swinv2_nano", "--resume", "auto"]) == 2
    assert "model config" in one_line_error(capsys)
    assert snapshot(out) == before


def test_a_second_job_on_a_running_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    args = [*PRETRAIN, "--output", str(out), "schedule.max_steps=12"]
    first = start("hang_after_save:4", *args)
    try:
        wait_for(first, "CHECKPOINTED")
        # the first job waits; its TensorBoard writer may still flush in the background: compare the rest
        before = {k: v for k, v in snapshot(out).items() if not k.startswith("tensorboard")}
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            assert main([*args, *extra]) == 2
            line = one_line_error(capsys)
            assert "in use by another job" in line and f"pid {first.pid}" in line
        assert {k: v for k, v in snapshot(out).items() if not k.startswith("tensorboard")} == before
        assert (out / "checkpoints" / "ckpt-00000004.pt").is_file()
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (out / ".lock").is_file()  # SIGKILL leaves the file; the kernel lock died with the process
    with caplog.at_level("WARNING", logger="simmim"):
        assert main([*args, "--resume", "auto"]) == 0
    assert f"stale lock of pid {first.pid}" in caplog.text
    assert not (out / ".lock").exists()  # released at the end
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000012.pt")["step"] == 12


# ----------------------------------------------------------------------------------------------------------------
# interruptions


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(tmp_path):
    args = [*PRETRAIN, "schedule.max_steps=12"]
    assert main([*args, "--output", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    proc = start("hang_in_write:8", *args, "--output", str(killed))
    try:
        wait_for(proc, "WRITING")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    ckpts = killed / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("ckpt-*.pt")) == ["ckpt-00000004.pt"]  # 8 was never renamed in
    assert list(ckpts.glob(".ckpt-00000008.pt.tmp-*"))  # the half-written temp file
    assert read_checkpoint(ckpts / "ckpt-00000004.pt")["step"] == 4
    assert main([*args, "--output", str(killed), "--resume", "auto"]) == 0
    assert not list(ckpts.glob(".*.tmp-*"))  # the dead writer's temp file is cleaned up
    assert_same_weights(final_weights(killed), final_weights(tmp_path / "straight"))


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    from simmim import checkpoint as checkpoint_module

    original = checkpoint_module.torch.save

    def disk_full_at_step_8(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 8:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_at_step_8)
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=12"]) == 1
    line = one_line_error(capsys)
    assert "No space left on device" in line and "ckpt-00000004.pt is intact" in line and "--resume auto" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000004.pt"]  # no temp file left
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    monkeypatch.undo()
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=12", "--resume", "auto"]) == 0


def test_a_killed_rank_ends_the_distributed_run_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = [*PRETRAIN, "data.batch_size=4", "schedule.max_steps=12", "--output", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(torchrun(2, DRIVER, "kill_rank:1:4", "--", *args), env=CPU_ENV, capture_output=True,
                          text=True, timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and "KILLING RANK 1" in proc.stdout, proc.stderr[-2000:]
    assert elapsed < 200  # the surviving rank did not hang on its next collective
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    resumed = subprocess.run(torchrun(2, "-m", "simmim", *args, "--resume", "auto"), env=CPU_ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000012.pt")["step"] == 12


# ----------------------------------------------------------------------------------------------------------------
# foreign, damaged and misdirected files


def test_a_foreign_newest_checkpoint_is_skipped_by_resume_auto(tmp_path, caplog):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4"]) == 0
    torch.save({"foo": 1}, out / "checkpoints" / "ckpt-00000008.pt")
    with caplog.at_level("WARNING", logger="simmim"):
        assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "--resume", "auto"]) == 0
    assert "skipping checkpoint of step 8" in caplog.text
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000006.pt")["step"] == 6


@pytest.mark.parametrize("content", [b"", b"garbage", "foreign"])
def test_an_explicit_bad_resume_fails_before_anything_is_built_or_written(tmp_path, capsys, monkeypatch, content):
    bad = tmp_path / "bad.pt"
    if content == "foreign":
        torch.save({"foo": 1}, bad)
    else:
        bad.write_bytes(content)
    import simmim.pretrain

    monkeypatch.setattr(simmim.pretrain, "build_encoder", lambda cfg: pytest.fail("the model was built"))
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "--resume", str(bad)]) == 2
    assert str(bad) in one_line_error(capsys)
    assert not out.exists()


def test_truncated_and_foreign_safetensors_are_one_line_errors(tmp_path, capsys):
    from test_finetune import pretrain_checkpoint

    ckpt = pretrain_checkpoint(tmp_path)
    good = tmp_path / "enc.safetensors"
    assert main(["export", str(ckpt), "--out", str(good)]) == 0
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:300])
    renamed = tmp_path / "pickle.safetensors"
    renamed.write_bytes(ckpt.read_bytes())
    capsys.readouterr()
    for bad in (truncated, renamed):
        commands = [
            ["finetune", "demo/finetune", "--pretrained", str(bad), "--output", str(tmp_path / "ft"),
             "schedule.max_steps=1"],
            ["eval", str(bad), "--data", "embedded:digits"],
            ["export", str(bad), "--out", str(tmp_path / "x.onnx"), "--format", "onnx"],
        ]
        for command in commands:
            assert main(command) == 2, command
            line = one_line_error(capsys)
            assert "not a readable safetensors file" in line and str(bad) in line, line
    assert not (tmp_path / "ft").exists() and not (tmp_path / "x.onnx").exists()


def test_export_never_writes_onto_its_source_or_an_existing_file(tmp_path, capsys):
    from test_finetune import pretrain_checkpoint

    ckpt = pretrain_checkpoint(tmp_path)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert main(["export", str(ckpt), "--out", str(ckpt)]) == 2
    assert "would overwrite the source checkpoint" in one_line_error(capsys)
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(ckpt.parent)]) == 2  # a folder holding it
    assert "would overwrite the source checkpoint" in one_line_error(capsys)
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    first = load_file(out)
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in one_line_error(capsys)
    assert main(["export", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert all(torch.equal(v, first[k]) for k, v in load_file(out).items())  # same weights, replaced atomically
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_resume_auto_starts_fresh_where_a_run_stopped_before_its_first_checkpoint(tmp_path):
    from simmim.run_dir import Manifest

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("model: {}\n")  # what a run that died before saving leaves
    (out / "checkpoints" / "ckpt-00000003.pt.diverged").write_bytes(b"set aside")
    Manifest(out).add([out / "config.yaml", out / "checkpoints" / "ckpt-00000003.pt.diverged"],
                      [out / "checkpoints"])  # and its list of them
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4", "--resume", "auto"]) == 0
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    assert (out / "checkpoints" / "ckpt-00000003.pt.diverged").read_bytes() == b"set aside"
