"""CPU threads on a shared machine (issue 17.3): the thread count a run picks, that ``run.threads`` is applied for
the run and undone after it, and that the command line asks OpenMP to wait passively before torch loads."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_ENV
from test_pretrain import TINY

from simmim import pretrain, threads
from simmim.cli import main
from simmim.threads import auto_threads, run_threads


@pytest.mark.parametrize("usable, workers, processes, ceiling, expected", [
    (2, 0, 1, None, 2),    # a quiet 2-CPU machine, no workers: both CPUs
    (2, 1, 1, None, 1),    # one worker takes a CPU
    (2, 8, 1, None, 1),    # never below 1
    (64, 8, 1, None, 56),  # a big machine: the workers' CPUs are left to them
    (16, 2, 2, None, 6),   # two training processes share the CPUs, then each leaves its workers theirs
    (64, 8, 8, None, 1),
    (64, 0, 1, 4, 4),      # OMP_NUM_THREADS=4 (PyTorch's count) is a ceiling
    (2, 0, 1, 8, 2),       # ... but never a reason to go above the usable CPUs
])
def test_auto_threads_is_the_usable_cpus_shared_by_processes_minus_workers(usable, workers, processes, ceiling,
                                                                           expected):
    assert auto_threads(usable, workers, processes, ceiling) == expected


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs and CPU affinity")
def test_usable_cpus_follow_the_affinity_mask():
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            "from simmim.threads import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CPU_ENV, check=True)
    assert out.stdout.strip() == "1"


def test_run_threads_sets_the_count_for_the_block_and_restores_it(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch.set_num_threads(2)
    try:
        with run_threads(0, workers=1) as n:  # auto: 2 CPUs, one of them for the data worker
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with run_threads(0, workers=0) as n:
            assert n == torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this machine: one CPU each
        with run_threads(0, workers=0) as n:
            assert n == 1
    finally:
        torch.set_num_threads(1)  # conftest's setting
    with run_threads(0, workers=0) as n:  # auto never raises the count the program set (conftest: 1)
        assert n == 1
    with run_threads(2, workers=8) as n:  # an explicit count is used as given
        assert n == torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


def test_run_threads_is_applied_during_a_run_logged_and_undone_after_it(tmp_path, monkeypatch):
    seen = []
    build = pretrain.build_encoder

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return build(*args, **kwargs)

    monkeypatch.setattr(pretrain, "build_encoder", spy)
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "schedule.max_steps=1", "run.threads=2",
                 "--output", str(out)]) == 0
    assert seen == [2]
    assert torch.get_num_threads() == 1  # the test process's own count is back
    assert "CPU threads: 2 (run.threads)" in (out / "train.log").read_text()
    assert "threads: 2" in (out / "config.yaml").read_text()


def test_the_command_line_asks_for_passive_waiting_before_torch_loads():
    # records OMP_WAIT_POLICY at the moment torch is first imported (libgomp reads it then, and only then)
    code = textwrap.dedent("""
        import os, sys
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    print("at torch import:", os.environ.get("OMP_WAIT_POLICY"))
                    sys.meta_path.remove(self)
        sys.meta_path.insert(0, Spy())
        from simmim.cli import main
        main(["models", "swinv2_pico"])
    """)
    env = {k: v for k, v in CPU_ENV.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "at torch import: PASSIVE" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})  # the user's own choice stays
    assert "at torch import: ACTIVE" in out.stdout


def test_more_threads_than_usable_cpus_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    out = tmp_path / "run"  # run.threads=100000 made libgomp abort ("Out of memory allocating") before
    assert main(["pretrain", "demo/pretrain", *TINY, "run.threads=100000", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: run.threads=100000 is more than the 2 CPUs this process may use; set at most "
                   "run.threads=2, or 0 for auto"]
    assert not out.exists()
