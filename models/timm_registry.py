"""Our SwinV2 variants in timm's model registry, as ``simmim_<variant>`` (``simmim_swinv2_tiny``, ...).

Importing ``simmim.models`` registers them, so timm's factory and its wrappers build our class:

    import simmim.models, timm
    backbone = timm.create_model("simmim_swinv2_tiny", features_only=True, out_indices=(1, 2, 3))
    encoder = timm.create_model("simmim_swinv2_tiny", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file="encoder.safetensors"))

The ``simmim_`` prefix keeps the names apart from timm's own ``swinv2_*`` (whose classes and weights are timm's).
Weights read through ``pretrained=True`` pass :func:`checkpoint_filter_fn`, which accepts our files (encoder or
SimMIM), timm's, the official release's and HF transformers' Swinv2 layout. Features follow timm's swin: the
default ``features_only`` wrapper returns channels-last (B, h, w, C) maps, ``feature_cls='getter'`` returns
(B, C, h, w) maps through :meth:`~simmim.models.SwinTransformerV2.forward_intermediates`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .convert import convert_state_dict, encoder_state, unwrap
from .swin_transformer_v2 import SwinTransformerV2
from .variants import VARIANTS

log = logging.getLogger(__name__)

PREFIX = "simmim_"


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: SwinTransformerV2) -> dict[str, torch.Tensor]:
    """Any supported checkpoint -> ``model``'s keys: SimMIM's ``encoder.`` prefix and decoder dropped for a bare
    encoder, official/HF layouts converted, a missing classifier taken from the model's fresh one (a pretrained
    encoder under a new head)."""
    sd = convert_state_dict(unwrap(state_dict))
    own = model.state_dict()
    sd = encoder_state(sd, keep=("head.", "mask_token") if "mask_token" in own else ("head.",))
    fresh = [k for k in own if k.startswith("head.") and k not in sd]
    if fresh:
        log.info("the checkpoint has no classifier: %s keep their fresh initialisation", ", ".join(fresh))
        sd.update({k: own[k] for k in fresh})
    return sd


def _cfg(**overrides: Any) -> dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 192, 192), pool_size=(6, 6), crop_pct=0.9,
                interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.proj", classifier="head.fc", license="mit", **overrides)


default_cfgs = generate_default_cfgs({PREFIX + name: _cfg() for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformerV2:
    num_stages = len(VARIANTS[variant.removeprefix(PREFIX)]["depths"])
    out_indices = kwargs.pop("out_indices", tuple(range(num_stages)))
    # flatten_sequential lets timm's list/dict/hook feature wrappers run the stages of ``layers`` one by one
    return build_model_with_cfg(
        SwinTransformerV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **{**VARIANTS[variant.removeprefix(PREFIX)], **kwargs})


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> SwinTransformerV2:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name.removeprefix(PREFIX)} from simmim.models (192 px, window 12 by default)."
    return entrypoint


# one registered entry point per variant; timm names a model after its entry point function
for _name in VARIANTS:
    globals()[PREFIX + _name] = register_model(_entrypoint(PREFIX + _name))
