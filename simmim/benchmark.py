"""Throughput and memory of our SwinV2 against timm's on the same hardware, measured side by side.

Each implementation runs the same number of timed iterations, interleaved in rounds (ours, timm, ours, timm, ...)
so a noisy shared machine slows both alike; the report gives the median images/s per implementation and the ratio.
Peak memory is read from the CUDA allocator (not available on CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from simmim.models import VARIANTS, create_model


@dataclass
class Result:
    name: str
    images_per_sec: float  # median over rounds
    peak_mem_mib: float | None  # CUDA only


def _timm_model(name: str, img_size: int, window_size: int, num_classes: int) -> nn.Module:
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    v = {k: VARIANTS[name][k] for k in ("embed_dim", "depths", "num_heads")}
    if VARIANTS[name].get("extra_norm_period"):
        raise ValueError(f"timm has no extra-norm SwinV2; compare a variant without it (not {name})")
    return TimmSwinV2(img_size=img_size, window_size=window_size, num_classes=num_classes, drop_path_rate=0.0, **v)


def _step_fn(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        def infer() -> None:
            with torch.inference_mode():
                model(x)
        return infer

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    return train_step


def run_benchmark(name: str = "swinv2_tiny", img_size: int = 192, window_size: int = 12, batch_size: int = 8,
                  train: bool = True, rounds: int = 5, iters: int = 3, warmup: int = 2, device: str | None = None,
                  dtype: str = "float32", include_explicit: bool = True) -> list[Result]:
    """Median images/s (and CUDA peak memory) for ours (fused attention), ours (explicit attention) and timm."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    torch.manual_seed(0)
    ours = create_model(name, img_size=img_size, window_size=window_size, num_classes=1000, drop_path_rate=0.0,
                        fused_attn=True)
    ref = _timm_model(name, img_size, window_size, 1000)
    ref.load_state_dict(ours.state_dict())
    contenders: dict[str, nn.Module] = {"simmim (fused)": ours}
    if include_explicit:
        explicit = create_model(name, img_size=img_size, window_size=window_size, num_classes=1000,
                                drop_path_rate=0.0, fused_attn=False)
        explicit.load_state_dict(ours.state_dict())
        contenders["simmim (explicit)"] = explicit
    contenders["timm"] = ref
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    fns = {}
    for label, model in contenders.items():
        model.to(dev).train(train)
        fns[label] = _step_fn(model, x, train)

    def timed(fn: Callable[[], None]) -> float:
        ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else torch.autocast(dev.type, enabled=False)
        with ctx:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return iters * batch_size / (time.perf_counter() - t0)

    for fn in fns.values():  # warm-up (kernels, allocator, caches)
        for _ in range(warmup):
            timed(fn)
    speeds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            speeds[label].append(timed(fn))
    results = []
    for label, fn in fns.items():
        peak = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            timed(fn)
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        results.append(Result(label, statistics.median(speeds[label]), peak))
    return results


def format_results(results: list[Result], reference: str = "timm") -> str:
    base = next(r for r in results if r.name == reference)
    lines = [f"{'implementation':<20} {'images/s':>10} {'vs timm':>8} {'peak MiB':>10}"]
    for r in results:
        mem = f"{r.peak_mem_mib:.0f}" if r.peak_mem_mib is not None else "n/a"
        lines.append(f"{r.name:<20} {r.images_per_sec:>10.1f} {r.images_per_sec / base.images_per_sec:>7.2f}x "
                     f"{mem:>10}")
    return "\n".join(lines)
