"""CPU threads for a run: how many intra-op threads PyTorch uses, and how idle OpenMP threads wait.

PyTorch's CPU kernels run in an OpenMP team of ``torch.get_num_threads()`` threads, by default one per CPU in the
process's affinity mask. Every parallel op ends at a barrier where the team waits for its slowest thread, and
libgomp's threads spin there for a while before they sleep. On a shared machine that goes wrong three ways:

* another process holds a core: the thread that lost its core is descheduled while its team-mates spin at the
  barrier for its work, so each of the thousands of small ops a step runs waits for a scheduler time slice;
* the affinity mask is wider than what the process may use: a container's CPU quota (cgroup ``cpu.max``, or
  ``cpu.cfs_quota_us`` in cgroup v1) is not seen by OpenMP, so a 2-CPU container on a 64-core host gets 64 threads;
* data-loader workers (one thread each) compete with the compute threads for the same cores.

So a run (``run.threads``, 0 = auto) uses the CPUs it may actually use (affinity and quota, via joblib's
``cpu_count``) shared by the processes on this machine, minus one per data worker, at least 1, and never more than
PyTorch already has (``OMP_NUM_THREADS`` or a program's ``torch.set_num_threads`` are a ceiling auto respects);
and the command line asks OpenMP to sleep rather than spin while waiting (``OMP_WAIT_POLICY=PASSIVE``, unless the
user set it), which libgomp reads once, when torch is first imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, MutableMapping

from simmim.errors import UserError

log = logging.getLogger(__name__)


def set_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask OpenMP threads to sleep instead of spinning at barriers, unless ``OMP_WAIT_POLICY`` is set already.

    Must run before torch is first imported (libgomp reads the variable when it loads): :func:`simmim.cli.main`
    calls it first thing. Returns whether it set the variable."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup CPU quota (joblib/loky read both)."""
    from joblib import cpu_count

    return max(1, cpu_count())


def local_processes() -> int:
    """Training processes on this machine (torchrun and ``accelerate launch`` set ``LOCAL_WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def auto_threads(usable: int, workers: int, processes: int = 1, ceiling: int | None = None) -> int:
    """Intra-op threads for one training process: its share of the ``usable`` CPUs (``processes`` share them),
    minus one per data worker (each worker runs one thread), at least 1, at most ``ceiling`` (PyTorch's current
    count, which ``OMP_NUM_THREADS`` or the program may have set)."""
    n = max(1, usable // max(1, processes) - workers)
    return min(n, ceiling) if ceiling else n


@contextlib.contextmanager
def run_threads(threads: int, workers: int) -> Iterator[int]:
    """Set PyTorch's intra-op threads for a run: ``threads`` as asked, or 0 = :func:`auto_threads` on this
    machine. The previous count is restored when the block ends, so a run in a longer program (a test, a
    notebook, the demo's several runs) leaves the program's own setting alone. Yields the count used."""
    import torch

    before = torch.get_num_threads()
    if threads:
        if threads > (usable := usable_cpus()):  # 100000 made libgomp abort for want of memory
            raise UserError(f"run.threads={threads} is more than the {usable} CPUs this process may use; set at "
                            f"most run.threads={usable}, or 0 for auto")
        n, why = threads, "run.threads"
    else:
        usable, processes = usable_cpus(), local_processes()
        n = auto_threads(usable, workers, processes, ceiling=before)
        share = auto_threads(usable, workers, processes)
        why = (f"auto: {usable} usable CPUs" + (f" / {processes} processes" if processes > 1 else "")
               + f" - {workers} data workers" + (f", capped by PyTorch's {before}" if n < share else ""))
    torch.set_num_threads(n)
    log.info("CPU threads: %d (%s); OpenMP wait policy %s", n, why, os.environ.get("OMP_WAIT_POLICY", "default"),
             extra={"file_only": True})  # train.log: logged before the run's checks, which may still refuse it
    try:
        yield n
    finally:
        torch.set_num_threads(before)
