"""The encoder families SimMIM runs on, behind one contract (docs/encoders.md).

An encoder is any ``nn.Module`` with: ``in_chans``, ``img_size``, ``num_classes``, ``patch_size`` (pixels per token
of the patch embedding: the mask's granularity), ``encoder_stride`` (pixels per token of ``forward_features``),
``num_features``, ``mask_token`` (None until ``init_mask_token()``), ``forward_features(x, mask=None)`` ->
(B, H/encoder_stride, W/encoder_stride, num_features) channels-last and normed, ``forward``/``forward_head``/
``get_classifier``/``reset_classifier`` as timm has them, ``no_weight_decay()``, ``num_layer_ids`` and
``layer_id(name)`` for layer-wise lr decay, ``set_input_size(img_size, window_size=None)`` and ``geometry()``.

:data:`FAMILIES` maps a family name to its :class:`Family` (variants, constructor, checkpoint detection, official
key conversion); :func:`create_encoder` builds any variant of any family. The pipeline (SimMIM wrapper, optimizer,
fine-tuning, evaluation, export) goes through these names and never asks which backbone class it holds.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simmim.errors import UserError

from .convert import convert_state_dict
from .swin import SWIN_VARIANTS, create_swin, is_swin_v1, swin_convert, swin_variant_of
from .swin_transformer_v2 import stage_geometry, to_pair
from .variants import VARIANTS, create_model, variant_geometry, variant_of


@dataclass(frozen=True)
class Family:
    """One encoder family: its variants (name -> constructor kwargs) and what the pipeline needs of it."""

    name: str  # "swinv2", "swin", "vit"
    variants: dict[str, dict[str, Any]]
    create: Callable[..., nn.Module]  # create(variant, **overrides) -> encoder
    detect: Callable[[Mapping[str, torch.Tensor]], bool]  # official/our/timm weights of this family?
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]  # -> our keys, resized
    patch_size: int = 4  # pixels per token of the patch embedding (the mask granularity)
    encoder_stride: int = 32  # pixels per token of forward_features
    windowed: bool = True  # whether the family has attention windows (model.window_size); ViT: False
    variant_of: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None  # variant from shapes


def _is_swinv2(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(("logit_scale" in k or ".cpb_mlp." in k or ".rpe_mlp." in k) for k in state_dict)


def _swinv2_convert(state_dict: Mapping[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    return convert_state_dict(state_dict)  # the log-CPB needs no resizing: it is a function of the offsets


def _families() -> dict[str, Family]:
    families = {
        "swinv2": Family("swinv2", VARIANTS, create_model, _is_swinv2, _swinv2_convert, 4, 32, True, variant_of),
        "swin": Family("swin", SWIN_VARIANTS, create_swin, is_swin_v1, swin_convert, 4, 32, True, swin_variant_of),
    }
    # ---- ViT-B/16 (the `vit` branch's models/vit.py): registered here when that module exists ----------------
    # the coordinator's wiring spot at merge: its names as on the vit branch; a FAMILY there takes precedence
    try:
        from . import vit
    except ImportError:
        vit = None
    if vit is not None:
        names = ("VIT_VARIANTS", "create_vit", "is_vit_state_dict", "convert_official_vit")
        family = getattr(vit, "FAMILY", None)
        if family is None and all(hasattr(vit, n) for n in names):
            family = Family("vit", *(getattr(vit, n) for n in names), patch_size=16, encoder_stride=16,
                            windowed=False, variant_of=getattr(vit, "vit_variant_of", None))
        if family is not None:
            families["vit"] = family
    return families


FAMILIES: dict[str, Family] = _families()


def family_of(name: str) -> Family:
    """The family that has variant ``name``; a UserError suggesting the closest name otherwise."""
    for family in FAMILIES.values():
        if name in family.variants:
            return family
    names = list_encoders()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"{name!r} is not an encoder variant; {hint}choose one of: {', '.join(names)}")


def list_encoders() -> list[str]:
    """Every variant of every family, SwinV2 first."""
    return [v for family in FAMILIES.values() for v in family.variants]


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build variant ``name`` of whichever family has it; keyword overrides replace the variant's defaults."""
    return family_of(name).create(name, **overrides)


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> Family | None:
    """The family whose weights ``state_dict`` holds (any layout: official, SimMIM, timm, ours), None if none."""
    found = [f for f in FAMILIES.values() if f.detect(state_dict)]
    return found[0] if len(found) == 1 else None


def check_encoder_geometry(name: str, img_size: int | None = None, window_size: int | None = None
                           ) -> tuple[Family, int, int]:
    """Check variant ``name`` and, with ``img_size``, that the image tiles into its tokens (and windows at every
    stage, for a windowed family) without building it. Returns (family, patch size, stages); UserErrors name the
    fix."""
    family = family_of(name)
    if family.name == "swinv2":
        patch, stages, _ = variant_geometry(name, img_size, window_size)
        return family, patch, stages
    spec = family.variants[name]
    patch = spec.get("patch_size", family.patch_size)
    stages = len(spec["depths"]) if family.windowed else 1
    if img_size is not None:
        if family.windowed:  # Swin V1 clamps windows as V2 does (window = map where the map is not larger)
            stage_geometry(to_pair(img_size), patch, stages, to_pair(window_size or 1))
        elif img_size % family.encoder_stride:
            stride = family.encoder_stride
            raise UserError(f"img_size {img_size} is not a multiple of {name}'s patch size {stride}; "
                            f"use e.g. {max(stride, img_size // stride * stride)}")
    return family, patch, stages


def make_encoder(name: str, *, img_size: int, window_size: int | None, num_classes: int, in_chans: int = 3,
                  drop_path_rate: float = 0.0, pretrained_window_sizes: Any = None, recompute: str = "none",
                  sequential_attention: int | None = None, linear_backend: str = "auto") -> nn.Module:
    """The encoder (or classifier, ``num_classes > 0``) a config asks for, with the memory/speed switches its
    family has: SwinV2 all of them; Swin V1 and ViT activation checkpointing (``recompute='full'``, timm's
    ``set_grad_checkpointing``); the config refuses the others for them."""
    family = family_of(name)
    if family.name == "swinv2":
        model = create_model(name, img_size=img_size, window_size=window_size, num_classes=num_classes,
                             pretrained_window_sizes=pretrained_window_sizes, drop_path_rate=drop_path_rate,
                             in_chans=in_chans)
        model.set_recompute(recompute)
        model.set_sequential_attention(sequential_attention)
        model.set_linear_backend(linear_backend)
        return model
    geometry = dict(img_size=img_size, window_size=window_size) if family.windowed else dict(img_size=img_size)
    model = family.create(name, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                          **geometry)
    if recompute == "full":
        model.set_grad_checkpointing(True)
    return model


def same_architecture(a: str, b: str) -> bool:
    """Whether variants ``a`` and ``b`` (of one family) have the same tensors up to what the family's ``convert``
    adapts: width, depth(s), heads and patch, e.g. ViT's pretraining and fine-tuning pair (the shared position bias
    becomes one per block)."""
    family = family_of(a)
    if b not in family.variants:
        return False
    va, vb = family.variants[a], family.variants[b]
    return all(va.get(k) == vb.get(k) for k in ("embed_dim", "depth", "depths", "num_heads", "patch_size"))


def probe_points(name: str, encoder: nn.Module | None = None) -> tuple[str, int, int]:
    """What a probe index (``simmim eval --stage``, ``monitor.stage``) counts on variant ``name``, counted on
    ``encoder`` when given: ``("stage", stages, -1)`` for a Swin (default: the last stage, normed), ``("block",
    depth, depth * 2 // 3 - 1)`` for a ViT (0-based; default the SimMIM paper's probe, the 8th of 12 blocks)."""
    family = family_of(name)
    if family.windowed:
        stages = len(encoder.layers) if encoder is not None else len(family.variants[name]["depths"])
        return "stage", stages, -1
    depth = len(encoder.blocks) if encoder is not None else family.variants[name]["depth"]
    return "block", depth, depth * 2 // 3 - 1
