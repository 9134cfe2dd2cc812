"""How an export reaches the disk: staged, moved into place atomically, stopped cleanly by signals and full disks.

An export writes into a hidden ``.<name>.export-<pid>`` folder beside its target and moves each finished output into
place with one ``os.replace`` (atomic on one file system), so a reader never sees a partial file, and nothing the
export did not write is touched: an existing folder (an hf export) receives the export's files one by one and keeps
every other file. :func:`staged` wraps the whole write:

* SIGTERM and SIGINT stop it with :class:`ExportInterrupted` (exit 128 + the signal, one line) after removing the
  staging folder (SIGTERM's default action would kill the process without running any ``finally``);
* an error of the disk (full, read-only, no permission) becomes one :class:`~simmim.errors.RunStopped` line naming
  the folder, exit 1; any other error is a bug and propagates as it is;
* staging folders left by exports that were killed outright (SIGKILL) are removed by the next export there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simmim.checkpoint import pid_alive
from simmim.errors import DISK_ERRORS, SPACE_ERRORS, RunStopped, disk_errno

log = logging.getLogger(__name__)

_STAGE = re.compile(r"\.(?P<name>.+)\.export-(?P<pid>\d+)")


class ExportInterrupted(RunStopped):
    """SIGTERM/SIGINT during an export: the staging folder was removed; exit code 128 + the signal, as shells say."""


class _Signalled(BaseException):
    """Raised by the signal handler: a BaseException, like KeyboardInterrupt, so that libraries which catch
    ``Exception`` to retry another way (torch.onnx tries several capture strategies) let it through at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def remove_stale_stages(folder: Path) -> None:
    """Delete ``.<name>.export-<pid>`` staging folders left in ``folder`` by exports whose process is gone (killed
    with SIGKILL, or older versions on SIGTERM). Recognised by what an export writes there (only entries named
    after ``<name>``), so a user's folder that merely looks alike is left alone, as is a live export's."""
    if not folder.is_dir():
        return
    for stage in folder.glob(".*.export-*"):
        match = _STAGE.fullmatch(stage.name)
        if not (match and stage.is_dir() and not stage.is_symlink()) or pid_alive(int(match["pid"])):
            continue
        if all(entry.name.startswith(match["name"]) for entry in stage.iterdir()):
            log.info("removing %s, left by an interrupted export (process %s is gone)", stage, match["pid"])
            shutil.rmtree(stage, ignore_errors=True)


def _missing_parents(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


class Stage:
    """The staging folder of one export (``path``) and what the signal handler saw (see :func:`staged`)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.export-{os.getpid()}"
        self.signal: int | None = None  # caught, the export must stop
        self.pending: int | None = None  # caught while moving files into place: reported once they are all there
        self.committing = False
        self.committed = False

    def check_signal(self) -> None:
        """Stop here if a signal was caught by code that went on regardless (a library catching BaseException)."""
        if self.signal is not None:
            raise _Signalled(self.signal)

    def commit(self, names: list[str]) -> list[Path]:
        """Move the staged entries ``names`` beside the target, each with one atomic ``os.replace``, and return
        what was moved. An entry that is a folder whose target already exists is merged file by file, so every
        file the export did not write stays (as ``save_pretrained`` does); a new folder appears whole. Signals
        are held from here to the end of the export: the output is complete."""
        self.check_signal()
        self.committing = True
        moved = []
        for name in names:
            staged, final = self.path / name, self.target.parent / name
            if staged.is_dir() and final.is_dir():
                for entry in sorted(staged.iterdir()):
                    os.replace(entry, final / entry.name)
                    moved.append(final / entry.name)
            else:
                os.replace(staged, final)
                moved += [final, *final.iterdir()] if final.is_dir() else [final]
        for f in moved:
            os.chmod(f, 0o755 if f.is_dir() else 0o644)  # weights others may read, as any downloaded model
        self.committed = True
        return moved


@contextlib.contextmanager
def _stopped_by_signals(stage: Stage) -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`_Signalled` (recorded in ``stage.signal``, so a library that wraps or
    swallows it cannot hide it) and leave as :class:`ExportInterrupted`. While ``stage.committing``, a signal is
    held until the export is done. A second signal during the clean-up is ignored. Only the main thread can set
    handlers: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, written: bool = False) -> ExportInterrupted:
        name = signal.Signals(signum).name
        err = ExportInterrupted(
            f"export stopped by {name} after it was written to {stage.target} (complete)" if written else
            f"export stopped by {name}: nothing was written to {stage.target} (its staging folder was removed, an "
            "existing output is unchanged); run it again")
        err.exit_code = 128 + signum
        return err

    def handler(signum: int, frame: Any) -> None:
        if stage.signal is not None or stage.pending is not None:
            return
        if stage.committing:
            stage.pending = signum
            return
        stage.signal = signum
        raise _Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            yield
        except _Signalled as sig:
            raise interrupted(sig.signum) from None
        except Exception as err:
            if stage.signal is None:
                raise
            raise interrupted(stage.signal) from err  # the signal, wrapped by a library on its way up
        if stage.pending is not None:  # held during the moves: the export is complete, but the job must stop
            raise interrupted(stage.pending, written=True)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def staged(target: Path, source: Path, replacing: bool) -> Iterator[Stage]:
    """Write an export to ``target`` through a :class:`Stage`: the body writes into ``stage.path`` and ends with
    ``stage.commit(names)``. On any way out the staging folder is removed, and folders made for the export too
    unless it was committed. ``source`` and ``replacing`` (an existing output is to be overwritten) only word the
    one-line error of a disk that cannot take the export."""
    stage = Stage(target)
    created = _missing_parents(target.parent)
    with _stopped_by_signals(stage):
        try:
            remove_stale_stages(target.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(stage.path, ignore_errors=True)
            stage.path.mkdir()
            yield stage
        except Exception as err:
            code = disk_errno(err)
            if code is None:
                raise
            where = getattr(err, "filename", None)  # the path that failed, unless it is in the removed stage
            where = where if where and not Path(where).is_relative_to(stage.path) else target.parent
            kept = f"; the existing {target} is unchanged" if replacing else ""
            fix = "free space or choose another --out" if code in SPACE_ERRORS else "choose a writable --out"
            raise RunStopped(f"cannot write the export to {where}: {DISK_ERRORS[code]} (errno {errno.errorcode[code]})"
                             f"; nothing was written, {source} is unchanged{kept}; {fix}") from err
        finally:
            shutil.rmtree(stage.path, ignore_errors=True)
            if not stage.committed:
                for folder in created:  # folders made for this export go too (only while empty)
                    with contextlib.suppress(OSError):
                        folder.rmdir()
