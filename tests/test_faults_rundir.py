"""Fault injection for the run directory (issue 15 items 1, 2, 11, 12): a run owns only what it lists in its
manifest, every refusal leaves the output directory exactly as it was (a fresh one is not even created), and a
full, read-only or misnamed output ends in one line with the right exit code."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from test_faults import PRETRAIN, one_line_error, snapshot

from simmim.cli import main
from simmim.configs import resolve
from simmim.run_dir import MANIFEST_NAME
from simmim.weights import read_checkpoint


def user_images(folder: Path, n: int = 40) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


def refused(argv: list[str], out: Path, capsys, code: int = 2) -> str:
    """Run ``argv``, expect ``code`` and one error line, and ``out`` exactly as before (or still absent)."""
    before = snapshot(out) if out.exists() else None
    assert main(argv) == code
    line = one_line_error(capsys)
    if before is None:
        assert not out.exists(), f"{out} was created by a refused run"
    else:
        assert snapshot(out) == before, "a refused run changed the output directory"
    return line


def manifest(out: Path) -> list[str]:
    return json.loads((out / MANIFEST_NAME).read_text())["entries"]


# ----------------------------------------------------------------------------------------------------------------
# item 1: --overwrite removes only what runs wrote


def test_the_issues_reproduction_loses_no_user_file(tmp_path, capsys):
    """proj/images (the user's data) and proj/config.yaml (the user's config), --output proj: refused with and
    without --overwrite, and every user file keeps its sha256."""
    proj = tmp_path / "proj"
    user_images(proj / "images")
    shutil.copy(resolve("demo/pretrain"), proj / "config.yaml")
    run = [*PRETRAIN, "--output", str(proj), "schedule.max_steps=2"]
    for data in (str(proj / "images"), "embedded"):  # the issue's command, and the same folder with other data
        for extra in ([], ["--overwrite"], ["--resume", "auto"]):
            line = refused([*run, "--data", data, *extra], proj, capsys)
            assert "images" in line and ("config.yaml" in line or "--data" in line), line
    assert len(list((proj / "images").iterdir())) == 40


def test_a_run_beside_user_files_and_its_overwrite_touch_only_the_runs_files(tmp_path, capsys):
    out = tmp_path / "proj"
    user_images(out / "photos", 3)
    (out / "notes.txt").write_text("mine\n")
    mine = snapshot(out)
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4"]) == 0
    listed = manifest(out)
    assert {"config.yaml", "train.log", "checkpoints/", "checkpoints/ckpt-00000004.pt", "tensorboard/",
            "images/"} <= set(listed)
    assert not [e for e in listed if e.startswith(("photos", "notes"))]
    assert any(e.startswith("tensorboard/events.out.tfevents.") for e in listed)
    assert any(e.startswith("images/") and e.endswith("_00000004.png") for e in listed)
    ours = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - set(mine) - {MANIFEST_NAME}
    assert ours == {e for e in listed if not e.endswith("/")}  # every file the run wrote is listed

    (out / "checkpoints" / "my-notes.txt").write_text("a user's file inside a run folder\n")
    mine = {**mine, "checkpoints/my-notes.txt": snapshot(out)["checkpoints/my-notes.txt"]}
    line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"], out, capsys)
    assert "already holds a run" in line and "--overwrite" in line
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=2", "--overwrite"]) == 0
    after = snapshot(out)
    assert {k: after[k] for k in mine} == mine  # every user file kept, byte for byte
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "my-notes.txt"]
    assert "max_steps: 2" in (out / "config.yaml").read_text()


def test_output_equal_to_or_inside_data_is_refused_before_anything_is_written(tmp_path, capsys):
    data = user_images(tmp_path / "data", 16)
    for out in (data / "run", data):
        line = refused([*PRETRAIN, "--data", str(data), "--output", str(out), "schedule.max_steps=2"], data, capsys)
        assert "inside --data" in line and str(data) in line


def test_a_data_scan_skips_a_run_directory_inside_the_data_folder(tmp_path, caplog):
    from simmim.data import open_source

    data = user_images(tmp_path / "data", 10)
    assert main([*PRETRAIN, "--output", str(data / "oldrun"), "schedule.max_steps=2"]) == 0
    assert list((data / "oldrun" / "images").glob("*.png"))  # the run's own picture sits inside the data folder
    with caplog.at_level("WARNING", logger="simmim"):
        assert len(open_source(str(data))) == 10
    assert f"skipping {data / 'oldrun'}: it is a simmim run directory" in caplog.text


def test_a_demo_folder_holding_the_users_files_under_the_demos_names_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    user_images(out / "pretrain", 2)
    line = refused(["demo", "--quick", "--no-progress", "--output", str(out)], out, capsys)
    assert "pretrain/" in line and "did not write" in line


# ----------------------------------------------------------------------------------------------------------------
# item 2, and the migration of run directories written before manifests


def test_resume_auto_without_a_checkpoint_never_rewrites_a_users_config(tmp_path, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "config.yaml").write_text("# my notes on this config\nmodel: {name: swinv2_pico}\n")
    line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=2", "--resume", "auto"], out, capsys)
    assert "config.yaml" in line and "did not write" in line


def test_a_run_of_the_previous_version_resumes_is_adopted_and_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4"]) == 0
    (out / MANIFEST_NAME).unlink()  # what the previous version left: the same files, no manifest
    for extra in ([], ["--overwrite"]):  # its config.yaml cannot be told from a user's: refused, not deleted
        line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", *extra], out, capsys)
        assert "earlier simmim version" in line and "--resume auto" in line
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "--resume", "auto"]) == 0
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000006.pt")["step"] == 6
    listed = set(manifest(out))
    assert {"config.yaml", "train.log", "checkpoints/ckpt-00000004.pt", "checkpoints/ckpt-00000006.pt"} <= listed
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=2", "--overwrite"]) == 0  # adopted: ours now
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]


# ----------------------------------------------------------------------------------------------------------------
# item 11: checks come before writes


def test_too_many_accumulation_steps_are_refused_before_anything_is_written(tmp_path, capsys):
    args = [*PRETRAIN, "schedule.max_steps=2", "optim.accumulation_steps=1000"]
    line = refused([*args, "--output", str(tmp_path / "fresh")], tmp_path / "fresh", capsys)
    assert "optim.accumulation_steps 1000" in line
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine\n")
    refused([*args, "--output", str(used)], used, capsys)
    assert main([*PRETRAIN, "schedule.max_steps=2", "--output", str(tmp_path / "fresh")]) == 0  # the retry runs


def test_a_resume_whose_optimizer_state_does_not_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    from simmim.checkpoint import save_checkpoint

    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=4"]) == 0
    path = out / "checkpoints" / "ckpt-00000004.pt"
    ckpt = read_checkpoint(path)
    groups = ckpt["optimizer"]["param_groups"]
    ckpt["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"][:1]}]  # another grouping
    save_checkpoint(ckpt, path)  # a new file: the loaded one is memory-mapped
    line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=6", "--resume", "auto"], out, capsys)
    assert "does not fit the current parameter groups" in line


# ----------------------------------------------------------------------------------------------------------------
# item 12: the output's disk and name


def _read_only_below(root: Path, monkeypatch) -> None:
    """Make every create under ``root`` fail as on a read-only filesystem (tests run as root: modes don't)."""
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(root))

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_an_output_on_a_read_only_filesystem_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    (ro / "existing").mkdir(parents=True)
    (ro / "existing" / "notes.txt").write_text("mine\n")
    _read_only_below(ro, monkeypatch)
    for out in (ro / "new", ro / "existing"):
        line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"], out, capsys, code=1)
        assert "Read-only file system" in line and str(out) in line


def test_tensorboard_on_a_full_disk_at_start_is_one_line_and_keeps_nothing(tmp_path, capsys, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(TensorBoardTracker, "__init__", full)
    out = tmp_path / "run"
    line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"], out, capsys, code=1)
    assert "No space left on device" in line and str(out / "tensorboard") in line
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine\n")
    refused([*PRETRAIN, "--output", str(used), "schedule.max_steps=2"], used, capsys, code=1)
    monkeypatch.undo()
    assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"]) == 0  # nothing left in the way


def test_an_output_under_an_unknown_user_is_refused_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*PRETRAIN, "--output", "~nonexist_simmim/x", "schedule.max_steps=2"]) == 2
    line = one_line_error(capsys)
    assert "~nonexist_simmim" in line and "no user" in line
    assert list(tmp_path.iterdir()) == []  # no folder named '~nonexist_simmim' in the working directory


def test_an_output_naming_an_existing_file_is_refused(tmp_path, capsys):
    file = tmp_path / "model.pt"
    file.write_bytes(b"precious")
    for out in (file, file / "sub"):
        assert main([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"]) == 2
        assert "is a file, not a folder" in one_line_error(capsys)
    assert file.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [file]


def test_a_users_own_lock_file_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / ".lock").write_text("my own lock file\n")
    line = refused([*PRETRAIN, "--output", str(out), "schedule.max_steps=2"], out, capsys)
    assert ".lock exists and was not written by simmim" in line
