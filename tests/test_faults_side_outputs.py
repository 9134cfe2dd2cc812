"""Side outputs never stop training (issue 15 item 5): TensorBoard events, reconstruction pictures and train.log
that cannot be written (a full disk) are warned about once, naming the path and the error, and the run goes on to
its checkpoints, which keep their strict behaviour (tests/test_faults.py: a full disk stops with one line)."""

import errno
import io
import logging
import os

from test_faults import PRETRAIN

from simmim.cli import main
from simmim.weights import read_checkpoint

NO_SPACE = os.strerror(errno.ENOSPC)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_a_full_disk_under_tensorboard_and_images_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from torch.utils.tensorboard import SummaryWriter  # the writer accelerate's TensorBoard tracker uses

    import simmim.visualize

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)  # every log step (and the monitor's scalars)
    monkeypatch.setattr(SummaryWriter, "add_image", disk_full)
    monkeypatch.setattr(simmim.visualize, "save_png", disk_full)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="simmim"):
        assert main([*PRETRAIN, "schedule.max_steps=12", "run.image_every=4", "--output", str(out)]) == 0
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000012.pt")["step"] == 12  # trained to the end
    tensorboard = warnings_about(caplog, "could not write tensorboard")
    assert tensorboard == [f"could not write tensorboard to {out / 'tensorboard'}: {NO_SPACE}; training goes on "
                           "without tensorboard output"]
    images = warnings_about(caplog, "could not write images")
    assert images == [f"could not write images to {out / 'images'}: {NO_SPACE}; training goes on without images "
                      "output"]  # once, although pictures were due at steps 4, 8 and 12


class FullDisk(io.StringIO):
    """A log file on a full disk: writes are buffered, flushing them fails."""

    def flush(self):
        disk_full()


def test_a_full_disk_under_train_log_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="simmim"):
        assert main([*PRETRAIN, "schedule.max_steps=8", "--output", str(out)]) == 0
    assert read_checkpoint(out / "checkpoints" / "ckpt-00000008.pt")["step"] == 8
    assert warnings_about(caplog, "could not write the log file") == [
        f"could not write the log file {out / 'train.log'}: {NO_SPACE}; training goes on, logging to the console "
        "only"]
    assert any("saved checkpoint" in r.getMessage() and "00000008" in r.getMessage() for r in caplog.records)
    assert "Logging error" not in capsys.readouterr().err  # not logging's traceback per record
