"""Asynchronous checkpoint saving (issue 18 item 8, ``run.async_save=true``): training waits only for a host copy
while a thread writes it; the files, their atomicity and their rotation are those of a direct save, a failed
background write stops the run with the same one line keeping the previous checkpoint, and a stop waits for the
write in flight. (How much less the training thread waits is measured by ``simmim benchmark --what save``, not
here.) Runs use swinv2_pico at 32 px, as tests/test_faults.py."""

import errno
import hashlib
import os
import signal
import time

import pytest
import torch
from test_checkpoint import assert_same
from test_faults import PRETRAIN, one_line_error
from test_pretrain import assert_same_weights, final_weights

from simmim import checkpoint as checkpoint_module
from simmim.checkpoint import CheckpointManager, HostSnapshot
from simmim.cli import main
from simmim.run_dir import CheckpointPolicy, CheckpointWriteError, RunDir
from simmim.weights import read_checkpoint

RUN = [*PRETRAIN, "schedule.max_steps=12", "run.keep_last=2"]  # saves at 4, 8, 12; keeps 8 and 12
ASYNC = [*RUN, "run.async_save=true"]


def names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def without_run_keys(state: dict) -> dict:
    """A checkpoint with the keys that differ between two runs by design removed: the output folder and the
    async_save switch recorded in its config."""
    config = {**state["meta"]["config"], "run": {k: v for k, v in state["meta"]["config"]["run"].items()
                                                  if k not in ("output", "async_save")}}
    return {**state, "meta": {**state["meta"], "config": config}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The synchronous 12-step run the asynchronous ones are compared with."""
    out = tmp_path_factory.mktemp("sync") / "run"
    assert main([*RUN, "--output", str(out)]) == 0
    return out


def test_an_async_run_ends_with_the_checkpoints_of_a_sync_run_and_rotates_alike(tmp_path, straight):
    out = tmp_path / "run"
    assert main([*ASYNC, "--output", str(out)]) == 0
    assert names(out) == names(straight) == ["ckpt-00000008.pt", "ckpt-00000012.pt"]
    for name in names(out):
        a, b = read_checkpoint(out / "checkpoints" / name), read_checkpoint(straight / "checkpoints" / name)
        assert a["meta"]["config"]["run"]["async_save"] is True
        assert_same(without_run_keys(a), without_run_keys(b))  # tensors: torch.equal
    assert not (out / ".lock").exists()


def test_the_background_write_is_byte_for_byte_the_direct_one_and_ignores_later_changes(tmp_path):
    torch.manual_seed(0)
    shared = torch.randn(5, 3)
    state = {"model": {"w": shared, "tied": shared, "t": torch.randn(3, 4).t()},
             "optimizer": {"state": {0: {"exp_avg": torch.randn(7), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 0.1, "params": [0]}]},
             "meta": {"name": "x", "sizes": (1, 2)}, "step": 3}
    direct = CheckpointPolicy(CheckpointManager(tmp_path / "direct"), RunDir(tmp_path / "direct"))
    background = CheckpointPolicy(CheckpointManager(tmp_path / "async"), RunDir(tmp_path / "async"),
                                  async_save=True)
    direct.write(state, 3)
    background.write(state, 3)
    shared.add_(1.0)  # training goes on while the write is in flight: the file must hold the values at the save
    state["meta"]["name"] = "changed"
    background.wait()
    shared.sub_(1.0)
    state["meta"]["name"] = "x"
    a, b = (tmp_path / d / "ckpt-00000003.pt" for d in ("direct", "async"))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    loaded = torch.load(b, weights_only=True)
    assert loaded["model"]["w"].data_ptr() == loaded["model"]["tied"].data_ptr()  # still one tensor


def test_host_buffers_are_reused_from_save_to_save():
    snap = HostSnapshot()
    state = {"w": torch.randn(4, 4)}
    first = snap.take(state)["w"]
    state["w"].mul_(2)
    second = snap.take(state)["w"]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, state["w"])
    assert second.data_ptr() != state["w"].data_ptr()


def test_a_failed_background_write_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                                         monkeypatch):
    original = checkpoint_module.torch.save
    writers = []

    def disk_full_at_step_8(obj, f, *args, **kwargs):
        writers.append(obj.get("step"))
        if obj.get("step") == 8:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_at_step_8)
    out = tmp_path / "run"
    assert main([*ASYNC, "--output", str(out), "run.keep_last=1"]) == 1
    line = one_line_error(capsys)
    assert "No space left on device" in line and "ckpt-00000004.pt is intact" in line and "--resume auto" in line
    assert writers == [4, 8]  # the failure stopped the run before its next save
    assert names(out) == ["ckpt-00000004.pt"]  # neither rotated away by the failed one nor a temp file left
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    assert not (out / ".lock").exists()


def test_sigterm_while_a_save_is_in_flight_leaves_complete_checkpoints_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                            capsys, straight):
    original = checkpoint_module.torch.save

    def slow_save(obj, f, *args, **kwargs):  # on the writer thread
        if obj.get("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this write is in flight
        time.sleep(0.5)  # the stop's own save is still in flight when the engine stops, too
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", slow_save)
    out = tmp_path / "run"
    assert main([*ASYNC, "--output", str(out)]) == 143
    line = one_line_error(capsys)
    assert line.startswith("error: stopped by SIGTERM at step ") and "continue with --resume auto" in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert 4 < step < 12
    assert f"checkpoint {out / 'checkpoints' / f'ckpt-{step:08d}.pt'};" in line
    assert names(out) == ["ckpt-00000004.pt", f"ckpt-{step:08d}.pt"]  # complete files, no temp file
    assert read_checkpoint(out / "checkpoints" / f"ckpt-{step:08d}.pt")["step"] == step
    assert not (out / ".lock").exists()
    monkeypatch.undo()
    assert main([*ASYNC, "--output", str(out), "--resume", "auto"]) == 0
    assert_same_weights(final_weights(out), final_weights(straight))


def test_a_write_failure_is_reported_once_even_when_the_run_stops_for_another_reason(tmp_path, caplog,
                                                                                   monkeypatch):
    policy = CheckpointPolicy(CheckpointManager(tmp_path / "checkpoints"), RunDir(tmp_path), async_save=True)
    policy.write({"step": 1, "w": torch.ones(2)}, 1)
    policy.written(1, final=True)
    policy.wait()
    original = checkpoint_module.torch.save

    def failing(code):
        def save(obj, f, *args, **kwargs):
            raise OSError(code, os.strerror(code))
        return save

    monkeypatch.setattr(checkpoint_module.torch, "save", failing(errno.EROFS))
    policy.write({"step": 2, "w": torch.ones(2)}, 2)
    policy.written(2, final=True)  # proven in memory while in flight: must fall back when the write fails
    policy.wait(raise_errors=False)  # the engine's path when another error is already on its way out
    assert "could not write checkpoint" in caplog.text and "ckpt-00000001.pt is intact" in caplog.text
    assert policy.last_good == tmp_path / "checkpoints" / "ckpt-00000001.pt"
    policy.wait()  # nothing in flight any more: nothing is raised twice
    monkeypatch.setattr(checkpoint_module.torch, "save", failing(errno.ENOSPC))
    policy.write({"step": 3, "w": torch.ones(2)}, 3)
    with pytest.raises(CheckpointWriteError, match="No space left on device; the previous checkpoint .*"
                                                   "ckpt-00000001.pt is intact"):
        policy.wait()
    monkeypatch.setattr(checkpoint_module.torch, "save", original)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt-00000001.pt"]


def test_a_bug_in_the_background_write_keeps_its_traceback(tmp_path, monkeypatch, caplog):
    policy = CheckpointPolicy(CheckpointManager(tmp_path / "checkpoints"), RunDir(tmp_path), async_save=True)

    def bug(obj, f, *args, **kwargs):
        raise ValueError("a bug in the writer")

    monkeypatch.setattr(checkpoint_module.torch, "save", bug)
    policy.write({"step": 1}, 1)
    with pytest.raises(ValueError, match="a bug in the writer"):  # not turned into a disk message
        policy.wait()
    policy.write({"step": 2}, 2)
    policy.wait(raise_errors=False)  # another error is on its way out: this one is logged with its traceback
    assert "a bug in the writer" in caplog.text and "Traceback" in caplog.text
