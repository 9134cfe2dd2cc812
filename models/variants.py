"""Named SwinV2 variants and ``create_model``.

Sizes follow the paper (Table 1 / §3.6): C, depths, heads. The paper gives no head counts for H and G; 32 channels
per head is the natural choice and gives its 658M / 3.0B parameters. H and G add a LayerNorm on the main branch every
6 blocks (paper §3.2). ``swinv2_pico`` and ``swinv2_nano`` are small configs for tests, demos and CPUs.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from simmim.errors import UserError

from .swin_transformer_v2 import Pair, SwinTransformerV2, stage_geometry, to_pair

VARIANTS: dict[str, dict[str, Any]] = {
    "swinv2_pico": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "swinv2_nano": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8)),
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swinv2_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6),
    "swinv2_giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_period=6),
}

_ALLOWED = set(inspect.signature(SwinTransformerV2.__init__).parameters) - {"self"}
_DEFAULT_PATCH_SIZE: int = inspect.signature(SwinTransformerV2.__init__).parameters["patch_size"].default


class Geometry(NamedTuple):
    """What a variant's shape means for its inputs: pixels per token, stages, and (for a given image size and
    window) each stage's ``(token grid, effective window)``."""

    patch_size: int
    num_stages: int
    stages: list[tuple[Pair, Pair]]  # empty when no img_size was given


def variant_geometry(name: str, img_size: int | None = None, window_size: int | None = None) -> Geometry:
    """The geometry of variant ``name``, checked without building it (configs use this before any work).

    With ``img_size`` and ``window_size`` the image must tile into windows at every stage; a UserError names the
    fix otherwise, and for an unknown name it suggests the closest variant.
    """
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"{name!r} is not a SwinV2 variant; {hint}choose one of: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    patch, stages = variant.get("patch_size", _DEFAULT_PATCH_SIZE), len(variant["depths"])
    grid = [] if img_size is None else stage_geometry(to_pair(img_size), patch, stages, to_pair(window_size or 1))
    return Geometry(patch, stages, grid)


def list_models() -> list[str]:
    """Variant names accepted by :func:`create_model`, smallest first."""
    return list(VARIANTS)


def create_model(name: str, **overrides: Any) -> SwinTransformerV2:
    """Build a SwinV2 variant; keyword overrides (img_size, window_size, pretrained_window_sizes, drop_path_rate,
    num_classes, in_chans, norm_placement, attention, position_bias, ...) replace the variant's defaults.

    Example: ``create_model("swinv2_tiny", img_size=192, window_size=12, num_classes=0)`` -> pooled-feature encoder.
    """
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - _ALLOWED)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {name}; valid options: {', '.join(sorted(_ALLOWED))}")
    model = SwinTransformerV2(**{**VARIANTS[name], **overrides})
    model.pretrained_cfg["architecture"] = f"simmim_{name}"  # timm.create_model builds the same variant
    return model


def stage_shape(state_dict: Mapping[str, torch.Tensor], head_key: str, head_axis: int
                ) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
    """(embed dim, blocks per stage, heads per stage) of a bare Swin encoder state dict (timm's keys), the heads read
    from the ``head_axis`` of each stage's ``head_key`` parameter (0 where absent); None without a stem."""
    stem = state_dict.get("patch_embed.proj.weight")
    if stem is None:
        return None
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    for key, value in state_dict.items():
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(m[1]), int(m[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
            if key.endswith(head_key):
                heads[stage] = value.shape[head_axis]
    return stem.shape[0], tuple(depths[i] for i in sorted(depths)), tuple(heads.get(i, 0) for i in sorted(depths))


def variant_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The variant whose dimensions a bare encoder state dict (our keys) has, from its shapes (embed dim, blocks per
    stage, heads per stage, extra norms); None when no variant matches (e.g. a custom depth)."""
    found = stage_shape(state_dict, ".attn.logit_scale", 0)  # (heads, 1, 1): one temperature per head
    if found is None:
        return None
    extra = any(".extra_norm." in k for k in state_dict)  # H/G's main-branch norms
    for name, spec in VARIANTS.items():
        if (spec["embed_dim"], tuple(spec["depths"]), tuple(spec["num_heads"])) == found and \
                bool(spec.get("extra_norm_period")) == extra:
            return name
    return None
