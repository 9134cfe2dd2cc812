"""Our SwinV2 variants in timm's model registry, as ``simmim_<variant>`` (``simmim_swinv2_tiny``, ...).

Importing ``simmim.models`` registers them, so timm's factory and its wrappers build our class:

    import simmim.models, timm
    backbone = timm.create_model("simmim_swinv2_tiny", features_only=True, out_indices=(1, 2, 3))
    encoder = timm.create_model("simmim_swinv2_tiny", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file="encoder.safetensors"))

The ``simmim_`` prefix keeps the names apart from timm's own ``swinv2_*`` (whose classes and weights are timm's).
A ``file`` given through ``pretrained_cfg_overlay`` (or ``pretrained_cfg``) is read by
:func:`simmim.weights.read_weights`, so it may be anything that reader knows (run checkpoint, export, HF directory,
official or timm file), and the model is built at the geometry the file was trained at: its image size and window
unless the call passes ``img_size``/``window_size`` (a move to another size), and always its trained windows as
``pretrained_window_sizes`` (a call that passes other ones is refused); ``input_size`` in ``pretrained_cfg`` follows.
A file that records no geometry (a bare timm state dict) builds at the call's or the default 192 px / W12, with a
warning. Weights pass :func:`checkpoint_filter_fn`, which accepts our layout (encoder or SimMIM), timm's, the
official release's and HF transformers' Swinv2 layout. Features follow timm's swin: the
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

from simmim.errors import UserError

from .convert import convert_state_dict, encoder_state, unwrap
from .swin_transformer_v2 import SwinTransformerV2, to_pair
from .variants import VARIANTS, variant_of

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


def _pretrained_file(kwargs: dict[str, Any]) -> Any:
    """The ``file`` a ``timm.create_model`` call points its weights at (overlay first, as timm does), or None."""
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        cfg = kwargs.get(key)
        file = cfg.get("file") if isinstance(cfg, Mapping) else getattr(cfg, "file", None)
        if file:
            return file
    return None


def _with_file_geometry(variant: str, file: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a model built from ``file``: the file read once through the one reader (its state dict handed
    to timm in place of the path), the geometry it was trained at filled in, a mismatch refused in one line."""
    from simmim.weights import read_weights  # simmim.weights builds on this package: imported when a file is read

    weights = read_weights(file)
    name, geometry = variant.removeprefix(PREFIX), weights.geometry
    found = (geometry.variant if geometry else None) or weights.meta.get("model") or variant_of(weights.encoder())
    if found and found != name:
        raise UserError(f"{file} holds {found} weights, not {name}: create {PREFIX}{found}")
    kwargs = dict(kwargs)
    if geometry is None:
        if "img_size" not in kwargs or "window_size" not in kwargs:
            log.warning("%s does not record the geometry it was trained at: %s is built at img_size=%s, "
                        "window_size=%s; pass the ones it was trained at", file, variant,
                        kwargs.get("img_size", 192), kwargs.get("window_size", 12))
    else:
        trained = [to_pair(w) for w in geometry.trained_windows]
        asked = kwargs.get("pretrained_window_sizes")
        if asked is not None and [to_pair(w) for w in asked] != trained:
            raise UserError(f"{file} was trained with position-bias windows {[list(w) for w in trained]} "
                            f"({geometry.describe()}), not pretrained_window_sizes={list(asked)}: drop that argument "
                            "(the file's windows are used) or pass the file's")
        kwargs.setdefault("img_size", geometry.img_size)
        kwargs.setdefault("window_size", geometry.window_size)
        kwargs["pretrained_window_sizes"] = trained
    h, w = to_pair(kwargs.get("img_size", 192))
    stride = 4 * 2 ** (len(VARIANTS[name]["depths"]) - 1)
    stem = weights.encoder().get("patch_embed.proj.weight")
    overlay = {k: v for k, v in dict(kwargs.get("pretrained_cfg_overlay") or {}).items() if k != "file"}
    overlay["state_dict"] = weights.state_dict  # read once, here; timm passes it to checkpoint_filter_fn
    # input_size[0] is the file's channels (timm adapts the stem from it when in_chans differs), the size the model's
    overlay.setdefault("input_size", (stem.shape[1] if stem is not None else 3, h, w))
    overlay.setdefault("pool_size", (h // stride, w // stride))
    kwargs["pretrained_cfg_overlay"] = overlay
    if isinstance(kwargs.get("pretrained_cfg"), Mapping):
        kwargs["pretrained_cfg"] = {k: v for k, v in kwargs["pretrained_cfg"].items() if k != "file"}
    return kwargs


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformerV2:
    num_stages = len(VARIANTS[variant.removeprefix(PREFIX)]["depths"])
    out_indices = kwargs.pop("out_indices", tuple(range(num_stages)))
    file = _pretrained_file(kwargs) if pretrained else None
    if file is not None:
        kwargs = _with_file_geometry(variant, file, kwargs)
    # flatten_sequential lets timm's list/dict/hook feature wrappers run the stages of ``layers`` one by one
    model = build_model_with_cfg(
        SwinTransformerV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **{**VARIANTS[variant.removeprefix(PREFIX)], **kwargs})
    if file is not None:  # the cfg names the file again, and no longer holds a second reference to its tensors
        for module in model.modules():
            cfg = getattr(module, "pretrained_cfg", None)
            if isinstance(cfg, dict) and "state_dict" in cfg:
                module.pretrained_cfg = {**{k: v for k, v in cfg.items() if k != "state_dict"}, "file": str(file)}
                if hasattr(module, "default_cfg"):
                    module.default_cfg = module.pretrained_cfg
    return model


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> SwinTransformerV2:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name.removeprefix(PREFIX)} from simmim.models (192 px, window 12 by default)."
    return entrypoint


# one registered entry point per variant; timm names a model after its entry point function
for _name in VARIANTS:
    globals()[PREFIX + _name] = register_model(_entrypoint(PREFIX + _name))
