"""Opening a run (:func:`start_run`, :func:`open_run`) and its output directory: one job at a time (a lock), never
two runs mixed (the reuse check), the checkpoint to resume read and checked up front, and the logs.

Every check here runs before anything is written into the directory; :meth:`RunDir.open` writes (``config.yaml``,
``train.log``) only once the caller's own checks (data, model, resume checkpoint) have passed too.

Layout: ``config.yaml``, ``train.log``, ``checkpoints/``, ``tensorboard/``, ``images/`` and, while a job runs,
``.lock`` naming it (host, pid, start time, command).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from simmim.checkpoint import CHECKPOINT_DIRNAME, pid_alive, resolve_resume
from simmim.errors import UserError
from simmim.side_outputs import LogFileHandler
from simmim.weights import Weights, read_run_checkpoint

log = logging.getLogger(__name__)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOCK_NAME = ".lock"
RUN_FILES = ("config.yaml", "train.log")  # what --overwrite replaces, with the folders below
RUN_DIRS = (CHECKPOINT_DIRNAME, "tensorboard", "images")

try:
    import fcntl
except ImportError:  # Windows: an exclusive create with a pid check instead of a kernel lock
    fcntl = None  # type: ignore[assignment]


class RunDirError(UserError):
    """The output directory cannot be used as asked; the message offers the ways forward."""


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
        return json.loads(text)
    except ValueError:
        return {}


# ----------------------------------------------------------------------------------------------------------------
# the directory


def holds_run(directory: Path) -> str | None:
    """What in ``directory`` shows that a run wrote it (in words), or None for an empty / unrelated folder."""
    ckpts = sorted((directory / CHECKPOINT_DIRNAME).glob("*.pt")) if (directory / CHECKPOINT_DIRNAME).is_dir() else []
    found = [f"{len(ckpts)} checkpoint(s) up to {ckpts[-1].name}"] if ckpts else []
    found += [name for name in ("config.yaml", "tensorboard") if (directory / name).exists()]
    return ", ".join(found) or None


class RunDir:
    """The output directory of one job: locked on entry (main process), checked, opened for writing on demand.

    ``fresh`` (no checkpoint to resume) into a directory that holds another run is refused unless ``overwrite``,
    which removes that run's files (only ours: config.yaml, train.log, checkpoints/, tensorboard/, images/) when the
    directory is opened, after every check has passed.
    """

    def __init__(self, output: str | Path, main_process: bool = True) -> None:
        self.path = Path(output).expanduser()
        self.main_process = main_process
        self.lock = RunLock(self.path)
        self._created = False

    def acquire(self) -> None:
        """Take the directory's lock (main process; the other ranks of a run share it)."""
        if self.main_process:
            self._created = not self.path.exists()
            self.lock.acquire()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.main_process:
            return
        self.lock.release()
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a run refused before writing anything leaves no empty folder behind

    def check_reuse(self, fresh: bool, overwrite: bool, resume_asked: bool = False) -> None:
        """Refuse a fresh run into a directory holding another run, unless ``overwrite``, or unless ``--resume
        auto`` was asked and there is no checkpoint at all to lose (a run that stopped before its first save)."""
        if not fresh or overwrite:
            return
        ckpt_dir = self.path / CHECKPOINT_DIRNAME
        if resume_asked and not (ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt"))):
            return
        found = holds_run(self.path)
        if found:
            raise RunDirError(f"{self.path} already holds a run ({found}); continue it with --resume auto, choose a "
                              "new --output, or replace it with --overwrite")

    def open(self, overwrite: bool = False) -> None:
        """Create the directory for writing (main process), removing an old run's files when ``overwrite``."""
        if not self.main_process:
            return
        if overwrite:
            removed = [n for n in (*RUN_FILES, *RUN_DIRS) if (self.path / n).exists()]
            for name in removed:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if removed:
                log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), self.path)
        self.path.mkdir(parents=True, exist_ok=True)


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
# opening a run: the accelerator, the lock, the checks, then the files


def make_accelerator(output: Path, mixed_precision: str, accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator logging to ``output/tensorboard`` that accumulates ``accumulation_steps`` micro-batches per
    optimizer step. On machines without a GPU it runs on the CPU, and under ``torchrun`` its processes join one
    gloo group (accelerate only does this when told it is on the CPU)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if AcceleratorState._shared_state:  # a second run in one process (tests, the demo) may change precision
        AcceleratorState._reset_state(reset_partial_state=False)

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

    @property
    def out(self) -> Path:
        return self.run_dir.path


def _agree(acc: Accelerator, check: Any) -> None:
    """Run ``check`` on the main process; every process raises what it raised (a :class:`RunDirError`), so the
    ranks of one distributed run fail together instead of waiting for each other."""
    message = [None]
    if acc.is_main_process:
        try:
            check()
        except RunDirError as err:
            message = [str(err)]
    if acc.num_processes > 1:
        broadcast_object_list(message)
    if message[0]:
        raise RunDirError(message[0])


@contextlib.contextmanager
def start_run(output: str | Path, mixed_precision: str, resume: str | None, seed: int, accumulation_steps: int = 1,
              overwrite: bool = False, model_name: str | None = None) -> Iterator[RunStart]:
    """The opening every run shares, before any heavy work and before anything is written: the accelerator,
    console logging, the run directory's lock and reuse check, and the checkpoint to resume (read and checked
    here, so a bad ``--resume`` fails before the model and data are built). The caller writes into the directory
    with :func:`open_run` once its own checks passed. Seeds the initial weights (equal on every process)."""
    out = Path(output).expanduser()
    accelerator = make_accelerator(out, mixed_precision, accumulation_steps)
    setup_logging(None, main_process=accelerator.is_main_process)  # console only until the directory opens
    run_dir = RunDir(out, main_process=accelerator.is_main_process)
    with run_dir:
        _agree(accelerator, run_dir.acquire)  # the main process locks for every rank of the run
        found = resolve_resume(resume, out, load=lambda p: read_run_checkpoint(p, "--resume", resume=True))
        weights = found[1] if found else None
        _agree(accelerator, lambda: run_dir.check_reuse(fresh=weights is None, overwrite=overwrite,
                                                        resume_asked=str(resume) == "auto"))
        if weights is not None and model_name and weights.meta.get("model") != model_name:
            raise UserError(f"resume checkpoint {weights.path} holds a {weights.meta.get('model')} model, the "
                             f"config asks for {model_name} (was the model config changed?); resume with "
                             "model.name set as in that run, or start a new run in another --output")
        set_seed(seed)
        yield RunStart(run_dir, accelerator, weights)


def open_run(start: RunStart, config: Any, overwrite: bool = False) -> None:
    """Every check passed: write ``config.yaml`` and ``train.log`` (main process), start TensorBoard, and log
    how the config differs from the resumed checkpoint's."""
    from simmim.config import save_config, to_dict

    acc, out = start.accelerator, start.out
    start.run_dir.open(overwrite=overwrite and start.resume is None)
    setup_logging(out / "train.log", main_process=acc.is_main_process)
    if acc.is_main_process:
        save_config(config, out / "config.yaml")
    acc.init_trackers("tensorboard")
    if start.resume is not None:
        old = start.resume.meta.get("config") or {}
        changes = [c for c in config_changes(old, to_dict(config)) if not c.startswith(("run.resume", "run.output"))]
        if changes:
            log.info("resuming with a changed config (the schedule follows the new one from step %d): %s",
                     start.resume.checkpoint["step"], "; ".join(changes))
