"""SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", arXiv 2111.09886).

The encoder replaces masked patch tokens by a learned ``mask_token`` right after the patch embedding (and its
LayerNorm); a one-layer decoder (1x1 conv to ``encoder_stride**2 * 3`` channels + PixelShuffle) predicts raw pixels
from the final stage; the loss is L1 on masked pixels only.

Letters: B batch, C channels, H W pixels, h w token grid of the patch embedding (H / patch_size).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from simmim.errors import UserError

log = logging.getLogger(__name__)


class SimMIMOutput(NamedTuple):
    loss: torch.Tensor  # scalar masked L1
    pred: torch.Tensor  # (B, C, H, W) reconstruction in the (normalised) input space


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked pixels: ``sum(|pred - target| * m) / (sum(m) + 1e-5) / C``.

    pred, target (B, C, H, W); pixel_mask (B, 1, H, W), 1 = masked. Counting the one-channel mask once per pixel
    and dividing by C gives the per-value mean, as the official code does.
    """
    m = pixel_mask.to(pred.dtype)
    return ((pred - target).abs() * m).sum() / (m.sum() + 1e-5) / pred.shape[1]


def check_norm_target_window(window: int) -> None:
    """The one rule for the target normalisation's window (the config checks it through this function too): odd, so
    that it is centred on its pixel and the output keeps the input's size, and >= 3, so that the Bessel-corrected
    variance has at least two neighbours."""
    if window % 2 == 0 or window < 3:
        raise UserError(f"simmim.norm_target_window={window} must be odd and >= 3 (a window centred on each pixel), "
                        f"e.g. {max(3, window + 1 if window % 2 == 0 else 3)}")


def local_stats(target: torch.Tensor, window: int = 47) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel mean and std over a sliding ``window`` x ``window`` neighbourhood (odd), cropped at
    the border (``count_include_pad=False``); the variance is Bessel-corrected. (B, C, H, W) -> two float tensors
    of that shape, the std including the 1e-6 of the official code: ``sqrt(var + 1e-6)``."""
    check_norm_target_window(window)
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    t = target.float()
    mean = F.avg_pool2d(t, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(t * t, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(t[:1, :1]), count_include_pad=True, **pool) * window**2  # (1, 1, H, W)
    var = ((mean_sq - mean**2) * count / (count - 1)).clamp(min=0)
    return mean, (var + 1e-6).sqrt()


def normalize_target(target: torch.Tensor, window: int = 47) -> torch.Tensor:
    """SimMIM's normalised target: ``(t - local mean) / sqrt(local var + 1e-6)`` per pixel and channel over a
    ``window`` x ``window`` neighbourhood (see :func:`local_stats`). (B, C, H, W) -> same shape."""
    mean, std = local_stats(target, window)
    return ((target.float() - mean) / std).to(target.dtype)


class SimMIM(nn.Module):
    """Masked image modeling around any encoder of the contract (SwinV2, Swin V1, ViT; docs/encoders.md).

    ``forward(images (B, C, H, W) normalised, mask (B, h, w) bool, True = masked) -> SimMIMOutput(loss, pred)``.
    State dict: ``encoder.*`` (with ``encoder.mask_token``) and ``decoder.0.*``, the official layout.
    """

    def __init__(self, encoder: nn.Module, norm_target: bool = False, norm_target_window: int = 47) -> None:
        super().__init__()
        if encoder.num_classes:
            log.info("SimMIM uses the encoder without its classifier: num_classes %d -> 0", encoder.num_classes)
            encoder.reset_classifier(0)
        if encoder.mask_token is None:
            encoder.init_mask_token()
        self.encoder = encoder
        self.encoder_stride = encoder.encoder_stride
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        self.norm_target, self.norm_target_window = norm_target, norm_target_window
        if norm_target:  # refused when built rather than at the first step
            check_norm_target_window(norm_target_window)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> SimMIMOutput:
        z = self.encoder.forward_features(images, mask)  # (B, H/stride, W/stride, C_enc)
        conv, shuffle = self.decoder
        # the 1x1 conv as the linear map it is, on the channels-last tokens: its weight gradient then keeps the
        # weight's layout. The conv on the permuted view returned channels-last weight gradients (CPUs with >1
        # thread), which DDP copied into its buckets (laid out like the weight) every step, with a warning.
        y = F.linear(z, conv.weight.flatten(1), conv.bias)  # (B, H/stride, W/stride, stride**2 * C)
        pred = shuffle(y.permute(0, 3, 1, 2))  # (B, C, H, W)
        pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)  # (B, H, W)
        target = normalize_target(images, self.norm_target_window) if self.norm_target else images
        loss = masked_l1_loss(pred.float(), target.float(), pixel_mask.unsqueeze(1))
        return SimMIMOutput(loss, pred)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
