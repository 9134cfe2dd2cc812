"""Stopping a run when told: SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C).

:func:`stop_on_signals` wraps a whole run (setup and training). While it is active the first SIGTERM or SIGINT
only records a request; the engine notices it at the next optimizer-step boundary (in a distributed run all
processes vote, so every rank stops at the same step), writes a checkpoint through the path a periodic save takes
and raises :class:`StoppedBySignal`, which the command line prints as one line and turns into exit code
128 + the signal number (143 for SIGTERM, 130 for SIGINT), as shells report a process the signal killed.

A second signal aborts at once: SIGINT raises ``KeyboardInterrupt``, SIGTERM takes its default action. The run's
lock is a kernel lock (``lockf``), so it dies with the process either way. Not so under an elastic launcher
(``torchrun``, ``accelerate launch``): it forwards the signal it gets to its workers, which have often received
the same signal already (a terminal's Ctrl-C reaches the whole process group, SLURM signals every process of a
job step), so a repeat is not a second request there; the launcher ends workers that outlive its own grace period
(30 s) with SIGKILL.

Handlers are installed in the main thread only (elsewhere the context does nothing) and the previous handlers are
restored on exit, so a program can run many jobs in one process. Forked DataLoader workers inherit the handler
and ignore the signal (the main process decides when to stop); workers started another way ignore it through
:func:`ignore_in_worker`, the loaders' ``worker_init_fn``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from simmim.errors import RunStopped

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(RunStopped):
    """The run stopped at step ``step`` because it was sent ``signum``; exit code 128 + ``signum``. The message
    names what the stop saved: ``checkpoints`` (a :class:`simmim.run_dir.CheckpointPolicy`) holds this step's
    checkpoint as pending when the engine saved it, as it saves a periodic one."""

    def __init__(self, signum: int, step: int, checkpoints: Any, before_first: bool = False) -> None:
        name, last_good, pending = signal_name(signum), checkpoints.last_good, checkpoints.pending
        if before_first:  # nothing trained yet, so nothing new to save
            where = (f"before training went on from step {step}; checkpoint {last_good} is unchanged" if last_good
                     else "before the first step; no checkpoint to write")
            message = f"stopped by {name} {where}; continue with --resume auto"
        else:
            kept = (f"checkpoint {pending[1]}" if pending is not None and pending[0] == step
                    # the health check refused to save non-finite numbers
                    else "no checkpoint written (the loss or weights are non-finite now); "
                    + (f"the last good checkpoint is {last_good}" if last_good else "no earlier checkpoint"))
            message = f"stopped by {name} at step {step}; {kept}; continue with --resume auto"
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def agreed(accelerator: Any, step: int, vote_every: int, force: bool = False) -> int | None:
    """The signal that asks this run to stop now, agreed by every process (so all stop at the same step), or None.
    A distributed run votes (a collective and a host sync) every ``vote_every`` steps, and when ``force``."""
    asked = requested()
    if accelerator.num_processes == 1:
        return asked
    if not force and step % vote_every:
        return None
    vote = torch.tensor(asked or 0, device=accelerator.device)
    return int(accelerator.reduce(vote, "max").item()) or None  # any process's signal stops all of them


class StopRequest:
    """The handler state of one :func:`stop_on_signals` block: which signal arrived first (or None)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        # torchrun sets TORCHELASTIC_RUN_ID in its workers: there a repeated signal is the launcher's forward
        self.repeat_aborts = "TORCHELASTIC_RUN_ID" not in os.environ
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides when to stop
            return
        if self.signum is not None:
            if not self.repeat_aborts:  # the launcher's forward of a signal already noted
                return
            self.restore()  # the second signal: the user does not want to wait
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint and stopping%s",
                    signal_name(signum), " (send it again to abort at once, losing the steps since the last "
                    "checkpoint)" if self.repeat_aborts else "")


_active: list[StopRequest] = []


def requested() -> int | None:
    """The signal number asking the innermost active run to stop, or None."""
    return _active[-1].signum if _active else None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGTERM/SIGINT as a stop request for the duration of the block (main thread only; elsewhere the
    request simply never fires), restoring the previous handlers afterwards."""
    request = StopRequest()
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        request.install()
    _active.append(request)
    try:
        yield request
    finally:
        _active.remove(request)
        if main_thread:
            request.restore()


F = TypeVar("F", bound=Callable[..., Any])


def stops_on_signals(run: F) -> F:
    """Decorate a job's ``run`` so that it runs inside :func:`stop_on_signals`."""
    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stop_on_signals():
            return run(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def ignore_in_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT, which its process group or job
    step may receive with the main process; the main process stops the run and then its workers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
