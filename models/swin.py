"""Swin Transformer V1 as a SimMIM encoder: timm's ``SwinTransformer`` plus the encoder contract (docs/encoders.md).

The backbone is timm's (Liu et al., "Swin Transformer", arXiv 2103.14030); this file adds what SimMIM's official
``SwinTransformerForSimMIM`` adds (microsoft/SimMIM ``models/simmim.py``): a learned ``mask_token`` that replaces the
masked patch tokens right after the patch embedding (including its LayerNorm), and the contract methods (layer ids
for layer-wise lr decay, size change, geometry). State dict keys are timm's, so ``timm.create_model('swin_base_
patch4_window7_224', img_size=..., window_size=...)`` loads an exported encoder as is.

Official Swin V1 checkpoints differ from timm's layout as the official SwinV2 ones do (``downsample`` at the end of a
stage, ``head.*``, saved ``relative_position_index``/``attn_mask`` buffers); :func:`swin_convert` maps them and
resizes each relative position bias table to the encoder's window (timm's ``resize_rel_pos_bias_table``: the
official fine-tuning code's cubic interpolation over geometrically spaced offsets where scipy is installed, plain
bicubic otherwise), as the official ``load_pretrained`` does when fine-tuning 192/W6 weights at 224/W7.

Letters: B batch, C channels, H W pixels, h w token grid of the patch embedding (H / patch_size).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .convert import convert_state_dict
from .swin_transformer_v2 import check_mask, swin_layer_id, to_pair
from .variants import VARIANTS, stage_shape

# the official SimMIM Swin V1 sizes (configs/swin_*) equal SwinV2's T/S/B/L (C, depths, heads); pico is for tests
SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    f"swin_{size}": dict(VARIANTS[f"swinv2_{size}"]) for size in ("pico", "tiny", "small", "base", "large")}
# the timm architecture with the same shape (exports load into it; benchmarks compare against it)
TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
              "swin_base": "swin_base_patch4_window7_224", "swin_large": "swin_large_patch4_window7_224"}


class SwinV1(SwinTransformer):
    """timm's Swin V1 with SimMIM's mask token and the encoder contract.

    ``forward_features(x (B, C, H, W), mask (B, h, w) | None) -> (B, H/32, W/32, num_features)`` channels-last,
    final norm applied; ``forward(x)`` -> logits (B, num_classes) or pooled features when ``num_classes == 0``.
    """

    def __init__(self, img_size: int | Sequence[int] = 192, window_size: int = 6, patch_size: int = 4,
                 variant: str = "", **kwargs: Any) -> None:
        super().__init__(img_size=to_pair(img_size), patch_size=patch_size, window_size=window_size, **kwargs)
        self.img_size, self.window_size, self.patch_size = to_pair(img_size), to_pair(window_size), patch_size
        self.depths = tuple(len(stage.blocks) for stage in self.layers)
        self.encoder_stride = patch_size * 2 ** (len(self.depths) - 1)  # pixels per token of the last stage
        self.variant = variant
        self.register_parameter("mask_token", None)  # SimMIM adds it (init_mask_token); absent in a plain encoder

    def init_mask_token(self) -> None:
        """Add SimMIM's learned ``mask_token`` (1, 1, C), trunc_normal(.02) as the official code."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=self.norm.weight.device))
        trunc_normal_(self.mask_token, std=0.02)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/32, W/32, num_features); masked tokens (mask (B, h, w), 1 = masked) become
        ``mask_token`` after the patch embedding and its norm, as in the official ``SwinTransformerForSimMIM``."""
        x = self.patch_embed(x)  # (B, h, w, C)
        if mask is not None:
            check_mask(self.mask_token, mask, x)
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, h, w, 1)
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        return self.norm(self.layers(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables (timm's rule) and the mask token."""
        return super().no_weight_decay() | ({"mask_token"} if self.mask_token is not None else set())

    @property
    def num_layer_ids(self) -> int:
        """Layer ids for layer-wise lr decay: the embeddings, one per block, the final norm and head."""
        return sum(self.depths) + 2

    def layer_id(self, param_name: str) -> int:
        """The official ``get_swin_layer`` numbering (see :func:`~simmim.models.swin_transformer_v2.swin_layer_id`)."""
        return swin_layer_id(param_name, self.depths)

    @property
    def effective_window_sizes(self) -> list[tuple[int, int]]:
        """The window each stage really uses after clamping to its map, e.g. 6/6/6/6 at 192 px, W6."""
        return [tuple(stage.blocks[0].window_size) for stage in self.layers]

    def set_input_size(self, img_size: int | Sequence[int] | None = None,  # type: ignore[override]
                       window_size: int | None = None, **_: Any) -> None:
        """Move to another image size and/or window (the window is kept when None); the relative position bias
        tables are resized to the new windows (timm's ``set_window_size``)."""
        img = to_pair(img_size) if img_size is not None else self.img_size
        win = to_pair(window_size) if window_size is not None else self.window_size
        super().set_input_size(img_size=img, window_size=win)
        self.img_size, self.window_size = img, win

    def timm_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)`` for ``timm.create_model`` that builds this architecture in plain timm (for exports
        and benchmarks): timm's own Swin of the same shape, with the sizes of this one."""
        spec = {"img_size": self.img_size[0] if self.img_size[0] == self.img_size[1] else self.img_size,
                "window_size": self.window_size[0], "num_classes": self.num_classes, "in_chans": self.in_chans}
        if self.variant in TIMM_NAMES:
            return TIMM_NAMES[self.variant], spec
        shape = SWIN_VARIANTS.get(self.variant, {})
        return "swin_tiny_patch4_window7_224", {**{k: v for k, v in shape.items()}, **spec}

    def geometry(self) -> dict[str, Any]:
        """JSON-able facts of the encoder contract (family, size, window, strides, channels)."""
        return {"family": "swin", "variant": self.variant, "img_size": list(self.img_size),
                "window_size": list(self.window_size), "patch_size": self.patch_size,
                "encoder_stride": self.encoder_stride, "num_features": self.num_features, "in_chans": self.in_chans}


def create_swin(variant: str, **overrides: Any) -> SwinV1:
    """Build a Swin V1 variant (:data:`SWIN_VARIANTS`); keyword overrides (img_size, window_size, drop_path_rate,
    num_classes, in_chans, ...) replace its defaults (192 px, W6, 1000 classes: SimMIM's pretraining geometry)."""
    return SwinV1(variant=variant, **{**SWIN_VARIANTS[variant], **overrides})


_TABLE = re.compile(r"^(?:encoder\.)?(?P<module>.*)\.relative_position_bias_table$")


def is_swin_v1(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Swin V1 weights (official, SimMIM or timm layout): relative position bias tables without V2's log-CPB/cosine
    attention parameters, and no ViT blocks."""
    keys = list(state_dict)
    return (any(k.endswith(".attn.relative_position_bias_table") and ".layers." in f".{k}" for k in keys)
            and not any(("logit_scale" in k or "cpb_mlp" in k or "rpe_mlp" in k) for k in keys))


def swin_convert(state_dict: Mapping[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Official (classification or SimMIM) or timm Swin V1 keys -> ours (= timm's), with each relative position bias
    table resized to the window of ``encoder`` (a :class:`SwinV1`); an ``encoder.`` prefix is kept."""
    out = convert_state_dict(state_dict, "official" if _official(state_dict) else "timm")
    for key, value in list(out.items()):
        if not (m := _TABLE.match(key)):
            continue
        attn = encoder.get_submodule(m["module"])
        want = attn.relative_position_bias_table.shape
        if value.shape != want:  # (2W-1)^2 rows per head; another trained window
            out[key] = resize_rel_pos_bias_table(value, new_window_size=attn.window_size, new_bias_shape=want)
    return out


def _official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.removeprefix("encoder.").startswith("layers.0.downsample.") or k.endswith(
        ("relative_position_index", "attn_mask")) or k.removeprefix("encoder.") in ("head.weight", "head.bias")
        for k in state_dict)


def swin_variant_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The Swin V1 variant whose shape (embed dim, blocks and heads per stage) a bare encoder state dict (timm
    layout) has; None when none matches."""
    found = stage_shape(state_dict, ".attn.relative_position_bias_table", 1)  # ((2W-1)^2, heads)
    return next((name for name, spec in SWIN_VARIANTS.items()
                 if (spec["embed_dim"], tuple(spec["depths"]), tuple(spec["num_heads"])) == found), None)
