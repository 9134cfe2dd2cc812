"""The ``highres`` section of ``simmim benchmark``: ONE SimMIM training step (forward, masked L1, backward; batch 1)
at a high resolution, per memory mode of ours (``none``, ``attention``, ``full``, ``full`` + sequential attention)
and for SimMIM on timm's SwinV2 without and with its gradient checkpointing.

Each contender runs in its own Python process under a memory cap, so a contender that does not fit reports
"did not fit in N GiB" instead of taking the machine down. On a CPU the cap is ``RLIMIT_AS`` (address space), set in
the child after torch is imported and the model is built, at what the process had mapped then plus ``cap_gib``
(importing torch alone maps ~3 GiB that are never resident); the figure reported is the process's peak resident
set (``ru_maxrss``), which includes the weights, their gradients and the torch runtime; ``before`` is the same
figure just before the step (runtime, weights, the batch). On CUDA the cap is
``torch.cuda.set_per_process_memory_fraction`` and the figure is ``torch.cuda.max_memory_allocated``.

One step each, no warm-up (at 1536 px a step takes minutes on a few CPU cores): the seconds include the first-call
costs (oneDNN primitive creation), which are small next to the step at this size.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from simmim.benchmarks.report import Section
from simmim.errors import UserError

CONTENDERS = ("none", "attention", "full", "full+sequential", "timm", "timm+checkpointing")
# full + sequential attention: the attention of a block runs over this many windows at a time (at 1536 px, window
# 24, batch 1, stage 1 has 256 windows: 16 chunks)
CHUNK_WINDOWS = 16
# what running out of memory under the cap says: torch's CPU and CUDA allocators, Python, C++, and oneDNN (which
# reports a failed allocation of its working memory as a primitive it could not create); the row keeps the message
_OOM = ("can't allocate memory", "CUDA out of memory", "MemoryError", "std::bad_alloc", "Cannot allocate memory",
        "could not create a primitive")


def _vm_size() -> int:
    """Bytes of address space this process has mapped now (``VmSize``; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _rss_peak() -> int:
    """This process's peak resident set in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_step(contender: str, model: str, img_size: int, window_size: int, cap_gib: float | None, device: str,
             threads: int | None) -> dict[str, Any]:
    """Build ``contender`` and time one training step on one image under a cap of ``cap_gib`` (None: no cap); runs
    in the child (the cap stays for the rest of the process)."""
    import torch

    from simmim.benchmarks.model import TimmSimMIM, make_batch, train_step_fn
    from simmim.masked_modeling import SimMIM
    from simmim.models import create_model

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = SimMIM(create_model(model, img_size=img_size, window_size=window_size, num_classes=0,
                               drop_path_rate=0.0))
    if contender.startswith("timm"):
        net: torch.nn.Module = TimmSimMIM(ours)
        del ours
        net.encoder.set_grad_checkpointing(contender == "timm+checkpointing")
    else:
        net = ours
        ours.encoder.set_recompute(contender.split("+")[0])
        ours.encoder.set_sequential_attention(CHUNK_WINDOWS if contender.endswith("+sequential") else None)
    net = net.to(dev).train()
    images, mask = make_batch(1, img_size, dev)
    step = train_step_fn(net, images, mask, None)
    if dev.type == "cuda":
        if cap_gib is not None:
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        torch.ones(64, 64) @ torch.ones(64, 64)  # the thread pool exists before the cap
        if cap_gib is not None:
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            cap = _vm_size() + int(cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        before = _rss_peak()
    t0 = time.perf_counter()
    try:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except (RuntimeError, MemoryError) as err:  # the allocator refused: the contender does not fit under the cap
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _OOM):
            raise
        return dict(contender=contender, fit=False, error=str(err).splitlines()[0][:200])
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _rss_peak()
    return dict(contender=contender, fit=True, seconds=seconds, peak_gib=peak / 2**30, before_gib=before / 2**30,
                peak_kind="cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)")


def highres_section(model: str = "swinv2_base", img_size: int = 1536, window_size: int = 24,
                    contenders: Sequence[str] = CONTENDERS, cap_gib: float = 12.0, timeout_s: float = 600.0,
                    device: str | None = None, threads: int | None = None) -> Section:
    """One training step per contender, each in its own process under a ``cap_gib`` memory cap; a contender
    that runs out of memory or past ``timeout_s`` is reported as such, the others still run."""
    import torch

    if unknown := [c for c in contenders if c not in CONTENDERS]:
        raise UserError(f"unknown highres contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for contender in contenders:
        args = dict(contender=contender, model=model, img_size=img_size, window_size=window_size, cap_gib=cap_gib,
                    device=dev, threads=threads)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "simmim.benchmarks.highres", json.dumps(args)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rows.append(dict(contender=contender, fit=None, error=f"stopped after {timeout_s:.0f} s"))
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        elif proc.returncode < 0 or any(s in proc.stderr for s in _OOM):  # killed (the kernel's OOM killer) or
            row = dict(contender=contender, fit=False,  # an allocation failure outside torch's allocator
                       error=(proc.stderr.strip().splitlines() or [f"signal {-proc.returncode}"])[-1][:200])
        else:
            raise RuntimeError(f"highres benchmark of {contender} failed (exit {proc.returncode}):\n{proc.stderr}")
        row["process_sec"] = time.perf_counter() - t0
        rows.append(row)
    lines = [f"{'contender':<20} {'peak GiB':>9} {'before GiB':>10} {'step s':>8}"]
    for r in rows:
        if r["fit"]:
            lines.append(f"{r['contender']:<20} {r['peak_gib']:>9.2f} {r['before_gib']:>10.2f} {r['seconds']:>8.1f}")
        else:
            why = f"did not fit in {cap_gib:g} GiB" if r["fit"] is False else r["error"]
            lines.append(f"{r['contender']:<20} {why:>18}")
    return Section("highres", "\n".join(lines), dict(model=model, img_size=img_size, window_size=window_size,
                                                       batch_size=1, cap_gib=cap_gib, device=dev,
                                                       chunk_windows=CHUNK_WINDOWS, rows=rows))


if __name__ == "__main__":  # the child process of highres_section
    print(json.dumps(one_step(**json.loads(sys.argv[1]))))
