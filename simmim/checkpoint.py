"""Atomic, resumable checkpoints that hold plain data only.

A checkpoint is a ``dict`` of tensors, dicts, lists, tuples, str, int, float, bool and None (plus the harmless torch
metadata types ``torch.Size``, ``torch.dtype`` and ``torch.device``), so every file we write loads with
``torch.load(weights_only=True)``: no pickled classes, no code runs on load. ``save_checkpoint`` checks this before
touching the disk and names the offending key.

Writes are atomic: the state goes to ``.<name>.tmp-<pid>`` in the target directory, is fsynced, then renamed onto
the target with ``os.replace``. A crash mid-write leaves the previous checkpoint untouched; at worst a stray temp
file remains, which ``CheckpointManager.save`` removes.

Layout written by :class:`CheckpointManager` (one job writes a directory; when to write, rotate and set aside
is :mod:`simmim.run_dir`'s policy; under accelerate, the main process writes)::

    <output_dir>/checkpoints/ckpt-00001000.pt        step checkpoints, the newest ``keep_last`` kept
    <output_dir>/checkpoints/accelerate-00001000/    FSDP/DeepSpeed optimizer shards, rotated with their file
    <output_dir>/checkpoints/best.pt                 named checkpoints, never rotated

Asynchronous saving (``run.async_save``): :class:`HostSnapshot` copies the state's tensors to host memory (the only
part the training thread waits for) and :class:`BackgroundWriter` writes that copy on a thread through the same
atomic write; at most one write is in flight. :class:`simmim.run_dir.CheckpointPolicy` drives both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from simmim.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"  # sub-directory of a run's output dir that holds its checkpoints

# Exact types only: subclasses (numpy scalars are float subclasses, IntEnum is an int subclass, NamedTuples are
# tuples) pickle as their own class and would make weights_only loading fail.
_SCALAR_TYPES = (str, int, float, bool, type(None), torch.dtype, torch.device)
_MAPPING_TYPES = (dict, OrderedDict)
_SEQUENCE_TYPES = (list, tuple, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` (e.g. ``state['config']['x']``) if ``obj`` is not plain data."""
    kind = type(obj)
    if kind in _SCALAR_TYPES or isinstance(obj, torch.Tensor):
        return
    if kind in _MAPPING_TYPES:
        for key, value in obj.items():
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; checkpoint keys must be str, int, "
                    "float, bool or None"
                )
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCE_TYPES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoints hold plain data only (tensors, dicts, "
        "lists, tuples, str, int, float, bool, None): convert it, e.g. with dataclasses.asdict() or .state_dict()"
    )


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable. Not every platform can open a directory (Windows): skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    """The temp file a write to ``path`` goes through: hidden, same directory (so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a hidden temp file beside it (binary), which is fsynced and
    renamed onto ``path``. Whatever goes wrong, ``path`` holds either its old content or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically and return the path.

    Raises ``TypeError`` (before writing anything) if ``state`` holds anything but plain data.
    """
    if type(state) not in _MAPPING_TYPES:
        raise TypeError(f"state is a {type(state).__name__}; a checkpoint is a dict")
    _check_plain(state, "state")
    return write_atomic(path, lambda f: torch.save(state, f))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class CheckpointManager:
    """Step checkpoints ``<prefix>-<step:08d>.pt`` in ``directory``, rotated to the newest ``keep_last``, plus
    named ones (``best.pt``, ``last.pt``) that are never rotated. Files not matching these names are left alone.

    Rotation is a separate call (:meth:`rotate`) so the engine can delay it until a checkpoint has proven good
    (the step after it trained on finite numbers): a diverging run never rotates away its last good checkpoint.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, prefix: str = "ckpt") -> None:
        if keep_last < 1:
            raise UserError(f"keep_last must be >= 1, got {keep_last} (run.keep_last)")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")

    def path_for(self, step: int) -> Path:
        """The file a checkpoint of ``step`` is written to."""
        return self.directory / f"{self.prefix}-{step:08d}.pt"

    def state_dir_for(self, step: int) -> Path:
        """accelerate's state folder (optimizer shards under FSDP/DeepSpeed) that goes with step ``step``."""
        return self.directory / f"accelerate-{step:08d}"

    def save(self, state: dict, step: int, rotate: bool = True) -> Path:
        """Write the checkpoint of ``step`` atomically; with ``rotate`` (default) then :meth:`rotate`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._remove_stale_tmp()
        path = save_checkpoint(state, self.path_for(step))
        if rotate:
            self.rotate(keep=[path])
        return path

    def rotate(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Delete step checkpoints beyond the newest ``keep_last`` (never one listed in ``keep``), each with its
        accelerate state folder. Returns the files and folders removed."""
        keep = {Path(p) for p in keep}
        removed = []
        for old_step, old in self.list()[: -self.keep_last]:
            if old not in keep:
                logger.debug("removing old checkpoint %s (step %d)", old, old_step)
                old.unlink(missing_ok=True)
                shutil.rmtree(self.state_dir_for(old_step), ignore_errors=True)
                removed += [old, self.state_dir_for(old_step)]
        return removed

    def save_named(self, state: dict, name: str) -> Path:
        """Write ``<name>.pt`` (e.g. ``best``, ``last``) atomically; named checkpoints are not rotated."""
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name such as 'best' or 'last'")
        return save_checkpoint(state, self.directory / f"{name}.pt")

    def list(self) -> list[tuple[int, Path]]:
        """Step checkpoints as ``(step, path)``, oldest first. Nothing is loaded."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._pattern.fullmatch(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_valid(self, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
        """The newest step checkpoint that ``load`` accepts, with what it returned; ``None`` if there is none.
        Files are read by ``load`` (e.g. :func:`simmim.weights.read_run_checkpoint`), not here.

        A newest file that is truncated, corrupt or foreign (``load`` raises ``ValueError``) is skipped with a
        warning and the one before it is used.
        """
        for step, path in reversed(self.list()):
            try:
                return path, load(path)
            except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: deleted since listing
                logger.warning("skipping checkpoint of step %d: %s", step, e)
        return None

    def _remove_stale_tmp(self) -> None:
        """Delete ``.*.tmp-<pid>`` files left by writes whose process is gone (a live writer's file is kept)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.glob(".*.tmp-*"):
            pid = p.name.rpartition("-")[2]
            if p.is_file() and not (pid.isdigit() and pid_alive(int(pid))):
                logger.info("removing temp file %s left by an interrupted checkpoint write", p)
                p.unlink(missing_ok=True)


class HostSnapshot:
    """A copy of a checkpoint's state in host memory that a background write can take its time over while
    training goes on changing the original (weights, optimizer moments, metadata dicts).

    Containers are rebuilt (same types), tensors copied into host buffers kept from one save to the next (same
    key path, shape, dtype and strides: no allocation or page faults after the first save; pinned memory for
    device tensors, copied without blocking, then one wait for the copies). A tensor met twice (tied weights) is
    copied once and shared, as a direct ``torch.save`` would store it once. Costs one host copy of the state.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, state: dict) -> dict:
        """The copy of ``state`` (plain data, checked first: ``TypeError`` naming the key otherwise)."""
        _check_plain(state, "state")
        memo: dict[int, torch.Tensor] = {}
        devices: set[torch.device] = set()

        def copy(obj: Any, key: tuple) -> Any:
            if isinstance(obj, torch.Tensor):
                if id(obj) not in memo:
                    memo[id(obj)] = self._copy(obj.detach(), key, devices)
                return memo[id(obj)]
            if type(obj) in _MAPPING_TYPES:
                return type(obj)((k, copy(v, (*key, k))) for k, v in obj.items())
            if type(obj) in (list, tuple):
                return type(obj)(copy(v, (*key, i)) for i, v in enumerate(obj))
            return obj  # immutable: str, int, float, bool, None, torch.Size/dtype/device

        out = copy(state, ())
        for device in devices:  # the non-blocking device-to-host copies must land before the writer reads them
            torch.get_device_module(device).synchronize(device)
        return out

    def _copy(self, t: torch.Tensor, key: tuple, devices: set[torch.device]) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
            pin = t.device.type != "cpu" and torch.cuda.is_available()
            buf = torch.empty_like(t, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        non_blocking = t.device.type != "cpu"
        buf.copy_(t, non_blocking=non_blocking)
        if non_blocking:
            devices.add(t.device)
        return buf


class BackgroundWriter:
    """Runs one write at a time on a daemon thread (a process killed mid-write leaves a temp file at worst, as a
    direct write would). :meth:`wait` returns what the write raised, so the caller reports it where it wants."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], Any]) -> None:
        """Start ``write()`` in the background; the previous write must have been waited for."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still in flight; wait() for it first")
        self._error = None

        def run() -> None:
            try:
                write()
            except BaseException as err:  # handed to wait(): a full disk or a bug alike, decided by the caller
                self._error = err

        self._thread = threading.Thread(target=run, name="simmim-checkpoint-writer", daemon=True)
        self._thread.start()

    def in_flight(self) -> bool:
        """Whether a write was submitted and not yet waited for (it may have finished already)."""
        return self._thread is not None

    def done(self) -> bool:
        """Whether the submitted write has finished (so :meth:`wait` returns at once)."""
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> BaseException | None:
        """Block until the write in flight has finished; what it raised, or None (also when none was in flight)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, error, self._error = None, self._error, None
        return error
