"""Side outputs never stop training: TensorBoard events, reconstruction pictures and ``train.log`` are for people,
so a write that fails (a full disk, a read-only folder, lost permissions) is warned about once, naming the path
and the error, and the run goes on without that output. Checkpoints are not side outputs: a checkpoint that
cannot be written stops the run (:class:`simmim.engine.CheckpointWriteError`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SideOutputs:
    """Runs the writes of named side outputs (``tensorboard``, ``images``); the first ``OSError`` of one is
    warned about and switches that output off for the rest of the run (a half-written event file is not worth
    appending to, and one warning is enough)."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}  # output -> the warning given

    def write(self, output: str, path: str | Path | None, write: Callable[[], Any],
              on_failure: Callable[[], Any] | None = None) -> None:
        """Call ``write`` unless ``output`` failed before; on ``OSError`` warn once, then call ``on_failure``
        (e.g. close the TensorBoard writer)."""
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
