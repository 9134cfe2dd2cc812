"""Runs ``simmim`` with a fault injected, for tests/test_faults.py (``python fault_driver.py FAULT -- ARGS``).

FAULT is one of
    hang_after_save:STEP        after checkpoint STEP is written, print CHECKPOINTED and wait to be killed;
    hang_in_write:STEP          while checkpoint STEP is being written (half of it on disk), print WRITING and wait;
    kill_rank:RANK:STEP         the process of that rank SIGKILLs itself right after checkpoint STEP is written;
    signal:NAMES:RANK:STEP      right after optimizer step STEP, the process of rank RANK (or every rank: all) sends
                                itself the signals NAMES (comma-separated, e.g. TERM or INT,INT), prints SIGNALLED;
    pause_at:MICRO              in the forward of micro-batch MICRO (1-based), print PAUSED and wait until a stop
                                signal arrives (for a test that signals from outside, e.g. the whole process group
                                as Ctrl-C does);
    bug_in_step:STEP            the pretraining loss raises a ValueError (a stand-in for a bug) at micro-batch STEP;
    none                        no fault.
"""

import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # as in the test process: float sums depend on the thread count

from simmim import checkpoint as checkpoint_module  # noqa: E402
from simmim.checkpoint import CheckpointManager  # noqa: E402
from simmim.cli import main  # noqa: E402


def inject(fault: str) -> None:
    kind, *args = fault.split(":")
    if kind == "hang_after_save" or kind == "kill_rank":
        step_at = int(args[-1])
        rank = int(args[0]) if kind == "kill_rank" else None
        original = CheckpointManager.save

        def save(self, state, step, **kwargs):
            path = original(self, state, step, **kwargs)
            if step == step_at:
                print("CHECKPOINTED", flush=True)
                if kind == "hang_after_save":
                    time.sleep(600)
            return path

        CheckpointManager.save = save
        if rank is not None:
            from simmim.engine import Engine

            original_sync = Engine._sync

            def sync(self, *a, **kw):
                out = original_sync(self, *a, **kw)
                if self.state.step == step_at + 1 and self.acc.process_index == rank:
                    print(f"KILLING RANK {rank}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            Engine._sync = sync
    elif kind == "hang_in_write":
        step_at = int(args[0])
        original_save = torch.save

        def half_then_hang(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get("step") == step_at:
                f.write(b"PK\x03\x04 the first bytes of a zip archive")
                f.flush()
                print("WRITING", flush=True)
                time.sleep(600)
            return original_save(obj, f, *a, **kw)

        checkpoint_module.torch.save = half_then_hang  # simmim.checkpoint's torch is the torch module
    elif kind == "signal":
        from simmim.engine import Engine

        step_at = int(args[-1])
        original_step = Engine._optimizer_step

        def optimizer_step(self, loss):
            out = original_step(self, loss)
            if self.state.step + 1 == step_at and args[1] in ("all", str(self.acc.process_index)):
                for name in args[0].split(","):  # the loop counts the step right after this returns
                    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
                print("SIGNALLED", flush=True)
            return out

        Engine._optimizer_step = optimizer_step
    elif kind == "pause_at":
        from simmim.pretrain import PretrainTask

        try:
            from simmim.signals import requested
        except ImportError:  # code without signal handling: the signal's default action ends the wait
            requested = lambda: None  # noqa: E731
        micro_at, calls, original_loss = int(args[0]), [], PretrainTask.loss

        def loss(self, model, batch):
            if not torch.is_grad_enabled():  # the perf meter's one no-grad FLOP count is not a micro-batch
                return original_loss(self, model, batch)
            calls.append(1)
            if len(calls) == micro_at:
                print("PAUSED", flush=True)
                deadline = time.monotonic() + 120
                while requested() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            return original_loss(self, model, batch)

        PretrainTask.loss = loss
    elif kind == "bug_in_step":
        from simmim.pretrain import PretrainTask

        call_at, calls, original_loss = int(args[0]), [], PretrainTask.loss

        def loss(self, model, batch):
            if not torch.is_grad_enabled():  # the perf meter's one no-grad FLOP count is not a micro-batch
                return original_loss(self, model, batch)
            calls.append(1)
            if len(calls) == call_at:
                raise ValueError("injected bug: operands could not be broadcast together")
            return original_loss(self, model, batch)

        PretrainTask.loss = loss
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, sep, *rest = sys.argv[1:]
    assert sep == "--"
    if method := os.environ.get("SIMMIM_TEST_START_METHOD"):  # how DataLoader workers start (default: fork)
        import multiprocessing

        multiprocessing.set_start_method(method)
    inject(fault)
    sys.exit(main(rest))
