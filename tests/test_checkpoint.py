import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from simmim.checkpoint import (
    CheckpointManager,
    save_checkpoint,
)
from simmim.run_dir import resolve_resume
from simmim.weights import read_checkpoint


def assert_same(a, b, where="state"):
    """Recursive equality for nested plain data holding tensors."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_load_roundtrip_leaves_no_temp_files(tmp_path):
    state = {"step": 7, "w": torch.randn(3, 4), "nested": {"a": [1, 2.5, None, True], "b": ("x", torch.tensor(1))}}
    out = save_checkpoint(state, tmp_path / "sub" / "model.pt")
    assert out == tmp_path / "sub" / "model.pt"
    assert files(tmp_path / "sub") == ["model.pt"]
    assert_same(read_checkpoint(out), state)
    assert_same(torch.load(out, weights_only=True), state)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(2)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")  # part of the file is on disk when the failure hits
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(2)}, path)
    monkeypatch.undo()

    assert files(tmp_path) == ["ckpt.pt"]  # temp file removed
    state = read_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(2))


def test_rotation_keeps_exactly_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt-final.pt").write_bytes(b"not a step checkpoint either")
    mgr.save_named({"best": True}, "best")
    for step in (10, 20, 30, 40):
        path = mgr.save({"step": step}, step)
        assert path.name == f"ckpt-{step:08d}.pt"
    assert [s for s, _ in mgr.list()] == [30, 40]
    assert files(tmp_path) == ["best.pt", "ckpt-00000030.pt", "ckpt-00000040.pt", "ckpt-final.pt", "notes.txt"]
    assert read_checkpoint(tmp_path / "best.pt") == {"best": True}


def test_save_never_deletes_the_file_just_written(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"step": 50}, 50)
    path = mgr.save({"step": 5}, 5)  # older than the newest, e.g. after resuming from an earlier checkpoint
    assert path.exists()
    assert [s for s, _ in mgr.list()] == [5, 50]


def test_save_cleans_leftover_temp_files_and_list_ignores_them(tmp_path):
    mgr = CheckpointManager(tmp_path)
    stale = tmp_path / ".ckpt-00000001.pt.tmp-99999"
    stale.write_bytes(b"crashed mid-write")
    assert mgr.list() == []
    assert mgr.latest_valid(read_checkpoint) is None
    mgr.save({"step": 2}, 2)
    assert not stale.exists()
    assert files(tmp_path) == ["ckpt-00000002.pt"]


def test_latest_valid_skips_corrupt_newest(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save({"step": step, "w": torch.full((64,), float(step))}, step)
    newest = mgr.path_for(3)
    newest.write_bytes(newest.read_bytes()[:100])  # a partially copied file
    with caplog.at_level(logging.WARNING, logger="simmim.checkpoint"):
        path, state = mgr.latest_valid(read_checkpoint)
    assert path == mgr.path_for(2) and state["step"] == 2
    assert "step 3" in caplog.text and str(newest) in caplog.text


def test_latest_valid_none_when_all_corrupt(tmp_path):
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"garbage")
    assert CheckpointManager(tmp_path).latest_valid(read_checkpoint) is None


class Foo:
    pass


@pytest.mark.parametrize(
    ("state", "where", "kind"),
    [
        ({"config": {"x": Foo()}}, "state['config']['x']", "Foo"),
        ({"hist": [1.0, np.float64(2.0)]}, "state['hist'][1]", "float64"),
        ({"arr": np.zeros(3)}, "state['arr']", "ndarray"),
        ({"fn": print}, "state['fn']", "builtin_function_or_method"),
        ({"s": {1, 2}}, "state['s']", "set"),
    ],
)
def test_non_plain_state_raises_naming_the_key(tmp_path, state, where, kind):
    with pytest.raises(TypeError, match="plain data only") as err:
        save_checkpoint(state, tmp_path / "x.pt")
    assert str(err.value).startswith(f"{where} is a ") and kind in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_non_plain_key_and_non_dict_state_raise(tmp_path):
    with pytest.raises(TypeError, match=r"state\['a'\] has a key"):
        save_checkpoint({"a": {Foo(): 1}}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="a checkpoint is a dict"):
        save_checkpoint([1, 2], tmp_path / "x.pt")


def test_realistic_training_state_loads_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=100, warmup_t=10, warmup_lr_init=1e-6, lr_min=1e-5, t_in_epochs=False)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step_update(1)
    scaler = torch.amp.GradScaler("cpu")
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "step": 1,
        "epoch": 0,
        "config": {"model": {"name": "swinv2_tiny", "img_size": 192, "window_sizes": [12, 12, 12, 6]}, "lr": 1e-4},
    }
    path = save_checkpoint(state, tmp_path / "train.pt")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert_same(loaded, state)
    assert isinstance(loaded["model"], OrderedDict)

    # and the pieces go back into fresh objects
    model2 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, weight_decay=0.05)
    opt2.load_state_dict(loaded["optimizer"])
    sched2 = CosineLRScheduler(opt2, t_initial=100, warmup_t=10, t_in_epochs=False)
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.warmup_lr_init == 1e-6 and sched2._get_lr(5) == sched._get_lr(5)
    torch.amp.GradScaler("cpu").load_state_dict(loaded["scaler"])


def test_read_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_checkpoint(missing)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=str(bad)):
        read_checkpoint(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=str(empty)):
        read_checkpoint(empty)


def test_resolve_resume(tmp_path, caplog):
    assert resolve_resume(None, tmp_path, load=read_checkpoint) is None
    assert resolve_resume("", tmp_path, load=read_checkpoint) is None
    with caplog.at_level(logging.INFO, logger="simmim.run_dir"):
        assert resolve_resume("auto", tmp_path, load=read_checkpoint) is None
    assert "starts fresh" in caplog.text

    mgr = CheckpointManager(tmp_path / "checkpoints")
    mgr.save({"step": 1}, 1)
    newest = mgr.save({"step": 2}, 2)
    assert resolve_resume("auto", tmp_path, load=read_checkpoint) == (newest, {"step": 2})
    assert resolve_resume(str(newest), tmp_path / "elsewhere", load=read_checkpoint) == (newest, {"step": 2})

    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="--resume auto") as err:
        resolve_resume(str(missing), tmp_path, load=read_checkpoint)
    assert str(missing) in str(err.value)


def test_resolve_resume_auto_falls_back_past_a_foreign_newest_checkpoint(tmp_path, caplog):
    """A loadable but foreign newest file (issue 8 item 7) is skipped with a warning naming why."""
    def load(path):
        state = read_checkpoint(path)
        if "model" not in state:
            raise ValueError(f"{path} is not a run checkpoint")
        return state

    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    good = mgr.save({"model": {"w": torch.ones(1)}, "step": 4}, 4)
    torch.save({"foo": 1}, mgr.path_for(8))
    with caplog.at_level(logging.WARNING, logger="simmim.checkpoint"):
        path, state = resolve_resume("auto", tmp_path, load=load)
    assert path == good and state["step"] == 4
    assert "skipping checkpoint of step 8" in caplog.text
    with pytest.raises(ValueError, match="not a run checkpoint"):
        resolve_resume(str(mgr.path_for(8)), tmp_path, load=load)  # an explicit path is never replaced


def test_rotation_removes_accelerate_state_folders_and_spares_kept_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        mgr.save({"step": step}, step, rotate=False)
        mgr.state_dir_for(step).mkdir()
        (mgr.state_dir_for(step) / "optimizer.bin").write_bytes(b"shard")
    mgr.rotate(keep=[mgr.path_for(1)])
    assert files(tmp_path) == ["accelerate-00000001", "accelerate-00000003", "ckpt-00000001.pt",
                               "ckpt-00000003.pt"]


def test_stale_temp_files_of_a_live_writer_are_kept(tmp_path):
    import os

    live = tmp_path / f".ckpt-00000001.pt.tmp-{os.getpid()}"  # this process is alive: its write is in flight
    dead = tmp_path / ".ckpt-00000001.pt.tmp-999999999"
    live.write_bytes(b"in flight")
    dead.write_bytes(b"crashed")
    CheckpointManager(tmp_path).save({"step": 2}, 2)
    assert live.exists() and not dead.exists()


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"obj": Foo()}, path)  # written around save_checkpoint, e.g. by an old script
    with pytest.raises(ValueError, match=str(path)):
        read_checkpoint(path, stub_classes=False)
