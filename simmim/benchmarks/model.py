"""The ``model`` and ``memory`` sections of ``simmim benchmark``: our SimMIM/SwinV2 against SimMIM built on timm's
SwinV2, measured side by side.

* ``model``: images/s of the SimMIM training step (forward, masked L1, backward; fp32 and/or bf16 autocast) and of
  inference (the encoder's pooled features under ``inference_mode``). timm's side is the same SimMIM (mask token
  after the patch-embedding norm, 1x1-conv + PixelShuffle decoder, masked L1) around ``timm``'s
  ``SwinTransformerV2`` holding the same weights; the benchmark checks that both give the same loss first.
* ``memory``: activation memory of a training step per image for each recompute mode (none / attention / full /
  sequential attention) and timm, as the slope of the step's peak memory over two batch sizes (weights, gradients
  and optimizer-free constants cancel), with the step's images/s beside it.

Timing interleaves the contenders in rounds (A, B, A, B, ...) so a noisy shared machine slows both alike, and reports
the median images/s and the median of the per-round ratios. Peak memory is the CUDA allocator's on GPUs and, on
CPUs, the running total of the allocations recorded by ``torch.profiler`` (``profile_memory=True``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from simmim.benchmarks.report import Section
from simmim.errors import UserError
from simmim.masked_modeling import SimMIM, masked_l1_loss
from simmim.models import VARIANTS, SwinTransformerV2, create_model, family_of, list_encoders
from simmim.models.encoders import make_encoder

RECOMPUTE_MODES = ("none", "attention", "full", "sequential")  # "sequential" = sequential attention, no recompute
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# SimMIM on timm's SwinV2 (the reference)


class TimmSimMIM(nn.Module):
    """SimMIM around timm's ``SwinTransformerV2`` (or, for an encoder with a ``timm_spec``: Swin V1 and ViT, timm's
    own model of that name: ``swin_*_patch4_window7_224``, ``beit_base_patch16_224``) with the weights of ``ours``:
    the same mask-token replacement after the patch embedding, the same decoder and loss.
    ``forward(images, mask) -> (loss, pred)``."""

    def __init__(self, ours: SimMIM) -> None:
        super().__init__()
        from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

        enc = ours.encoder
        self.mask_token = nn.Parameter(enc.mask_token.detach().clone())
        self.decoder = copy.deepcopy(ours.decoder)
        self.patch_size = ours.patch_size
        if hasattr(enc, "timm_spec"):  # plain timm, built by name as a timm user would
            import timm

            name, kwargs = enc.timm_spec()
            self.encoder = timm.create_model(name, **{**kwargs, "num_classes": 0, "drop_path_rate": 0.0})
            self.encoder.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "mask_token"})
            return
        if any(blk.extra_norm is not None for blk in enc.blocks()):
            raise UserError("timm's SwinV2 has no extra main-branch norms (SwinV2-H/G); compare a smaller variant")
        self.encoder = TimmSwinV2(img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans,
                                  num_classes=0, embed_dim=enc.embed_dim, depths=enc.depths, num_heads=enc.num_heads,
                                  window_size=enc.window_size, drop_path_rate=0.0,
                                  pretrained_window_sizes=[p[0] for p in enc.pretrained_window_sizes])
        weights = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
        self.encoder.load_state_dict(weights, strict=True)

    def _vit_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """timm's ``Beit`` run as the official ``VisionTransformerForSimMIM``: mask token blended into the patch
        tokens, CLS token, shared or per-block relative position bias, final norm; (B, h, w, C) patch tokens."""
        enc = self.encoder
        z = enc.patch_embed(images)  # (B, L, C)
        w = mask.flatten(1).unsqueeze(-1).to(z.dtype)
        z = z * (1 - w) + self.mask_token.to(z.dtype) * w
        z = torch.cat([enc.cls_token.expand(z.shape[0], -1, -1).to(z.dtype), z], dim=1)  # (B, 1 + L, C)
        if enc.pos_embed is not None:
            z = z + enc.pos_embed
        shared = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        for blk in enc.blocks:
            z = blk(z, shared_rel_pos_bias=shared)
        z = enc.norm(z)[:, 1:]
        return z.reshape(z.shape[0], *enc.patch_embed.grid_size, z.shape[-1])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.encoder, "cls_token"):  # a ViT (timm's Beit)
            z = self._vit_features(images, mask)
        else:  # a Swin (V1 or V2)
            z = self.encoder.patch_embed(images)  # (B, h, w, C)
            w = mask.unsqueeze(-1).to(z.dtype)
            z = z * (1 - w) + self.mask_token.to(z.dtype) * w
            z = self.encoder.norm(self.encoder.layers(z))  # (B, H/32, W/32, C)
        pred = self.decoder(z.permute(0, 3, 1, 2))
        pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        return masked_l1_loss(pred.float(), images.float(), pixel_mask.unsqueeze(1)), pred


def build_pair(name: str, img_size: int, window_size: int, device: torch.device, seed: int = 0
               ) -> tuple[SimMIM, TimmSimMIM]:
    """Ours and timm's SimMIM on the same (seeded) weights, drop path off (it would make the steps random)."""
    if name in list_encoders() and family_of(name).name != "swinv2":  # Swin V1, ViT: ours is timm's + the mask token
        torch.manual_seed(seed)
        ours = SimMIM(make_encoder(name, img_size=img_size, window_size=window_size, num_classes=0))
        return ours.to(device), TimmSimMIM(ours).to(device)
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(VARIANTS)}")
    if VARIANTS[name].get("extra_norm_period"):  # refuse before building a model of billions of parameters
        raise UserError(f"timm's SwinV2 has no extra main-branch norms (SwinV2-H/G); compare a smaller variant "
                         f"than {name}")
    torch.manual_seed(seed)
    ours = SimMIM(create_model(name, img_size=img_size, window_size=window_size, num_classes=0, drop_path_rate=0.0))
    return ours.to(device), TimmSimMIM(ours).to(device)


def make_batch(batch_size: int, img_size: int, device: torch.device, seed: int = 0, patch_size: int = 4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images (B, 3, H, W) and SimMIM masks (B, H/4, W/4): 32 px cells at ratio 0.6."""
    from simmim.data import MaskGenerator

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=g)
    masks = MaskGenerator(img_size, 32, patch_size, 0.6)
    mask = torch.stack([masks(seed + i) for i in range(batch_size)])
    return images.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------------------
# timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step_fn(model: nn.Module, images: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None
                  ) -> Callable[[], None]:
    """One SimMIM step without the optimizer update: zero grads, forward under autocast, backward."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(images.device, dtype):
            out = model(images, mask)
        out[0].backward()
    return step


def inference_fn(encoder: nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    """Pooled encoder features under ``inference_mode`` (timm's and ours alike: ``forward_features`` + mean)."""
    def infer() -> None:
        with torch.inference_mode(), _autocast(images.device, dtype):
            encoder.forward_features(images).mean((1, 2))
    return infer


def side_by_side(fns: dict[str, Callable[[], None]], images_per_call: int, device: torch.device, rounds: int,
                 iters: int, warmup: int) -> dict[str, list[float]]:
    """Images/s of each function per round, the functions interleaved within every round."""
    def timed(fn: Callable[[], None]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        return iters * images_per_call / (time.perf_counter() - t0)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    speeds: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate who goes first
        for name in order:
            speeds[name].append(timed(fns[name]))
    return speeds


def peak_memory(fn: Callable[[], None], device: torch.device) -> float:
    """Bytes allocated at the peak of ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return float(peak)


# ----------------------------------------------------------------------------------------------------------------
# sections


def _ratio_stats(speeds: dict[str, list[float]], ours: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(speeds[ours], speeds[ref], strict=True))


def model_section(name: str = "swinv2_tiny", img_size: int = 192, window_size: int = 12, batch_size: int = 8,
                  dtypes: Sequence[str] = ("float32",), modes: Sequence[str] = ("train", "inference"),
                  rounds: int = 5, iters: int = 2, warmup: int = 1, device: str | None = None,
                  compile: bool = False) -> Section:
    """SimMIM training step and encoder inference, ours (and with ``compile``, ours under torch.compile) vs SimMIM
    on timm's SwinV2, per autocast dtype. Ratios are medians of the per-round ratios to timm."""
    from simmim.models import compile_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ours, ref = build_pair(name, img_size, window_size, dev)
    images, mask = make_batch(batch_size, img_size, dev, patch_size=ours.encoder.patch_size)
    with torch.no_grad():  # same weights, same step: the losses agree before anything is timed
        a, b = ours(images, mask).loss, ref(images, mask)[0]
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"ours and timm's SimMIM disagree on the loss ({a.item()} vs {b.item()})")
    models: dict[str, nn.Module] = {"simmim": ours}
    if compile:
        models["simmim compiled"] = compile_model(copy.deepcopy(ours))
    models["timm"] = ref
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for mode in modes:
            for m in models.values():
                m.train(mode == "train")
            if mode == "train":
                fns = {k: train_step_fn(m, images, mask, dtype) for k, m in models.items()}
            else:
                fns = {k: inference_fn(m.encoder, images, dtype) for k, m in models.items()}
            t0 = time.perf_counter()
            for fn in fns.values():  # compiled graphs are built here, outside the timed rounds
                fn()
            first_call = time.perf_counter() - t0
            speeds = side_by_side(fns, batch_size, dev, rounds, iters, warmup)
            for k in models:
                rows.append(dict(mode=mode, dtype=dtype_name, model=k, images_per_sec=statistics.median(speeds[k]),
                                 vs_timm=_ratio_stats(speeds, k, "timm"), rounds=speeds[k]))
            if compile:
                rows[-2]["first_calls_sec"] = first_call  # all three first calls, compilation included
    lines = [f"{'step':<10} {'dtype':<9} {'model':<16} {'img/s':>8} {'vs timm':>8}"]
    for r in rows:
        lines.append(f"{r['mode']:<10} {r['dtype']:<9} {r['model']:<16} {r['images_per_sec']:>8.2f} "
                     f"{r['vs_timm']:>7.2f}x")
    return Section("model", "\n".join(lines), dict(model=name, img_size=img_size, window_size=window_size,
                                                     batch_size=batch_size, rounds=rounds, iters=iters, rows=rows))


def set_recompute_mode(model: SimMIM, mode: str) -> None:
    """A memory mode on the encoder: a recompute mode, or ``sequential``: sequential self-attention (one image's
    stage-1 windows per chunk) without recompute, which bounds the transient attention logits but still keeps
    every chunk's attention map for backward."""
    enc = model.encoder
    enc.set_sequential_attention(None)
    if mode == "sequential":
        enc.set_recompute("none")
        enc.set_sequential_attention(_sequential_chunk(enc))
    else:
        enc.set_recompute(mode)


def _sequential_chunk(enc: SwinTransformerV2) -> int:
    """Windows per chunk for the sequential-attention mode: one image's worth of stage-1 windows."""
    (h, w), (wh, ww) = enc.layers[0].blocks[0].resolution, enc.layers[0].blocks[0].window
    return max(1, (h // wh) * (w // ww))


def memory_section(name: str = "swinv2_tiny", img_size: int = 192, window_size: int = 12,
                   batch_sizes: Sequence[int] = (2, 4), modes: Sequence[str] = RECOMPUTE_MODES,
                   dtype: str = "float32", rounds: int = 3, iters: int = 1, device: str | None = None) -> Section:
    """Activation memory per image (slope of the step's peak over ``batch_sizes``) and images/s per mode."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ours, ref = build_pair(name, img_size, window_size, dev)
    ours.train(), ref.train()
    amp = DTYPES[dtype]
    small, large = batch_sizes
    if small == large:
        raise UserError(f"--memory-batch-sizes {small} {large}: the memory per image is the slope between two "
                         "different batch sizes, e.g. 4 8")
    batches = {b: make_batch(b, img_size, dev) for b in batch_sizes}
    peaks: dict[str, dict[int, float]] = {}
    for mode in (*modes, "timm"):
        if mode != "timm":
            set_recompute_mode(ours, mode)
        model = ref if mode == "timm" else ours
        peaks[mode] = {}
        for b in batch_sizes:
            step = train_step_fn(model, *batches[b], amp)
            step()  # warm-up: lazily built caches and gradients exist before the measured step
            model.zero_grad(set_to_none=True)
            peaks[mode][b] = peak_memory(step, dev)
    fns = {}
    for mode in (*modes, "timm"):
        model = ref if mode == "timm" else copy.deepcopy(ours)
        if mode != "timm":
            set_recompute_mode(model, mode)
        fns[mode] = train_step_fn(model, *batches[large], amp)
    speeds = side_by_side(fns, large, dev, rounds, iters, warmup=1)
    set_recompute_mode(ours, "none")
    rows = []
    for mode in (*modes, "timm"):
        per_image = (peaks[mode][large] - peaks[mode][small]) / (large - small) / 2**20
        rows.append(dict(mode=mode, mib_per_image=per_image, peak_mib={b: p / 2**20 for b, p in peaks[mode].items()},
                         images_per_sec=statistics.median(speeds[mode]),
                         speed_vs_none=_ratio_stats(speeds, mode, modes[0]) if mode != modes[0] else 1.0))
    timm_per_image = rows[-1]["mib_per_image"]
    lines = [f"{'mode':<11} {'MiB/image':>9} {'vs timm':>8} {'img/s':>7} {'vs none':>8}"]
    for r in rows:
        r["memory_vs_timm"] = r["mib_per_image"] / timm_per_image
        lines.append(f"{r['mode']:<11} {r['mib_per_image']:>9.1f} {r['memory_vs_timm']:>7.2f}x "
                     f"{r['images_per_sec']:>7.2f} {r['speed_vs_none']:>7.2f}x")
    return Section("memory", "\n".join(lines), dict(model=name, img_size=img_size, window_size=window_size,
                                                     batch_sizes=list(batch_sizes), dtype=dtype, rows=rows))
