"""Export under hostile conditions (issue 15 items 3, 4, 12; issue 17 item 5): files the export did not write are
never touched, a signal or a full/read-only disk leaves nothing behind and loses nothing, the onnx extra is checked
before any work, and the fixed-size ONNX graph can be exported at another size."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import CPU_ENV, perturb_
from safetensors import SafetensorError

from simmim.checkpoint import save_checkpoint
from simmim.cli import main
from simmim.models import create_model
from simmim.weights import geometry_metadata

DRIVER = str(Path(__file__).with_name("export_driver.py"))
# the message safetensors' writer gives on a full disk (seen on a 512 KiB tmpfs): a SafetensorError, no errno
ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"


def snapshot(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file and folder under ``directory`` ("nothing lost, nothing left behind")."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def pretrain_checkpoint(path: Path, seed: int = 1) -> Path:
    """A run checkpoint of a 64 px / W4 swinv2_pico encoder (windows 4/4/4/2)."""
    enc = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0), seed=seed)
    meta = {"kind": "simmim-pretrain", **geometry_metadata(enc, "swinv2_pico"), "config": {}}
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    return save_checkpoint({"model": state, "meta": meta, "step": 1}, path)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return pretrain_checkpoint(tmp_path / "run" / "pretrain.pt")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# 15.3: --overwrite replaces the export's own files only


def test_hf_overwrite_keeps_files_the_export_did_not_write(tmp_path, ckpt, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    (out / "resnet").mkdir()
    (out / "resnet" / "weights.bin").write_bytes(os.urandom(1000))
    (out / "README.txt").write_text("my notes\n")
    mine = {k: v for k, v in snapshot(out).items() if k.startswith(("resnet", "README.txt"))}
    before = snapshot(out)
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 2  # refused without --overwrite
    assert "config.json already exists" in one_line_error(capsys) and snapshot(out) == before

    other = pretrain_checkpoint(tmp_path / "run2" / "other.pt", seed=7)  # different weights replace the old ones
    assert main(["export", str(other), "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in mine} == mine  # the user's files, byte-identical
    assert after["model.safetensors"] != before["model.safetensors"]  # the export's own files replaced
    assert set(after) == set(before)  # nothing else appeared (no staging folder, no trash)
    assert not list(tmp_path.glob(".*"))


def test_hf_export_into_a_folder_of_other_files_writes_beside_them(tmp_path, ckpt):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0  # nothing of ours to replace
    assert (out / "notes.txt").read_text() == "keep me\n" and (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# 15.4: a signal mid-export leaves nothing behind; stale staging folders of dead processes are removed


@pytest.mark.parametrize("sig,fmt", [(signal.SIGTERM, "safetensors"), (signal.SIGINT, "hf")])
def test_a_signal_mid_export_removes_the_staging_folder(tmp_path, ckpt, sig, fmt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    target = out / ("m-hf" if fmt == "hf" else "m.safetensors")
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, DRIVER, "--", "export", str(ckpt), "--format", fmt, "--out",
                             str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CPU_ENV,
                            cwd=Path(__file__).parent)
    try:
        for line in proc.stdout:
            if "STAGED" in line:
                break
        else:
            raise AssertionError(f"the export ended before staging its files: {proc.stderr.read()[-2000:]}")
        assert [p.name for p in out.glob(".*.export-*")] == [f".{target.name}.export-{proc.pid}"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"error: export stopped by {signal.Signals(sig).name}: nothing was written "
                                        f"to {target} (its staging folder was removed, an existing output is "
                                        "unchanged); run it again"]
    assert snapshot(out) == before


@pytest.mark.parametrize("library", ["swallows", "wraps"])
def test_a_signal_caught_inside_a_library_still_stops_the_export(tmp_path, ckpt, monkeypatch, library):
    """torch.onnx catches what its code raises, to retry another way or to re-raise its own error: the signal
    must still stop the export, as ExportInterrupted, with the staging folder removed."""
    from simmim import export as export_module
    from simmim.errors import RunStopped

    real = export_module.WRITERS["safetensors"]

    def writer(*args):
        files = real(*args)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (the main) thread
        except BaseException as err:
            if library == "wraps":
                raise RuntimeError("Failed to export the model with torch.export") from err
        return files

    def before(signum, frame):  # what runs without the export's own handler (and instead of killing pytest)
        raise AssertionError("the export did not handle SIGTERM")

    monkeypatch.setitem(export_module.WRITERS, "safetensors", writer)
    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(RunStopped, match="export stopped by SIGTERM") as info:
            export_module.export(ckpt, out=tmp_path / "enc.safetensors")
        assert signal.getsignal(signal.SIGTERM) is before  # the handler in place before is restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.exit_code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no staging folder


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path, ckpt):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = out / f".m.onnx.export-{dead_pid}"  # what a SIGKILLed export leaves
    (stale / "m.onnx").parent.mkdir(parents=True)
    (stale / "m.onnx").write_bytes(b"half a graph")
    live = out / f".m.onnx.export-{os.getpid()}"  # an export still running (this process)
    live.mkdir()
    (live / "m.onnx").write_bytes(b"in progress")
    lookalike = out / f".photos.export-{dead_pid}"  # a user's folder that only looks like one
    lookalike.mkdir()
    (lookalike / "holiday.jpg").write_bytes(b"jpeg")
    assert main(["export", str(ckpt), "--out", str(out / "enc.safetensors")]) == 0
    assert not stale.exists()
    assert (live / "m.onnx").read_bytes() == b"in progress"
    assert (lookalike / "holiday.jpg").read_bytes() == b"jpeg"


# ----------------------------------------------------------------------------------------------------------------
# 15.12: a full or read-only disk is one line, exit 1, naming the path, nothing lost


def _full_disk(monkeypatch) -> None:
    """safetensors' writer fails as on a full disk: part of the file written, then its SafetensorError."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(ENOSPC_MESSAGE)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("fmt", ["safetensors", "timm", "hf"])
def test_full_disk_is_one_line_and_keeps_the_existing_export(tmp_path, ckpt, capsys, monkeypatch, fmt):
    out = tmp_path / "out"
    target = out / ("enc-hf" if fmt == "hf" else "enc.safetensors")
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(target)]) == 0
    (out / "other.txt").write_text("unrelated\n")
    before, source = snapshot(out), ckpt.read_bytes()
    _full_disk(monkeypatch)
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(target), "--overwrite"]) == 1
    err = one_line_error(capsys)
    assert f"cannot write the export to {out}: no space left on the device (errno ENOSPC)" in err
    assert f"the existing {target} is unchanged" in err
    assert snapshot(out) == before and ckpt.read_bytes() == source


def test_full_disk_during_a_pth_write(tmp_path, ckpt, capsys, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; the OSError behind it names the cause."""
    def save(obj, f, *args, **kwargs):
        try:
            f.write(b"PK\3\4")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # as torch's C++ writer reports it: the OSError is only the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", save)
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "out" / "enc.pth")]) == 1
    assert "no space left on the device" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # the folder made for it went too


def test_read_only_disk_is_one_line_and_writes_nothing(tmp_path, ckpt, capsys, monkeypatch):
    real_mkdir = os.mkdir
    read_only = tmp_path / "ro"
    read_only.mkdir()

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    for fmt in ("safetensors", "hf"):
        for folder in (read_only / "sub", read_only):  # a folder to make, or the staging folder in it
            assert main(["export", str(ckpt), "--format", fmt, "--out", str(folder / "enc")]) == 1
            err = one_line_error(capsys)
            assert f"cannot write the export to {folder}: read-only file system (errno EROFS)" in err
            assert err.endswith("choose a writable --out")
    assert snapshot(read_only) == {} and [p.name for p in ckpt.parent.iterdir()] == ["pretrain.pt"]


def test_a_bug_in_a_writer_is_not_dressed_as_a_disk_error(tmp_path, ckpt, monkeypatch):
    def save_file(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: tensor is not contiguous")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(SafetensorError, match="not contiguous"):
        main(["export", str(ckpt), "--out", str(tmp_path / "enc.safetensors")])
    assert not list(tmp_path.glob(".*"))  # the staging folder is gone all the same


# ----------------------------------------------------------------------------------------------------------------
# 17.5: the onnx extra, checked before any work; the fixed-size graph at another size


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_without_the_extra_is_one_line_before_any_work(tmp_path, ckpt, capsys, monkeypatch, missing):
    from simmim import export as export_module

    monkeypatch.setitem(sys.modules, missing, None)  # import and find_spec see it as not installed
    monkeypatch.setattr(export_module, "load_run", lambda *a, **k: pytest.fail("the checkpoint was read"))
    before = snapshot(tmp_path)
    assert main(["export", str(ckpt), "--format", "onnx"]) == 2
    err = one_line_error(capsys)
    assert f"needs {missing}, which is not installed" in err and 'pip install "simmim[onnx]"' in err
    assert snapshot(tmp_path) == before


def test_onnx_at_another_size(tmp_path, ckpt, capsys):
    """The graph is fixed-size (torch.export specialises H and W): --img-size/--window-size export another size,
    onnxruntime runs it there and refuses the old size, and the card and the graph say so."""
    import onnxruntime as ort

    from simmim.weights import model_from_weights, read_run_checkpoint

    out = tmp_path / "m96.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--img-size", "96",
                 "--window-size", "6"]) == 0
    card = json.loads(Path(f"{out}.json").read_text())
    assert card["img_size"] == [96, 96] and card["effective_window_sizes"] == [[6, 6]] * 3 + [[3, 3]]
    assert card["pretrained_window_sizes"] == [[4, 4]] * 3 + [[2, 2]]  # the log-CPB keeps its trained windows
    assert card["source"]["img_size"] == [64, 64]
    assert "fixed input size 96x96" in card["onnx"]["input_size"] and "--img-size" in card["onnx"]["input_size"]
    model = model_from_weights(read_run_checkpoint(ckpt))
    model.set_input_size(img_size=96, window_size=6)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert "fixed input size 96x96" in session.get_modelmeta().description
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0]), model(x),
                                   atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="invalid dimensions"):  # 64 px, the trained size, is not this graph's
        session.run(None, {"pixel_values": torch.randn(1, 3, 64, 64).numpy()})


def test_size_options_apply_to_every_format_and_are_checked(tmp_path, ckpt, capsys):
    from safetensors.torch import load_file

    from simmim.models import create_model as build
    from simmim.weights import model_from_weights, read_run_checkpoint

    assert main(["export", str(ckpt), "--img-size", "90", "--window-size", "6"]) == 2
    assert "90" in one_line_error(capsys)
    assert not list(ckpt.parent.glob("pretrain.safetensors*"))
    out = tmp_path / "enc96.safetensors"
    assert main(["export", str(ckpt), "--out", str(out), "--img-size", "96", "--window-size", "6"]) == 0
    card = json.loads(Path(f"{out}.json").read_text())
    assert (card["img_size"], card["window_size"]) == ([96, 96], [6, 6])
    again = build("swinv2_pico", img_size=96, window_size=6, num_classes=0,
                  pretrained_window_sizes=[tuple(w) for w in card["pretrained_window_sizes"]]).eval()
    again.load_state_dict(load_file(out))
    moved = model_from_weights(read_run_checkpoint(ckpt))
    moved.set_input_size(img_size=96, window_size=6)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(again(x), moved(x), rtol=0, atol=0)
