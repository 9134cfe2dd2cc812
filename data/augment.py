"""timm's RandAugment / AutoAugment / AugMix ops, made to run on Pillow >= 13 without changing what they do.

timm's posterize ops can ask Pillow to keep 0 bits per channel: ``PosterizeIncreasing`` at magnitude 10, which the
fine-tuning recipe's ``rand-m9-mstd0.5-inc1`` reaches on about 2% of its draws (the noisy magnitude is clipped to
10), ``Posterize`` below magnitude 2.5, AutoAugment v0's ``('Posterize', 0.8, 2)``. Pillow < 13 answered with a
black image (the bit mask ``~(2**8 - 1)`` keeps nothing); Pillow 13 raises ``ValueError: bits must be between or
equal to 1 and 8``, which kills a DataLoader worker a few hundred images into an ImageNet epoch.

:func:`with_safe_posterize` gives the ops of one transform we built a posterize that returns Pillow's old answer.
It changes those op objects only: timm's module, and anyone else using timm's augmentations in the process, see
timm's own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageOps


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 (or fewer) bits gives a black image, as
    ``ImageOps.posterize`` did before Pillow 13, and 8 or more returns the image unchanged (timm's rule)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):  # the modes old Pillow posterized
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> Iterator[Any]:
    """Every timm ``AugmentOp`` inside a transform pipeline (torchvision ``Compose``, timm ``RandAugment.ops``,
    ``AutoAugment.policy`` sub-policies, ``AugMixAugment.ops``)."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        yield transform
    elif isinstance(transform, (list, tuple)):
        for item in transform:
            yield from _augment_ops(item)
    else:
        for name in ("transforms", "ops", "policy"):
            if isinstance(getattr(transform, name, None), (list, tuple)):
                yield from _augment_ops(getattr(transform, name))


def with_safe_posterize(transform: Any) -> Any:
    """Replace timm's posterize in every augmentation op of ``transform`` (in place) by :func:`posterize`; returns
    ``transform``. The op objects stay picklable for DataLoader workers (a module-level function)."""
    from timm.data import auto_augment

    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform
