"""Where a run's hours go: images/s, achieved FLOP/s and model FLOPs utilisation (MFU), the share of the time spent
waiting for data, peak memory and the ETA, for the progress bar, ``train.log`` and TensorBoard (``perf/*``).

* FLOPs per image are counted once, at the start, with ``torch.utils.flop_counter.FlopCounterMode`` over a no-grad
  forward of the first micro-batch through the model being trained (the task's own loss, so the SimMIM decoder or
  the classifier head counts too), times 3 for the step: backward costs two forward's worth of products (input and
  weight gradients). This is the *model* FLOPs of MFU: recomputation (``model.recompute``) is work the model does not
  need and is not counted, so recomputing shows as a lower MFU. The oneDNN Linear op registers its formula with the
  counter (:mod:`simmim.models.onednn_linear`).
* MFU = achieved FLOP/s / (peak FLOP/s per device x processes). The peak is ``run.peak_flops`` when set; on CUDA a
  small table of dense peaks of known GPUs (bf16/fp16 under mixed precision, TF32 when float32 matmuls may use it,
  else float32) stands in; otherwise (CPUs: no reliable peak) only the achieved TFLOP/s is logged.
* Data wait = time blocked in the data loader's ``next()`` / wall time of the logging window.
* Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; elsewhere the process's peak resident set
  (``ru_maxrss``), which also holds the Python runtime and the data pipeline's buffers; the label says which.
* ETA = remaining steps x the median of the last :data:`ETA_WINDOW` step times.
"""

from __future__ import annotations

import collections
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")
ETA_WINDOW = 50  # step times in the moving median of the ETA
# dense peak FLOP/s per GPU (vendor datasheets, no sparsity): name fragment -> (bf16/fp16, tf32, fp32); the first
# fragment found in torch.cuda.get_device_name() wins, so the more specific names come first
GPU_PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200", (989e12, 494e12, 67e12)),
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100", (989e12, 494e12, 67e12)),  # SXM
    ("A100", (312e12, 156e12, 19.5e12)),
)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the tensor ops ``fn`` runs (matrix products and convolutions, as FlopCounterMode counts them), with
    compiled functions run eagerly meanwhile (a compiled graph would be recompiled under the counter)."""
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else None
    with FlopCounterMode(display=False) as counter:
        if stance is None:
            fn()
        else:
            with stance:
                fn()
    return counter.get_total_flops()


def peak_flops(device: torch.device, mixed_precision: str, user: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``user`` when given, else the :data:`GPU_PEAK_FLOPS` entry of a known CUDA GPU
    for the precision the products run in, else None (unknown: MFU is not logged)."""
    if user is not None:
        return user
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, tf32, fp32) in GPU_PEAK_FLOPS:
        if fragment in name:
            if mixed_precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, label) of the peak memory so far: the CUDA allocator's peak on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "RSS"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day); ``?`` for an unknown duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    text = f"{h}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} days, {text}" if days else text


class PerfMeter:
    """Host-side timing of the training loop: time blocked on data, step times, and the window's figures.

    ``flops_per_image`` is the model FLOPs of one training step per image (None until counted); ``peak`` the
    FLOP/s of all devices together (None: unknown)."""

    def __init__(self, device: torch.device, peak: float | None = None) -> None:
        self.device, self.peak = device, peak
        self.flops_per_image: float | None = None
        self.data_wait = 0.0  # seconds blocked in next() in this window
        self.step_times: collections.deque[float] = collections.deque(maxlen=ETA_WINDOW)
        self.last_step_end = time.perf_counter()

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, adding the time each ``next()`` blocks to :attr:`data_wait`."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - t0
            yield item

    def step_done(self) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last_step_end)
        self.last_step_end = now

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of work outside the loop (the FLOP count) out of the step time."""
        self.last_step_end += seconds

    def window(self, images: int, elapsed: float, steps_left: int) -> dict[str, float]:
        """The logging window's ``perf/*`` scalars (``perf/mfu`` only with a known peak, ``perf/tflops`` only once
        FLOPs are counted) and ``eta_sec``; starts a new data-wait window."""
        elapsed = max(elapsed, 1e-9)
        out = {"perf/images_per_s": images / elapsed, "perf/data_wait": min(1.0, self.data_wait / elapsed)}
        if self.flops_per_image is not None:
            achieved = self.flops_per_image * images / elapsed
            out["perf/tflops"] = achieved / 1e12
            if self.peak:
                out["perf/mfu"] = achieved / self.peak
        out["perf/peak_mem_gb"] = peak_memory(self.device)[0] / 1e9
        median = statistics.median(self.step_times) if self.step_times else float("nan")
        out["eta_sec"] = steps_left * median
        self.data_wait = 0.0
        return out

    def summary(self, values: dict[str, float]) -> tuple[str, dict[str, str]]:
        """A log-line fragment and a compact tqdm postfix for :meth:`window`'s values."""
        label = peak_memory(self.device)[1]
        rate = f", {values['perf/tflops']:.3g} TFLOP/s" if "perf/tflops" in values else ""
        rate += f", MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else ""
        eta = format_duration(values["eta_sec"])
        text = (f"{values['perf/images_per_s']:.1f} img/s{rate}, data wait "
                f"{values['perf/data_wait']:.0%}, peak mem {values['perf/peak_mem_gb']:.2f} GB ({label}), ETA {eta}")
        postfix = {"img/s": f"{values['perf/images_per_s']:.1f}"}
        if "perf/mfu" in values:
            postfix["mfu"] = f"{values['perf/mfu']:.0%}"
        elif "perf/tflops" in values:
            postfix["TF/s"] = f"{values['perf/tflops']:.2g}"
        postfix.update(data=f"{values['perf/data_wait']:.0%}", mem=f"{values['perf/peak_mem_gb']:.1f}G", eta=eta)
        return text, postfix
