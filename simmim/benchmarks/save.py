"""The ``save`` section of ``simmim benchmark``: how long a checkpoint save blocks the training thread, direct
(``run.async_save=false``) against asynchronous (``run.async_save=true``), for a model with its AdamW state.

The model (SimMIM around the SwinV2 variant) gets one AdamW step on synthetic gradients, so that both moments
exist as in training; then each round saves the checkpoint a run writes (weights, optimizer state, counters,
metadata) once each way, through :class:`simmim.run_dir.CheckpointPolicy` exactly as the engine does, into the
same file (replaced atomically: one copy on disk at a time). *Blocked* is the time from the start of the save
(building the state, moving it to the host) until training may go on; *write* is until the file is renamed into
place (fsynced). The first asynchronous save also allocates its host buffers; it is reported on its own and left
out of the medians. Contenders alternate in rounds so that a shared machine slows both alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simmim.benchmarks.report import Section
from simmim.errors import UserError


def _available_host_bytes() -> int | None:
    """MemAvailable of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_trained(name: str, img_size: int, window_size: int, device: torch.device
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """SimMIM on ``name`` with the project's AdamW after one step on synthetic gradients (both moments exist)."""
    from simmim.masked_modeling import SimMIM
    from simmim.models import VARIANTS, create_model
    from simmim.optim import build_optimizer, param_groups

    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model = SimMIM(create_model(name, img_size=img_size, window_size=window_size, num_classes=0)).to(device)
    optimizer = build_optimizer(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, host: bool) -> dict:
    """The state :meth:`simmim.engine.Engine.save` writes (``host``: weights moved to the CPU here, as a direct
    save does; an asynchronous save leaves that copy to its snapshot)."""
    weights = model.state_dict()
    return {"model": {k: v.detach().cpu() if host else v.detach() for k, v in weights.items()},
            "optimizer": optimizer.state_dict(), "scheduler": {}, "scaler": None, "step": 1,
            "train_state": {"step": 1}, "extra": {}, "meta": {"model": "benchmark"}}


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors a checkpoint holds (weights and buffers, AdamW moments)."""
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_section(name: str, img_size: int, window_size: int, rounds: int = 3, device: str | None = None,
                 directory: str | None = None) -> Section:
    """Blocked and write seconds per save, direct and asynchronous, over ``rounds`` alternating rounds (files in a
    temporary folder under ``directory``, default the system's)."""
    from simmim.checkpoint import CheckpointManager
    from simmim.models import VARIANTS
    from simmim.run_dir import CheckpointPolicy, RunDir

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name in VARIANTS:  # refuse before building what does not fit: weights + 2 moments, twice for the snapshot
        from simmim.models import create_model

        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name, img_size=img_size, window_size=window_size,
                                                         num_classes=0).parameters())
        # fp32 weights + 2 moments, and the asynchronous save's host copy of them (on a GPU: the copy only)
        need = params * 4 * 3 * (2 if dev.type == "cpu" else 1) * 1.15  # + the process, allocator slack
        available = _available_host_bytes()
        if available is not None and need > available:
            raise UserError(f"--what save with {name} needs about {need / 2**30:.1f} GiB of host memory (the "
                            f"weights and AdamW moments and the asynchronous save's copy of them), "
                            f"{available / 2**30:.1f} GiB are available; choose a smaller --model")
    model, optimizer = build_trained(name, img_size, window_size, dev)
    size = state_bytes(model, optimizer)
    results: dict[str, list[float]] = {"sync_blocked": [], "sync_write": [], "async_blocked": [], "async_write": []}
    first_async: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="simmim-save-bench-", dir=directory) as tmp:
        policies = {mode: CheckpointPolicy(CheckpointManager(Path(tmp) / mode, keep_last=1),
                                           RunDir(Path(tmp) / mode), async_save=mode == "async")
                    for mode in ("sync", "async")}
        for r in range(rounds + 1):  # round 0 warms up (the async side allocates its buffers): reported apart
            for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                policy = policies[mode]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                policy.write(checkpoint_state(model, optimizer, host=mode == "sync"), 1)
                blocked = time.perf_counter() - t0
                policy.wait()
                write = time.perf_counter() - t0
                if r == 0 and mode == "async":
                    first_async = {"blocked": blocked, "write": write}
                elif r > 0:
                    results[f"{mode}_blocked"].append(blocked)
                    results[f"{mode}_write"].append(write)
        file_bytes = os.path.getsize(policies["sync"].path_for(1))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = statistics.median(a / s for a, s in zip(results["async_blocked"], results["sync_blocked"], strict=True))
    gib = size / 2**30
    table = "\n".join([
        f"{name}: {size / 1e6:.0f} MB of tensors (weights + AdamW moments), file {file_bytes / 1e6:.0f} MB; {dev}",
        f"{'save':<8}{'blocked s':>12}{'write s':>12}{'blocked GB/s':>14}",
        *(f"{mode:<8}{med[f'{mode}_blocked']:>12.3f}{med[f'{mode}_write']:>12.3f}"
          f"{gib / med[f'{mode}_blocked']:>14.2f}" for mode in ("sync", "async")),
        f"blocked async/sync {ratio:.3f} (median of per-round ratios); first async save (allocating its host "
        f"buffers) blocked {first_async['blocked']:.3f} s, wrote in {first_async['write']:.3f} s",
    ])
    data = dict(model=name, device=str(dev), state_bytes=size, file_bytes=file_bytes, rounds=rounds,
                medians=med, blocked_ratio_async_over_sync=ratio, first_async=first_async, per_round=results)
    return Section("save", table, data)
