"""A run's life on disk, in one room: where it may write (the output checks, the lock, the manifest and the reuse
rule), what it resumes from (choosing and checking the checkpoint), its logs, and which of its checkpoints count
(the pending / proven-good / diverged policy). :mod:`simmim.checkpoint` only writes and rotates files atomically;
:mod:`simmim.weights` only reads weight files; :mod:`simmim.engine` runs the loop and calls
:class:`CheckpointPolicy` at its save points.

**A run directory** ``OUTPUT`` holds ``config.yaml``, ``train.log``, ``checkpoints/`` (``ckpt-<step>.pt``,
``best.pt``, ``accelerate-<step>/``, ``*.diverged``), ``tensorboard/``, ``images/``, the manifest
``.simmim-run.json`` that lists every file and folder runs wrote there (relative paths, folders as ``name/``;
rewritten atomically before each new file, or right after TensorBoard's writer creates its event file), and,
while a job runs, ``.lock`` naming it.
Only the manifest makes a directory a run directory: ``--overwrite`` removes exactly the listed files that are
still there, then the listed folders that are left empty, and nothing else. Other files in ``OUTPUT`` (the user's
images, notes, configs) are never touched: a run goes beside them, unless one of them has a name a run writes
(``config.yaml``, ``train.log``, ``checkpoints``, ``tensorboard``, ``images``) and no manifest lists it; then the run
is refused naming it, with or without ``--overwrite``.

**Opening a run**, in this order; nothing is written before step 5, so every refusal leaves ``OUTPUT`` exactly as
it was (and does not create it):

1. ``--output`` is checked: not a file, no ``~user`` that does not exist, not ``--data`` or inside it, and
   ``--data`` not inside one of the folders a run writes (:func:`check_output`).
2. The lock is taken (:class:`RunLock`); a job already running there is named and refused.
3. The resume checkpoint is chosen (:func:`resolve_resume`) and checked: ours, resumable, the same model.
4. The reuse rule (:meth:`RunDir.check_reuse`). Then the caller's own checks: data, model, plan, the resumed
   state loaded into model and optimizer (:meth:`simmim.engine.Engine.resume`).
5. :func:`open_run`: ``--overwrite`` removes the previous run's listed files; the manifest, ``train.log``,
   ``config.yaml`` and the TensorBoard file are written. A full or read-only disk here stops the run with one line
   (:class:`~simmim.errors.RunStopped`, exit 1) and removes again what this opening had created.

**What happens on resume** (``--resume auto``): the newest ``checkpoints/ckpt-<step>.pt`` that reads as a run
checkpoint of ours with its training state is used; a damaged or foreign newer file is skipped with a warning,
and files set aside as ``*.diverged`` are never candidates. With none, the run starts fresh, allowed in a
directory whose manifest lists no checkpoint (a run that stopped before its first save); a ``config.yaml`` no
manifest lists is never rewritten. The checkpoint must hold the configured ``model.name``, and a stream's position
needs the same processes / workers / batch / accumulation (:func:`check_stream_layout`). Weights, optimizer, grad
scaler, counters, task state and (through the step) the data position are restored; the schedule and the
optimizer's hyperparameters follow the *current* config, and ``train.log`` lists what changed. The resumed file
counts as the last good checkpoint. A directory written before manifests existed (``checkpoints/ckpt-*.pt`` of
ours, no manifest) resumes too and is adopted: from then on the manifest lists its files that match the exact
names a run writes (``config.yaml``, ``train.log``, ``checkpoints/ckpt-<8 digits>.pt``, ``best.pt``,
``tensorboard/events.out.tfevents.*``, ``images/*_<8 digits>.png``). A fresh run there is refused: its
``config.yaml`` cannot be told apart from a user's, so delete such a run yourself.

**What happens on divergence**: a step whose loss or gradient is not finite is skipped (on the device, see
:func:`simmim.engine.skip_step_on_device`); ``run.max_bad_steps`` in a row stop the run (exit 1). No checkpoint is
written during such a streak or from non-finite weights. A step checkpoint is *pending* until a later step trains
on finite numbers; then it is *proven good*, becomes the last good one, and only then may older ones rotate away,
so a diverging run never rotates away its last good checkpoint (the final checkpoint of a finished run counts as
good at once). When a streak stops the run, the pending checkpoint is set aside as ``ckpt-<step>.pt.diverged``
(with its accelerate folder), kept but never resumed by ``auto``; the message names the last good checkpoint, and
``--resume auto`` with a lower learning rate continues from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from simmim.checkpoint import (
    CHECKPOINT_DIRNAME,
    BackgroundWriter,
    CheckpointManager,
    HostSnapshot,
    pid_alive,
    write_atomic,
)
from simmim.data.file_index import RUN_MANIFEST as MANIFEST_NAME  # data scans skip folders holding it
from simmim.errors import InputNotFoundError, RunStopped, UserError, disk_errno
from simmim.side_outputs import LogFileHandler
from simmim.threads import run_threads
from simmim.weights import Weights, read_run_checkpoint

log = logging.getLogger(__name__)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOCK_NAME = ".lock"
RUN_NAMES = ("config.yaml", "train.log", CHECKPOINT_DIRNAME, "tensorboard", "images")  # what a run writes in OUTPUT
# the exact names runs write, for adopting a directory written before manifests existed
_OURS = re.compile(r"config\.yaml|train\.log|tensorboard/events\.out\.tfevents\.[^/]+|images/[^/]+_\d{8}\.png|"
                   r"checkpoints/(ckpt-\d{8}\.pt(\.diverged)?|best\.pt|last\.pt|accelerate-\d{8}(\.diverged)?/.+)")

try:
    import fcntl
except ImportError:  # Windows: an exclusive create with a pid check instead of a kernel lock
    fcntl = None  # type: ignore[assignment]


class RunDirError(UserError):
    """The output directory cannot be used as asked; the message offers the ways forward."""


class NonFiniteLossError(RunStopped):
    """The loss was NaN/inf for too many steps in a row."""


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


def _write_error(target: Path, err: OSError, previous: Path | None) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write checkpoint {target}: {err.strerror or err}; "
        f"{f'the previous checkpoint {previous} is intact' if previous else 'no earlier checkpoint'}. "
        "Free disk space (or fix permissions), then continue with --resume auto")


@contextlib.contextmanager
def disk_errors(path: Path, what: str, kept: str = "nothing was written") -> Iterator[None]:
    """Turn a full, read-only or forbidden disk at a known write into :class:`RunStopped` (one line, exit 1)
    naming ``path``; any other ``OSError`` stays what it is (a bug until shown otherwise)."""
    try:
        yield
    except OSError as err:
        if disk_errno(err) is None:
            raise
        raise RunStopped(f"could not {what} {path}: {err.strerror or err}; {kept}. Free space or fix permissions "
                         "(or choose another --output), then run again") from err


# ----------------------------------------------------------------------------------------------------------------
# the output path


def check_output(output: str | Path, data: str | None = None) -> Path:
    """``--output`` as a path, refused (one line) when it cannot be a run directory: a file, a ``~user`` that
    does not exist (``expanduser`` leaves it as is, which would create a folder named ``~user`` here), the data
    folder or a folder inside it (the run's pictures would become training data), or a folder whose run folders
    hold ``--data``. Nothing is touched."""
    text = str(output)
    path = Path(os.path.expanduser(text))  # Path.expanduser raises for an unknown user; this leaves it as is
    if str(path).startswith("~"):
        user = text[1:].split("/", 1)[0]
        raise UserError(f"--output {text}: there is no user {user!r} for '~{user}' to name; write the folder out "
                        "(e.g. /home/NAME/...) (run.output)")
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"--output {path}: {p} is a file, not a folder; choose a folder (run.output)")
    if data and "://" not in data and ":" not in data.split("/", 1)[0] and Path(data).expanduser().exists():
        src, out = Path(data).expanduser().resolve(), path.resolve()
        if out == src or src in out.parents:
            raise UserError(f"--output {path} is inside --data {src}: the run's images and checkpoints would "
                            "become training data; choose an --output outside the data folder")
        if out in src.parents and src.relative_to(out).parts[0] in RUN_NAMES:
            raise UserError(f"--data {src} is inside the run folder {out / src.relative_to(out).parts[0]} that a "
                            "run writes into; move the data or choose another --output")
    return path


# ----------------------------------------------------------------------------------------------------------------
# the lock


class RunLock:
    """An exclusive lock on ``directory/.lock`` held for a job's lifetime (one job; a distributed run's main
    process takes it for all its ranks).

    The kernel lock (``lockf``, which also works on NFS) is released when the holder dies however it dies, so a
    lock file left by a killed job is stale by construction and taken over with a warning naming the old holder.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    @staticmethod
    def _holder(text: str) -> str:
        try:
            info = json.loads(text)
            return (f"pid {info['pid']} on {info['host']} since {info['started']} "
                    f"({' '.join(info.get('argv', []))[:120]})")
        except (ValueError, KeyError, TypeError):
            return "an unknown process"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:  # a POSIX record lock: unlike flock, forked DataLoader workers do not
                    # inherit it, so it dies with this process even while orphaned workers wind down
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(os.read(fd, 1 << 16).decode(errors="replace"))
                os.close(fd)
                raise RunDirError(f"{self.path.parent} is in use by another job ({holder}); wait for it to finish "
                                  "or choose another --output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and our lock: try again
                break
            os.close(fd)
        old = os.read(fd, 1 << 16).decode(errors="replace").strip()
        if old and not {"pid", "host"} <= _parse(old).keys():  # someone's own file named .lock: not ours to take
            os.close(fd)
            raise RunDirError(f"{self.path} exists and was not written by simmim; move it away or choose another "
                              "--output")
        if old:
            info = _parse(old)
            if fcntl is None and info.get("host") == socket.gethostname() and pid_alive(int(info.get("pid", -1))):
                os.close(fd)
                raise RunDirError(f"{self.path.parent} is in use by another job ({self._holder(old)}); wait for it "
                                  "to finish or choose another --output")
            log.warning("taking over the stale lock of %s: that process is gone", self._holder(old))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: no one locks a dying file
        finally:
            os.close(self._fd)
            self._fd = None


def _parse(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# the manifest: what runs wrote


class Manifest:
    """``OUTPUT/.simmim-run.json``: the files and folders (``name/``) runs of ours wrote into ``OUTPUT``, as
    relative posix paths. An entry is added (and the file rewritten atomically) *before* the file is written, so
    a killed run never leaves a file of its own unlisted; an entry whose file is gone is harmless."""

    def __init__(self, directory: Path, entries: Iterable[str] = ()) -> None:
        self.directory = directory
        self.path = directory / MANIFEST_NAME
        self.entries = set(entries)

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest of ``directory``, or None where there is none (a folder no run of ours wrote)."""
        path = directory / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            entries = json.loads(path.read_text())["entries"]
            if not all(isinstance(e, str) for e in entries):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(f"{path} (the list of the files runs wrote here) is unreadable; restore it, or move "
                              "the run's files away yourself and delete it") from None
        return cls(directory, entries)

    def name(self, path: Path | str, folder: bool = False) -> str:
        rel = Path(path).relative_to(self.directory).as_posix()
        return rel + "/" if folder else rel

    def owns(self, name: str) -> bool:
        """Whether the file or folder ``name`` (relative) was written by a run."""
        return name in self.entries or name.rstrip("/") + "/" in self.entries

    def present(self) -> list[str]:
        """The listed entries still on disk."""
        return sorted(e for e in self.entries if os.path.lexists(self.directory / e))

    def add(self, paths: Iterable[Path], folders: Iterable[Path] = ()) -> None:
        new = {self.name(p) for p in paths} | {self.name(p, folder=True) for p in folders}
        if not new <= self.entries:
            self.entries |= new
            self.save()

    def discard(self, paths: Iterable[Path]) -> None:
        gone = {self.name(p) for p in paths} | {self.name(p, folder=True) for p in paths}
        if gone & self.entries:
            self.entries -= gone
            self.save()

    def save(self) -> None:
        doc = {"written_by": "simmim", "note": "the files runs wrote here; --overwrite removes only these",
               "entries": sorted(self.entries)}
        write_atomic(self.path, lambda f: f.write((json.dumps(doc, indent=1) + "\n").encode()))

    def remove_listed(self) -> list[str]:
        """Delete the listed files that are still there, then the listed folders left empty (deepest first).
        A folder is never removed with anything in it: files no run listed stay where they are."""
        removed = []
        for name in sorted(e for e in self.entries if not e.endswith("/")):
            target = self.directory / name
            if target.is_file() or target.is_symlink():
                target.unlink()
                removed.append(name)
        for name in sorted((e for e in self.entries if e.endswith("/")), key=lambda e: -e.count("/")):
            target = self.directory / name
            with contextlib.suppress(OSError):  # not empty (someone else's file inside) or already gone
                target.rmdir()
                removed.append(name)
        self.entries -= set(removed)
        return removed


# ----------------------------------------------------------------------------------------------------------------
# the directory: reuse rule and opening


class RunDir:
    """The output directory of one job: locked on entry (main process), checked, opened for writing on demand,
    and every file the run writes recorded in its manifest (:meth:`record`)."""

    def __init__(self, output: str | Path, main_process: bool = True) -> None:
        self.path = Path(output).expanduser()
        self.main_process = main_process
        self.lock = RunLock(self.path)
        self.manifest: Manifest | None = None  # main process: read on acquire, created on open
        self.adopt = False  # a run directory written before manifests existed, being resumed
        self._created = False
        self._new: list[Path] | None = None  # while opening: what it created, removed again if it fails

    def acquire(self) -> None:
        """Take the directory's lock and read its manifest (main process; the other ranks share both)."""
        if self.main_process:
            self._created = not self.path.exists()
            with disk_errors(self.path, "create the run directory"):
                self.lock.acquire()
            self.manifest = Manifest.read(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.main_process:
            return
        self.lock.release()
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a run refused before writing anything leaves no empty folder behind

    def _foreign(self) -> list[str]:
        """The names a run writes that exist here and no manifest lists (the user's, or an old run's)."""
        m = self.manifest
        return [n + ("/" if (self.path / n).is_dir() else "") for n in RUN_NAMES
                if os.path.lexists(self.path / n) and (m is None or not m.owns(n))]

    def _listed_checkpoints(self) -> list[str]:
        m = self.manifest
        return [e for e in (m.present() if m else []) if re.fullmatch(r"checkpoints/[^/]+\.pt", e)]

    def check_reuse(self, resume_from: Path | None, overwrite: bool, resume_asked: bool = False) -> None:
        """The reuse rule. A directory with a manifest holds a run while a listed file is still there: a fresh
        run into it is refused unless ``overwrite``, or unless ``--resume auto`` was asked and no listed
        checkpoint is left to lose. Names a run writes that no manifest lists are refused in every case, except
        a run written before manifests existed that is being resumed from its own checkpoints (adopted)."""
        m = self.manifest
        ours = self.path / CHECKPOINT_DIRNAME
        if m is None and resume_from is not None and resume_from.resolve().parent == ours.resolve():
            self.adopt = True
            return
        foreign = self._foreign()
        if foreign and m is None and CheckpointManager(ours).list():
            raise RunDirError(
                f"{self.path} holds a run of an earlier simmim version ({', '.join(foreign)}) that did not list its "
                f"files in {MANIFEST_NAME}: continue it with --resume auto, or choose another --output, or delete "
                "it yourself (--overwrite only removes files a run listed)")
        if foreign:
            raise RunDirError(
                f"{self.path} holds {', '.join(foreign)}, which simmim did not write (no {MANIFEST_NAME} lists "
                "them), and a run writes these names: move them away or choose another --output (nothing was "
                "changed)")
        if resume_from is not None or overwrite or m is None:
            return
        present, ckpts = m.present(), self._listed_checkpoints()
        if resume_asked and not ckpts:
            return
        if present:
            found = ([f"{len(ckpts)} checkpoint(s) up to {ckpts[-1].split('/')[-1]}"] if ckpts else [])
            found += [n for n in present if "/" not in n.rstrip("/") and not n.startswith(CHECKPOINT_DIRNAME)]
            raise RunDirError(f"{self.path} already holds a run ({', '.join(found)}); continue it with --resume "
                              "auto, choose a new --output, or replace it with --overwrite")

    def open(self, overwrite: bool = False) -> None:
        """Create the directory for writing (main process): with ``overwrite``, remove the files the previous
        run listed; start (or adopt) the manifest."""
        if not self.main_process:
            return
        if overwrite and self.manifest is not None:
            with disk_errors(self.path, "remove the previous run from", "some of its files may be gone"):
                removed = self.manifest.remove_listed()
                self.manifest.save()
            if removed:
                log.warning("--overwrite: removed the previous run's %d file(s) and folder(s) from %s: %s",
                            len(removed), self.path, ", ".join(removed[:8]) + (" ..." if len(removed) > 8 else ""))
        with disk_errors(self.path, "create the run directory"):
            self.path.mkdir(parents=True, exist_ok=True)
        self._new = []
        if self.manifest is None:
            self.manifest = Manifest(self.path)
            self._new.append(self.manifest.path)
            if self.adopt:  # an earlier version's run: what it wrote is recognised by exact name only
                files = [p for p in self.path.rglob("*") if p.is_file()
                         and _OURS.fullmatch(p.relative_to(self.path).as_posix())]
                folders = [self.path / n for n in RUN_NAMES[2:] if (self.path / n).is_dir()]
                self.manifest.add(files, folders)
                log.info("adopted the run in %s written by an earlier simmim version: %d of its files listed in %s",
                         self.path, len(files), MANIFEST_NAME)

    def record(self, path: Path, folder: bool = False) -> None:
        """List ``path`` (a file under the directory about to be written, or a ``folder`` about to be made) and
        every folder that writing it creates in the manifest, before it is written. Main process only."""
        if not self.main_process or self.manifest is None:
            return
        path = Path(path)
        folders = [p for p in (path.parents if not folder else (path, *path.parents))
                   if self.path in p.parents and not p.exists()]
        self.manifest.add([] if folder else [path], folders)
        if self._new is not None:
            self._new += folders + ([path] if not folder and not path.exists() else [])

    def record_tree(self, folder: Path) -> None:
        """List every file under ``folder`` (written by a library, e.g. accelerate's state folder)."""
        if self.main_process and self.manifest is not None and folder.is_dir():
            self.manifest.add([p for p in folder.rglob("*") if p.is_file()], [folder])

    def opened(self) -> None:
        """The opening succeeded: what it created stays."""
        self._new = None

    def roll_back(self) -> None:
        """The opening failed: remove what it created (best effort; the disk may refuse)."""
        new, self._new = self._new or [], None
        for path in sorted(new, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        if self.manifest is not None and self.manifest.path.exists():
            with contextlib.suppress(OSError):
                self.manifest.discard(new)


# ----------------------------------------------------------------------------------------------------------------
# choosing and checking the resume checkpoint


def resolve_resume(resume: str | Path | None, output_dir: str | Path, load: Callable[[Path], Any],
                   prefix: str = "ckpt") -> tuple[Path, Any] | None:
    """Turn the ``--resume`` value into ``(checkpoint path, load(path))``, or ``None`` to start fresh.

    ``None``/``""``: no resume. ``"auto"``: the newest checkpoint in ``<output_dir>/checkpoints`` that ``load``
    accepts (older ones are tried when the newest is damaged or foreign), or ``None`` if there is none. A
    directory: its newest valid checkpoint. Anything else: a file that must exist and load.
    """
    if resume is None or str(resume) == "":
        return None
    ckpt_dir = Path(output_dir) / CHECKPOINT_DIRNAME
    if str(resume) == "auto":
        found = CheckpointManager(ckpt_dir, prefix=prefix).latest_valid(load)
        if found is None:
            log.info("--resume auto: no valid checkpoint in %s, training starts fresh", ckpt_dir)
            return None
        log.info("--resume auto: resuming from %s", found[0])
        return found
    path = Path(resume).expanduser()
    if path.is_dir():
        found = CheckpointManager(path, prefix=prefix).latest_valid(load)
        if found is None:
            raise InputNotFoundError(f"resume directory {path} holds no valid {prefix}-<step>.pt checkpoint")
        return found
    if not path.is_file():
        raise InputNotFoundError(
            f"resume checkpoint {path} does not exist; pass --resume auto to continue from the newest checkpoint "
            f"in {ckpt_dir} (or start fresh if there is none)"
        )
    return path, load(path)


def check_stream_layout(saved: dict | None, now: dict) -> None:
    """A stream resumes by position: refuse a resume whose layout (processes, workers, batch, accumulation)
    differs from the one the checkpoint recorded."""
    if saved is not None and saved != now:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
        raise UserError(f"a stream resumes by position, which depends on processes, data.num_workers, "
                        f"data.batch_size and optim.accumulation_steps; they changed ({changed}): resume with "
                        "the settings of the interrupted run")


# ----------------------------------------------------------------------------------------------------------------
# logging


def setup_logging(log_file: str | Path | None, main_process: bool = True, level: int = logging.INFO) -> None:
    """Send ``simmim`` logs to the console (warnings only on non-main processes) and, on the main process, to
    ``log_file``. With ``log_file=None`` records are also held back in memory, and the next call with a file
    writes them there first: a run logs from its first line, but creates ``train.log`` only once its checks have
    passed. Calling it again replaces the handlers it added before. Progress bars stay intact because the
    engine runs inside tqdm's ``logging_redirect_tqdm``."""
    logger = logging.getLogger("simmim")
    held = None
    for h in list(logger.handlers):
        if getattr(h, "_simmim", False):
            logger.removeHandler(h)
            if isinstance(h, logging.handlers.MemoryHandler):
                held = h
            else:
                h.close()
    logger.setLevel(level)
    console = logging.StreamHandler()
    console.setLevel(level if main_process else logging.WARNING)
    # details for train.log only (extra={"file_only": True}): a refused run's console shows its one error line
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None and main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = LogFileHandler(log_file)  # a failing write warns once, never stops the run
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file_handler)
        if held is not None:
            held.setTarget(file_handler)
            held.flush()
    elif main_process:  # keep the records until the run directory may be written
        handlers.append(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    if held is not None:
        held.close()
    for h in handlers:
        h._simmim = True  # type: ignore[attr-defined]
        logger.addHandler(h)


def close_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` added (at the end of a run)."""
    logger = logging.getLogger("simmim")
    for h in list(logger.handlers):
        if getattr(h, "_simmim", False):
            logger.removeHandler(h)
            h.close()


def _log_to_files(level: int, message: str, exc_info: Any = None) -> None:
    """Write one record to the log files of the run (``train.log``) only, not to the console."""
    for h in logging.getLogger("simmim").handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logging.LogRecord("simmim", level, __file__, 0, message, None, exc_info))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint policy: pending, proven good, diverged


class CheckpointPolicy:
    """Which checkpoints count. Every process holds one (the decisions are the same everywhere); the main process
    writes, renames and rotates, and lists each file in the run's manifest before writing it.

    ``pending``: the newest step checkpoint, written but not yet proven good. ``last_good``: the newest one that
    proved good (a later step trained on finite numbers), or the resumed file. Rotation waits for the proof.

    ``async_save`` (``run.async_save``): :meth:`write` returns once the state is copied to host memory and a
    thread writes the copy atomically; at most one write is in flight (the next write waits for it), rotation
    also waits until the proven file is on disk, and a failed write is raised as the same
    :class:`CheckpointWriteError` by :meth:`poll` (each step) or :meth:`wait` (the end of the run, a stop).
    """

    def __init__(self, manager: CheckpointManager, run_dir: RunDir, async_save: bool = False) -> None:
        self.manager, self.run_dir = manager, run_dir
        self.main_process = run_dir.main_process
        self.last_good: Path | None = None
        self.pending: tuple[int, Path] | None = None
        # run.async_save: the main process copies the state to host memory and writes it on a thread
        self.async_save = async_save and self.main_process
        self._writer = BackgroundWriter() if self.async_save else None
        self._snapshot = HostSnapshot()
        self._in_flight: tuple[Path, Path | None] | None = None  # (target, the checkpoint intact before it)
        self._rotate_due = False  # a checkpoint proved good while its write was in flight: rotate once it lands

    @property
    def directory(self) -> Path:
        return self.manager.directory

    def path_for(self, step: int) -> Path:
        return self.manager.path_for(step)

    def newest(self, step: int) -> Path:
        """The checkpoint a finished run points users to."""
        return self.last_good or self.manager.path_for(step)

    def state_dir(self, step: int) -> Path:
        """The state folder written beside step ``step``'s file: accelerate's (FSDP/DeepSpeed optimizer shards) or
        the per-process optimizer parts of ``optim.shard_state``."""
        return self.manager.state_dir_for(step)

    def state_dir_opening(self, step: int) -> None:
        """List step ``step``'s state folder (and ``checkpoints/`` when it is new) before any process writes it, so
        a folder another process or a library creates is known as the run's (main process)."""
        self.run_dir.record(self.state_dir(step), folder=True)

    def state_dir_written(self, step: int) -> None:
        self.run_dir.record_tree(self.state_dir(step))

    def write(self, state: dict, step: int, name: str | None = None) -> Path:
        """Write a step checkpoint (``name`` None, not rotated: :meth:`proven` rotates) or a named one such as
        ``best`` (main process). A full or read-only disk stops the run naming what is intact.

        With ``async_save`` this waits for the previous write (raising its failure), copies ``state`` to host
        memory and returns while a thread writes the copy; its failure is raised by :meth:`poll` (each step) or
        :meth:`wait` (at the end, at a stop, before the next write)."""
        target = self.manager.directory / f"{name}.pt" if name else self.manager.path_for(step)
        if self._writer is not None:
            self.wait()  # at most one write in flight
        previous = self.last_good or (self.pending[1] if self.pending else None)
        try:
            self.run_dir.record(target)
            if self._writer is None:
                path = self.manager.save_named(state, name) if name else self.manager.save(state, step, rotate=False)
        except OSError as err:  # any failure of this one known write: the previous checkpoint is intact
            raise _write_error(target, err, previous) from err
        if self._writer is not None:
            copy = self._snapshot.take(state)  # the only part training waits for
            manager = self.manager
            self._writer.submit(lambda: manager.save_named(copy, name) if name
                                else manager.save(copy, step, rotate=False))
            self._in_flight = (target, previous)
            return target
        log.info("saved checkpoint %s", path)
        return path

    def poll(self) -> None:
        """Finish the bookkeeping of a background write that has landed (cheap: no wait); raise its failure as
        :class:`CheckpointWriteError`. The engine calls it after every step."""
        if self._writer is not None and self._writer.done():
            self.wait()

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the background write in flight (if any) is on disk, then rotate if a proof came meanwhile.
        Its full or read-only disk raises :class:`CheckpointWriteError` (or, ``raise_errors`` False, as when the
        run already stops for another reason, is logged); a bug in the write raises as itself."""
        if self._writer is None or self._in_flight is None:
            return
        error = self._writer.wait()
        (target, previous), self._in_flight = self._in_flight, None
        if error is not None:
            self._rotate_due = False
            if self.last_good == target:  # it proved good in memory, but never reached the disk
                self.last_good = previous
            if self.pending is not None and self.pending[1] == target:
                self.pending = None
            failure = _write_error(target, error, previous) if isinstance(error, OSError) else error
            if not raise_errors:
                log.error("%s", failure, exc_info=error if failure is error else None)  # a bug: with traceback
                return
            if failure is error:
                raise error  # a bug: its own traceback
            raise failure from error
        log.info("saved checkpoint %s", target)
        if self._rotate_due:
            self._rotate_due = False
            self._rotate()

    def written(self, step: int, final: bool) -> None:
        """Step ``step``'s checkpoint is on disk, or in flight with ``async_save`` (every process calls this,
        after :meth:`write`): it is pending until proven, except at the end of a run, where nothing later can
        prove it, so it stands as the newest."""
        self.pending = (step, self.manager.path_for(step))
        if final:
            self.proven()

    def proven(self) -> None:
        """The pending checkpoint proved good: it becomes the last good one and older ones rotate away."""
        if self.pending is not None:
            self.last_good = self.pending[1]
            self.pending = None
        if self._in_flight is not None:  # rotate only once the newest file is on disk
            self._rotate_due = True
        else:
            self._rotate()

    def _rotate(self) -> None:
        if self.main_process:
            removed = self.manager.rotate(keep=[self.last_good] if self.last_good else [])
            if removed and self.run_dir.manifest is not None:
                with contextlib.suppress(OSError):  # an entry whose file is gone is harmless: never stop for it
                    self.run_dir.manifest.discard(removed)

    def diverged(self, bad_steps: int, step: int) -> NonFiniteLossError:
        """A streak of ``bad_steps`` non-finite steps stops the run: set the unproven checkpoint aside as
        ``*.diverged`` and return the error that names the last good one."""
        aside = None
        self.wait()  # the pending file may still be in flight
        if self.pending is not None:
            pending_step, path = self.pending
            aside = path.with_name(path.name + ".diverged")
            if self.main_process:
                self.run_dir.record(aside)
                path.rename(aside)
                state_dir = self.manager.state_dir_for(pending_step)
                if state_dir.is_dir():
                    state_dir.rename(state_dir.with_name(state_dir.name + ".diverged"))
                    self.run_dir.record_tree(state_dir.with_name(state_dir.name + ".diverged"))
            self.pending = None
        where = (f"the last good checkpoint is {self.last_good}" if self.last_good
                 else "no checkpoint had proven good yet")
        return NonFiniteLossError(
            f"the loss was non-finite for {bad_steps} steps in a row (by step {step}); {where}"
            + (f" ({aside.name}, written just before the divergence, was set aside)" if aside else "")
            + ". Lower optim.base_lr, raise schedule.warmup_epochs or use run.mixed_precision=bf16/no, then "
            "resume with --resume auto")

    def resumed(self, weights: Weights) -> Path | None:
        """Resuming from ``weights``: it counts as the last good checkpoint. Returns accelerate's state folder of
        that step when there is one (sharded optimizer state)."""
        self.last_good = weights.path
        state_dir = self.manager.state_dir_for(weights.checkpoint["step"])
        return state_dir if state_dir.is_dir() else None


# ----------------------------------------------------------------------------------------------------------------
# opening a run: the accelerator, the checks, then the files


def make_accelerator(output: Path, mixed_precision: str, accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator logging to ``output/tensorboard`` that accumulates ``accumulation_steps`` micro-batches per
    optimizer step. On machines without a GPU it runs on the CPU, and under ``torchrun`` its processes join one
    gloo group (accelerate only does this when told it is on the CPU)."""
    from accelerate.utils import ProjectConfiguration

    from simmim.compat import reset_accelerator_state

    reset_accelerator_state()  # a second run in one process (tests, the demo) may change precision

    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(
        cpu=not has_accelerator,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output)),
    )


@dataclass
class RunStart:
    """What every run opens with: its directory (locked), the accelerator and the checkpoint to resume."""

    run_dir: RunDir
    accelerator: Accelerator
    resume: Weights | None
    policies: list[CheckpointPolicy] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.run_dir.path

    def checkpoints(self, keep_last: int, async_save: bool = False) -> CheckpointPolicy:
        """The checkpoint policy of this run (``OUTPUT/checkpoints``, newest ``keep_last`` step files kept;
        ``async_save``: written on a background thread from a host copy)."""
        return CheckpointPolicy(CheckpointManager(self.out / CHECKPOINT_DIRNAME, keep_last=keep_last), self.run_dir,
                                async_save)

    def record(self, path: Path) -> None:
        """List a file the run is about to write (e.g. a picture) in the manifest."""
        self.run_dir.record(path)


def _agree(acc: Accelerator, check: Callable[[], Any]) -> None:
    """Run ``check`` on the main process; every process raises what it raised (a :class:`UserError` or a
    :class:`RunStopped`), so the ranks of one distributed run fail together instead of waiting for each other."""
    message: list[Any] = [None]
    if acc.is_main_process:
        try:
            check()
        except (UserError, RunStopped) as err:
            message = [(isinstance(err, RunStopped), str(err))]
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        broadcast_object_list(message)
    if message[0]:
        stopped, text = message[0]
        raise RunStopped(text) if stopped else RunDirError(text)


@contextlib.contextmanager
def start_run(output: str | Path, mixed_precision: str, resume: str | None, seed: int, accumulation_steps: int = 1,
              overwrite: bool = False, model_name: str | None = None, data: str | None = None,
              threads: int = 0, workers: int = 0) -> Iterator[RunStart]:
    """The opening every run shares, before any heavy work and before anything is written: the output checks,
    the accelerator, console logging, the CPU threads (``threads``, 0 = auto with ``workers`` data workers, see
    :mod:`simmim.threads`; restored when the run ends), the lock, the checkpoint to resume (read and checked
    here, so a bad ``--resume`` fails before the model and data are built) and the reuse rule. The caller writes
    into the directory with :func:`open_run` once its own checks passed. Seeds the initial weights (equal
    everywhere)."""
    out = check_output(output, data)
    accelerator = make_accelerator(out, mixed_precision, accumulation_steps)
    setup_logging(None, main_process=accelerator.is_main_process)  # console only until the directory opens
    run_dir = RunDir(out, main_process=accelerator.is_main_process)
    try:
        with run_dir, run_threads(threads, workers):
            _agree(accelerator, run_dir.acquire)  # the main process locks for every rank of the run
            found = resolve_resume(resume, out, load=lambda p: read_run_checkpoint(p, "--resume", resume=True))
            weights = found[1] if found else None
            _agree(accelerator, lambda: run_dir.check_reuse(weights.path if weights else None, overwrite,
                                                            resume_asked=str(resume) == "auto"))
            if weights is not None and model_name and weights.meta.get("model") != model_name:
                raise UserError(f"resume checkpoint {weights.path} holds a {weights.meta.get('model')} model, the "
                                f"config asks for {model_name} (was the model config changed?); resume with "
                                "model.name set as in that run, or start a new run in another --output")
            set_seed(seed)
            yield RunStart(run_dir, accelerator, weights)
    except (UserError, RunStopped):
        raise
    except Exception:  # a bug: its traceback goes into train.log too (the console shows it as Python does)
        _log_to_files(logging.CRITICAL, "unexpected error (a bug, not a problem with your input; please report it "
                      "with this traceback)", exc_info=sys.exc_info())
        raise
    finally:
        close_logging()  # the run's handlers end with it: no open train.log, no console bound to an old stderr


def open_run(start: RunStart, config: Any, overwrite: bool = False) -> None:
    """Every check passed: on the main process remove the previous run's listed files (``overwrite`` of a fresh
    run), write the manifest, ``train.log`` and ``config.yaml``; start TensorBoard; log how the config differs
    from the resumed checkpoint's. A full or read-only disk stops the run with one line and removes again what
    this opening created."""
    from simmim.config import save_config, to_dict

    acc, out, run_dir = start.accelerator, start.out, start.run_dir

    tensorboard = out / "tensorboard"
    failed: list[Any] = [None]
    try:
        with disk_errors(out, "write the run's files in", "nothing of this run was kept"):
            run_dir.open(overwrite=overwrite and start.resume is None)
            run_dir.record(out / "train.log")
            run_dir.record(out / "config.yaml")
            setup_logging(out / "train.log", main_process=acc.is_main_process)
            if acc.is_main_process:
                save_config(config, out / "config.yaml")
        before = set(tensorboard.rglob("*")) if tensorboard.is_dir() else set()
        with disk_errors(tensorboard, "start TensorBoard in", "nothing of this run was kept"):
            run_dir.record(tensorboard, folder=True)
            acc.init_trackers("tensorboard")  # the main process creates the event file now
            if acc.is_main_process and run_dir.manifest is not None and tensorboard.is_dir():
                run_dir.manifest.add([p for p in tensorboard.rglob("*") if p.is_file() and p not in before])
    except RunStopped as err:
        failed = [str(err)]
    if acc.num_processes > 1:  # the ranks stop together when the main process could not write
        broadcast_object_list(failed)
    if failed[0]:
        setup_logging(None, main_process=acc.is_main_process)  # close train.log before it is removed
        run_dir.roll_back()
        raise RunStopped(failed[0])
    run_dir.opened()
    if start.resume is not None:
        old = start.resume.meta.get("config") or {}
        changes = [c for c in config_changes(old, to_dict(config)) if not c.startswith(("run.resume", "run.output"))]
        if changes:
            log.info("resuming with a changed config (the schedule follows the new one from step %d): %s",
                     start.resume.checkpoint["step"], "; ".join(changes))
