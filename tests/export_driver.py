"""Runs ``simmim export`` with a slow writer, for tests/test_export_faults.py (``python export_driver.py -- ARGS``).

Every format's writer runs as usual, then prints STAGED (its files are in the staging folder, not yet in place)
and sleeps, so the test can signal the process in the middle of an export.
"""

import sys
import time

import torch

torch.set_num_threads(1)

from simmim import export as export_module  # noqa: E402
from simmim.cli import main  # noqa: E402


def slow(writer):
    def write(*args, **kwargs):
        result = writer(*args, **kwargs)
        print("STAGED", flush=True)
        time.sleep(600)
        return result

    return write


if __name__ == "__main__":
    sep, *rest = sys.argv[1:]
    assert sep == "--"
    export_module.WRITERS = {fmt: slow(w) for fmt, w in export_module.WRITERS.items()}
    sys.exit(main(rest))
