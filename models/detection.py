"""The encoder as a torchvision detection backbone: its stage maps (NCHW) through a feature pyramid network, with
the ``out_channels`` that torchvision's Faster R-CNN, Mask R-CNN and RetinaNet read from a backbone.

timm's default ``features_only`` wrapper returns Swin maps channels-last (B, h, w, C), as timm's own SwinV2 does, so
torchvision's ``BackboneWithFPN`` / ``FeaturePyramidNetwork`` (which convolve NCHW maps) fail on it; here the maps
come from :meth:`~simmim.models.SwinTransformerV2.forward_intermediates` in NCHW. Any input size works: torchvision
resizes and pads a batch to a multiple of 32, the encoder pads further to its windows and crops nothing, so each
map is ceil(H / s) x ceil(W / s) for strides s = 4, 8, 16, 32.

    encoder = simmim.load_encoder("encoder.safetensors")          # at the geometry it was pretrained at
    model = torchvision.models.detection.MaskRCNN(detection_backbone(encoder), num_classes=91)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .swin_transformer_v2 import SwinTransformerV2


class DetectionBackbone(nn.Module):
    """``body`` (a SwinV2 encoder, pruned after its last stage taken) -> a LayerNorm per map (the stage outputs are
    not normed; the Swin detection code adds one per output the same way) -> a torchvision FPN.

    Input (B, C, H, W); output an ``OrderedDict`` ``'0'`` .. ``'n-1'`` (one per stage in ``out_indices``) plus
    ``'pool'`` (a max-pooled extra level, as torchvision's ResNet-FPN backbones give), each
    (B, out_channels, h_i, w_i). Five levels with the defaults: what the default anchor generator and RoI pooling of
    torchvision's Faster/Mask R-CNN expect.
    """

    def __init__(self, encoder: SwinTransformerV2, out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_channels: int = 256, norm: bool = True) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        # the classifier head and the final norm are not used by a detector: prune them (and any later stage)
        self.out_indices = encoder.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        self.body = encoder
        channels = [encoder.feature_info[i]["num_chs"] for i in self.out_indices]
        self.norms = nn.ModuleList(LayerNorm2d(c) if norm else nn.Identity() for c in channels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # torchvision's detectors size their heads from this

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        normed = [norm(m) for norm, m in zip(self.norms, maps, strict=True)]  # each (B, C_i, h_i, w_i)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(normed)))


def detection_backbone(encoder: SwinTransformerV2, out_indices: Sequence[int] = (0, 1, 2, 3),
                       out_channels: int = 256, norm: bool = True) -> DetectionBackbone:
    """A torchvision detection backbone (FPN maps, ``out_channels``) on ``encoder``, which it takes over (its head
    and final norm are dropped). ``out_indices``: the stages fed to the FPN; with fewer than four, give the
    detector an anchor generator with one size per level (``len(out_indices) + 1`` with the pooled level)."""
    return DetectionBackbone(encoder, out_indices, out_channels, norm)
