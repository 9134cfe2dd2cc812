"""Augmentations: SimMIM pretraining (crop + flip), fine-tuning and evaluation, and the inverse normalisation.

The paper pretrains with only a random resized crop and a horizontal flip (no colour jitter): masked image
modelling needs the pixels to stay predictable. :class:`PretrainTransform` is that recipe, exactly as the official
``data_simmim_pt.py`` draws it (torchvision's ``RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3))``, bilinear,
then ``RandomHorizontalFlip``), computed faster:

- the crop box and the flip come from an explicit ``torch.Generator`` with torchvision's own sequence of draws, so
  a generator seeded with ``s`` gives the box and flip that torchvision gives after ``torch.manual_seed(s)``, with
  no global RNG state to fork and restore per sample;
- the box is drawn on the image header's size, then a JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8)
  chosen so the crop still covers at least the output size (a 12 MP photo cropped to 192 px decodes at 1/8); the
  box is rescaled to the decoded image, its edges rounded to whole decoded pixels (at most half a decoded pixel,
  under half an output pixel);
- crop and antialiased bilinear resize run on the uint8 tensor (torch's vectorised kernel, within one grey level of
  PIL's), then one fused multiply-add converts to float and normalises.

Fine-tuning and evaluation of RGB images use timm's ``create_transform`` (RandAugment, colour jitter, random
erasing). For other channel counts (grayscale, multi-band) :func:`finetune_transform` and :func:`eval_transform`
return tensor transforms with the same geometry (RandAugment and colour jitter need RGB and must be off).

Transforms deriving from :class:`TensorTransform` take a raw image (lazy PIL image, array or tensor: what
``source.open(i)`` gives) and decode it themselves; the others take a decoded PIL image.

Letters: ``B`` batch, ``C`` channels, ``H, W`` pixels, ``S`` output side.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from simmim.errors import UserError

from .images import RawImage, decode_tensor, oriented_size

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # timm's constants: one source of truth
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels, torchvision's order


@functools.lru_cache(maxsize=16)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    lo, hi = torch.log(torch.tensor(ratio)).tolist()  # in float32 as torchvision computes it
    return lo, hi


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            generator: torch.Generator | None = None) -> Box:
    """A crop box ``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params`` draws it (same
    distribution, same draws from the same generator state; ``None`` = torch's global generator)."""
    area = height * width
    log_lo, log_hi = _log_ratio(tuple(ratio))
    for _ in range(10):  # rejection sampling: a box that fits the image, else a centre crop below
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_size(img: RawImage | torch.Tensor) -> tuple[int, int]:
    """(W, H) of a raw image (EXIF orientation applied for PIL images), without decoding it."""
    if isinstance(img, Image.Image):
        return oriented_size(img)
    if isinstance(img, torch.Tensor):
        return int(img.shape[-1]), int(img.shape[-2])
    return int(img.shape[1]), int(img.shape[0])  # (H, W[, C]) array


def _check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"data.mean and data.std need one value per channel: model.in_chans is {channels}, got "
                         f"{len(mean)} mean and {len(std)} std values")
    if any(s <= 0 for s in std):
        raise UserError(f"data.std values must be positive, got {tuple(std)}")


class TensorTransform:
    """Base of the transforms that take a raw image (see :mod:`data.images`) and decode it themselves.

    ``transform(raw, generator)`` -> normalised float tensor (C, S, S). Randomness comes from ``generator`` (a
    ``torch.Generator``; ``None`` = torch's global one), so a caller can seed a sample without touching global RNGs.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], channels: int,
                 interpolation: str) -> None:
        if size <= 0:
            raise UserError(f"img_size must be positive, got {size} (model.img_size)")
        if interpolation not in ("bilinear", "bicubic"):
            raise UserError(f"interpolation must be bilinear or bicubic, got {interpolation!r} (data.interpolation)")
        _check_stats(mean, std, channels)
        self.size, self.channels, self.interpolation = size, channels, interpolation
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std).view(-1, 1, 1)
        self._scale = 1.0 / std_t  # (C, 1, 1): float input in nominal [0, 1]
        self._scale_u8 = 1.0 / (255.0 * std_t)  # (C, 1, 1): uint8 input, the / 255 folded in
        self._shift = -torch.tensor(self.mean).view(-1, 1, 1) / std_t  # (C, 1, 1)

    def _resize(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """(C, h, w) uint8 or float -> (C, *out_hw), antialiased (PIL-like); uint8 stays uint8."""
        if tuple(x.shape[-2:]) == out_hw:
            return x
        if x.dtype != torch.uint8 and x.dtype != torch.float32:
            x = x.float()
        return F.interpolate(x[None], size=out_hw, mode=self.interpolation, antialias=True, align_corners=False)[0]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(C, S, S) uint8 (0..255) or float (nominal 0..1) -> contiguous float32 ``(x - mean) / std``."""
        scale = self._scale_u8 if x.dtype == torch.uint8 else self._scale
        # in place on a fresh contiguous copy: 4x faster than one broadcasting addcmul on the strided input
        return x.contiguous().to(torch.float32, copy=True).mul_(scale).add_(self._shift)

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, channels={self.channels}, "
                f"interpolation={self.interpolation}, mean={self.mean}, std={self.std})")


class RandomResizedCropFlip(TensorTransform):
    """RandomResizedCrop(``size``, ``scale``, ``ratio``) + horizontal flip (probability ``hflip``) + normalise,
    on raw images, decoding JPEGs at a reduced scale when the crop allows (module docstring). (C, S, S) out."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.67, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, channels: int = 3,
                 hflip: float = 0.5, interpolation: str = "bilinear") -> None:
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise UserError(f"crop scale {tuple(scale)} must satisfy 0 < min <= max <= 1 (data.crop_scale)")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise UserError(f"crop ratio {tuple(ratio)} must satisfy 0 < min <= max")
        if not 0.0 <= hflip <= 1.0:
            raise UserError(f"hflip {hflip} must be a probability in [0, 1] (data.hflip)")
        super().__init__(size, mean, std, channels, interpolation)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)

    def draw(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[Box, bool]:
        """The crop box (on the full-size image) and whether to flip, in torchvision's order of draws."""
        box = random_resized_crop_box(height, width, self.scale, self.ratio, generator)
        flip = bool(torch.rand(1, generator=generator).item() < self.hflip)  # RandomHorizontalFlip always draws
        return box, flip

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw image (lazy PIL, (H, W[, C]) array, or (C, H, W) tensor) -> normalised float (C, S, S)."""
        width, height = image_size(img)
        (top, left, h, w), flip = self.draw(width, height, generator)
        S = self.size
        x, (sy, sx) = decode_tensor(img, self.channels, max_reduction=min(h, w) / S, padded=True)  # (C', H', W')
        Hd, Wd = x.shape[-2:]
        # the box on the decoded grid: edges rounded to whole pixels (exact when nothing was reduced)
        t, b = min(round(top / sy), Hd - 1), min(max(round((top + h) / sy), 1), Hd)
        lft, r = min(round(left / sx), Wd - 1), min(max(round((left + w) / sx), 1), Wd)
        x = self._resize(x[:, t:max(b, t + 1), lft:max(r, lft + 1)], (S, S))[: self.channels]  # (C, S, S)
        if flip:
            x = x.flip(-1)
        return self._normalize(x)


PretrainTransform = RandomResizedCropFlip


class ResizeCenterCrop(TensorTransform):
    """Evaluation on raw images of any channel count: resize the short side to ``size / crop_pct`` then take the
    centre ``size`` square (timm's eval transform, on tensors). (C, S, S) out; deterministic."""

    def __init__(self, size: int, crop_pct: float = 224 / 256, interpolation: str = "bicubic",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels: int = 3) -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise UserError(f"crop_pct {crop_pct} must be in (0, 1] (data.crop_pct)")
        super().__init__(size, mean, std, channels, interpolation)
        self.crop_pct = crop_pct

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        x, _ = decode_tensor(img, self.channels)  # (C, H, W)
        H, W = x.shape[-2:]
        short = math.floor(self.size / self.crop_pct)
        out_hw = (short, max(int(short * W / H), short)) if H <= W else (max(int(short * H / W), short), short)
        x = self._resize(x, out_hw)
        top, left = (out_hw[0] - self.size) // 2, (out_hw[1] - self.size) // 2
        return self._normalize(x[:, top:top + self.size, left:left + self.size])


class FinetuneTensorTransform(RandomResizedCropFlip):
    """Fine-tuning on raw images of any channel count: RandomResizedCrop + flip + normalise + timm's random
    erasing. Random erasing draws from the global RNGs, so datasets seed those per sample (``seeded_transform``)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                 re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1, interpolation: str = "bicubic",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels: int = 3) -> None:
        super().__init__(size, scale, (3 / 4, 4 / 3), mean, std, channels, hflip, interpolation)
        self.erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu")

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        x = super().__call__(img, generator)
        return self.erase(x) if self.erase is not None else x


def pretrain_transform(
    img_size: int,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> RandomResizedCropFlip:
    """The SimMIM pretraining augmentation: raw image -> normalised float tensor (channels, img_size, img_size).

    ``transform(img, generator)`` draws the crop and flip from ``generator`` (``None``: torch's global generator,
    like torchvision). ``mean``/``std`` hold one value per channel.
    """
    return RandomResizedCropFlip(img_size, scale=scale, ratio=ratio, mean=mean, std=std, channels=channels)


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Undo ``Normalize``: (C, H, W) or (B, C, H, W) -> same shape, values clamped to [0, 1]."""
    if x.dim() not in (3, 4) or x.shape[-3] != len(mean) or len(std) != len(mean):
        raise UserError(f"expected (C, H, W) or (B, C, H, W) images with as many channels as mean/std values "
                         f"({len(mean)}/{len(std)}), got {tuple(x.shape)} (data.mean, data.std)")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def finetune_transform(
    img_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> Callable[[Any], torch.Tensor]:
    """The Swin fine-tuning recipe: RandomResizedCrop (bicubic), flip, RandAugment, colour jitter, normalisation
    and random erasing -> (channels, img_size, img_size).

    RGB (``channels=3``): timm's ``create_transform`` on decoded PIL images, whose posterize ops keep 0 bits as a
    black image on every Pillow (see :mod:`simmim.data.augment`). Other channel counts: a
    :class:`FinetuneTensorTransform` on raw images, which needs ``auto_augment`` and ``color_jitter`` off (both are
    defined on RGB colours).
    """
    if channels != 3:
        if auto_augment or color_jitter:
            raise UserError(f"RandAugment and colour jitter work on RGB images only; with model.in_chans {channels} "
                             "set data.auto_augment=null and data.color_jitter=0")
        return FinetuneTensorTransform(img_size, scale, hflip, re_prob, re_mode, re_count, interpolation, mean, std,
                                       channels)
    _check_stats(mean, std, 3)
    from timm.data import create_transform

    from .augment import with_safe_posterize

    transform = create_transform(img_size, is_training=True, scale=scale, hflip=hflip,
                                 auto_augment=auto_augment or None, color_jitter=color_jitter or None,
                                 re_prob=re_prob, re_mode=re_mode, re_count=re_count, interpolation=interpolation,
                                 mean=tuple(mean), std=tuple(std))
    return with_safe_posterize(transform)


def eval_transform(
    img_size: int,
    crop_pct: float = 224 / 256,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> Callable[[Any], torch.Tensor]:
    """Resize the short side to ``img_size / crop_pct`` then center-crop ``img_size`` (Swin: 256 -> 224);
    ``crop_pct=1`` resizes straight to ``img_size`` with no crop -> (channels, img_size, img_size).

    RGB: timm's ``create_transform`` on decoded PIL images; other channel counts: :class:`ResizeCenterCrop` on raw
    images."""
    if channels != 3:
        return ResizeCenterCrop(img_size, crop_pct, interpolation, mean, std, channels)
    _check_stats(mean, std, 3)
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std))
