"""Logging for a run directory: a log file on the main process, and console lines that do not break tqdm bars."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that writes through tqdm so progress bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # logging must never kill a run
            self.handleError(record)


def setup_logging(log_file: str | Path | None, main_process: bool = True, level: int = logging.INFO) -> None:
    """Send ``simmim`` logs to the console (warnings only on non-main processes) and, on the main process, to
    ``log_file``. Calling it again replaces the handlers it added before."""
    logger = logging.getLogger("simmim")
    for h in list(logger.handlers):
        if getattr(h, "_simmim", False):
            logger.removeHandler(h)
            h.close()
    logger.setLevel(level)
    console = _TqdmHandler()
    console.setLevel(level if main_process else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None and main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file_handler)
    for h in handlers:
        h._simmim = True  # type: ignore[attr-defined]
        logger.addHandler(h)
