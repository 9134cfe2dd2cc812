"""SimMIM pretraining augmentation and its inverse for visualisation.

The paper uses only a random resized crop and a horizontal flip (no colour jitter): masked image modelling needs
the pixels to stay predictable. Interpolation is torchvision's default (bilinear), as in the official
``data_simmim_pt.py``.

Letters: ``B`` batch, ``H, W`` pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def pretrain_transform(
    img_size: int,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor (3, img_size, img_size).

    Randomness comes from torch's global generator (torchvision v1 transforms), which is why the datasets seed it
    per sample under ``torch.random.fork_rng``.
    """
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size} (model.img_size)")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale {scale} must satisfy 0 < min <= max <= 1")
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=scale, ratio=ratio),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Undo ``Normalize``: (3, H, W) or (B, 3, H, W) -> same shape, values clamped to [0, 1]."""
    if x.dim() not in (3, 4) or x.shape[-3] != len(mean) or len(std) != len(mean):
        raise ValueError(f"expected (C, H, W) or (B, C, H, W) images with as many channels as mean/std values "
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
) -> Callable[[Image.Image], torch.Tensor]:
    """The Swin fine-tuning recipe through timm's ``create_transform``: RandomResizedCrop (bicubic), flip,
    RandAugment, colour jitter, normalisation and random erasing. PIL -> (3, img_size, img_size).

    Its posterize ops keep 0 bits as a black image on every Pillow (see :mod:`simmim.data.augment`)."""
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
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``img_size / crop_pct`` then center-crop ``img_size`` (Swin: 256 -> 224);
    ``crop_pct=1`` resizes straight to ``img_size`` with no crop. PIL -> (3, img_size, img_size)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std))
