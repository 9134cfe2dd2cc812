"""Side outputs never stop training: TensorBoard events, reconstruction pictures and ``train.log`` are for people,
so a write that fails (a full disk, a read-only folder, lost permissions) is warned about once, naming the path
and the error, and the run goes on without that output. Checkpoints are not side outputs: a checkpoint that
cannot be written stops the run (:class:`simmim.engine.CheckpointWriteError`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SideOutputs:
    """A run's TensorBoard scalars and images and its reconstruction PNGs. The first ``OSError`` of one output
    (``tensorboard``, ``images``) is warned about and switches that output off for the rest of the run (a
    half-written event file is not worth appending to, and one warning is enough); a failed TensorBoard writer is
    closed and removed from the accelerator, so ``end_training`` does not fail on it either."""

    def __init__(self, accelerator: Any, image_dir: Path | None = None,
                 record: Callable[[Path], None] = lambda path: None) -> None:
        self.acc, self.image_dir, self.record = accelerator, image_dir, record  # record: list a file we write
        self.failed: dict[str, str] = {}  # output -> the warning given

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._tensorboard(lambda: self.acc.log(values, step=step))

    def images(self, grids: dict[str, Any], step: int) -> None:
        """Each (3, H, W) grid in [0, 1] to TensorBoard and, with an ``image_dir``, as ``<name>_<step>.png``."""
        from simmim.visualize import save_png

        for name, grid in grids.items():
            if (tracker := self._tracker()) is not None:
                self._tensorboard(functools.partial(tracker.tracker.add_image, name, grid, step))
            if self.image_dir is not None:
                path = self.image_dir / f"{name.replace('/', '_')}_{step:08d}.png"
                self.record(path)
                self.write("images", self.image_dir, functools.partial(save_png, grid, path))

    def write(self, output: str, path: str | Path | None, write: Callable[[], Any],
              on_failure: Callable[[], Any] | None = None) -> None:
        """Call ``write`` unless ``output`` failed before; on ``OSError`` warn once, then call ``on_failure``."""
        if output in self.failed:
            return
        try:
            write()
        except OSError as err:
            self.failed[output] = (f"could not write {output} to {path}: {err.strerror or err}; training goes on "
                                   f"without {output} output")
            log.warning(self.failed[output])
            if on_failure is not None:
                with contextlib.suppress(OSError):
                    on_failure()

    def _tracker(self) -> Any:
        """accelerate's TensorBoard tracker, or None (not the main process, or switched off after a failure)."""
        return next((t for t in self.acc.trackers if t.name == "tensorboard"), None)

    def _tensorboard(self, write: Callable[[], Any]) -> None:
        tracker = self._tracker()

        def drop() -> None:
            self.acc.trackers.remove(tracker)
            tracker.finish()

        if tracker is not None:
            self.write("tensorboard", getattr(tracker, "logging_dir", "tensorboard/"), write, drop)
        else:  # other trackers, or none (non-main processes)
            write()


class LogFileHandler(logging.FileHandler):
    """The ``train.log`` handler. When a write fails with ``OSError`` (full disk...) it warns once on the console
    and leaves the file alone for the rest of the run, instead of logging's traceback per record."""

    def __init__(self, filename: str | Path, mode: str = "a", encoding: str | None = None) -> None:
        self.failed: OSError | None = None
        super().__init__(filename, mode=mode, encoding=encoding)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        if not isinstance(err, OSError) or self.failed is not None:
            super().handleError(record)
            return
        self.failed = err
        self._close_quietly()
        # this handler is off now, so the warning reaches the console (and any other handler) only
        log.warning("could not write the log file %s: %s; training goes on, logging to the console only",
                    self.baseFilename, err.strerror or err)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # flushing what a full disk refused fails again
            super().close()

    def _close_quietly(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
