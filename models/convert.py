"""Key conversion between the official Swin-Transformer release, timm, HF transformers and this package: pure
functions on state dicts (files are read by :func:`simmim.weights.read_weights`, the one reader).

Our encoder keys equal timm's. The official code differs in three ways: a stage's ``downsample`` sits at the *end* of
stage i (timm/ours: start of stage i+1), the classifier is ``head`` (ours ``head.fc``), and the geometry buffers
(``relative_coords_table``, ``relative_position_index``, ``attn_mask``) are saved; they are dropped here and rebuilt
by the model. Released SwinV2 SimMIM weights also name the CPB MLP ``rpe_mlp``. SimMIM checkpoints wrap the encoder as
``encoder.*`` beside ``decoder.0.*``; that prefix is kept so a SimMIM model loads the result directly.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from simmim.errors import UserError

from .variants import variant_of

log = logging.getLogger(__name__)

Format = Literal["ours", "timm", "official", "hf"]
_HF_KEYS = ("swinv2.", "embeddings.patch_embeddings.", "encoder.layers.0.blocks.0.attention.")
BUFFER_SUFFIXES = ("relative_coords_table", "relative_position_index", "attn_mask")
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_DOWNSAMPLE = re.compile(r"^(?P<pre>(?:encoder\.)?layers\.)(?P<i>\d+)(?P<post>\.downsample\..*)$")


class CheckpointMismatchError(UserError):
    """A checkpoint does not fit the model: lists missing, unexpected and wrongly shaped keys."""


# ----------------------------------------------------------------------------------------------------------------
# state dicts


def unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``{'model': ...}`` and similar), without DDP's ``module.``."""
    sd = checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise UserError(f"no state dict found in checkpoint with keys {sorted(sd)[:8]}")
        sd = inner
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------------------------
# key conversion


def encoder_state(state_dict: Mapping[str, torch.Tensor], keep: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The bare encoder inside a SimMIM (``encoder.*`` + ``decoder.*``) or classifier state dict: the ``encoder.``
    prefix is stripped, the decoder, ``mask_token`` and classifier head (``head.*``) are dropped unless their
    prefix is listed in ``keep`` (e.g. ``keep=("mask_token",)``). A state dict without the prefix is taken as is."""
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
    drop = tuple(p for p in ("mask_token", "head.", "decoder.") if not p.startswith(tuple(keep)))
    return {k: v for k, v in state_dict.items() if not k.startswith(drop)}


def windows_from_coords_tables(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[int, int]] | None:
    """Recover each stage's CPB normalisation window from the ``relative_coords_table`` buffers that official
    checkpoints save (None when there are none): the table spans offsets up to W-1 and its largest value is
    log2(1 + 8 (W-1)/(P-1)) / 3, so P follows from W and that value."""
    out = []
    for i in range(64):
        table = next((v for k, v in state_dict.items()
                      if k.removeprefix("encoder.").startswith(f"layers.{i}.blocks.0.") and
                      k.endswith("relative_coords_table")), None)
        if table is None:
            break
        pair = []
        for axis in (0, 1):
            window = (table.shape[1 + axis] + 1) // 2
            top = float(table[..., axis].max())
            pair.append(window if window == 1 or top <= 0 else round(8 * (window - 1) / (2 ** (3 * top) - 1)) + 1)
        out.append((pair[0], pair[1]))
    return out or None


def geometry_from_buffers(state_dict: Mapping[str, torch.Tensor]
                           ) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]] | None:
    """``(img_size, window_size, trained windows)`` of an official checkpoint, from the buffers it saves (None without
    them). Each stage's window is the side of its ``relative_position_index`` (N = W*W tokens) and its trained window
    comes from :func:`windows_from_coords_tables`; the image size from the first stage's shifted-window mask
    (``attn_mask``: one (N, N) mask per window, so sqrt(count) windows per side, square images as released), or, when
    that stage has no mask (one window covers the map), from its window. Patch size: the stem's kernel."""
    trained = windows_from_coords_tables(state_dict)
    stem = next((v for k, v in state_dict.items() if k.removeprefix("encoder.") == "patch_embed.proj.weight"), None)
    if trained is None or stem is None:
        return None

    def buffer(stage: int, block: int, name: str) -> torch.Tensor | None:
        return next((v for k, v in state_dict.items() if k.removeprefix("encoder.") ==
                     f"layers.{stage}.blocks.{block}.attn.{name}" or k.removeprefix("encoder.") ==
                     f"layers.{stage}.blocks.{block}.{name}"), None)

    windows = []
    for i in range(len(trained)):
        index = buffer(i, 0, "relative_position_index")
        if index is None:
            return None
        side = math.isqrt(index.shape[0])
        windows.append((side, side))
    mask = buffer(0, 1, "attn_mask")
    per_side = math.isqrt(mask.shape[0]) if mask is not None else 1
    patch = stem.shape[-1]
    side = windows[0][0] * per_side * patch
    return (side, side), windows[0], trained


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> Format:
    """``hf`` (transformers ``Swinv2*`` names), ``official`` (downsample at stage end, ``head.weight``, saved
    buffers, ``rpe_mlp``) or ``timm`` (= ours)."""
    if any(k.startswith(_HF_KEYS) for k in state_dict):
        return "hf"
    for k in state_dict:
        key = k.removeprefix("encoder.")
        if (key.startswith("layers.0.downsample.") or key.endswith(BUFFER_SUFFIXES) or ".rpe_mlp." in key
                or key in ("head.weight", "head.bias")):
            return "official"
    return "timm"


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], source: Format | Literal["auto"] = "auto"
                       ) -> dict[str, torch.Tensor]:
    """Convert an official, timm or transformers state dict to our keys (a SimMIM ``encoder.`` prefix is
    preserved): the one function every layout goes through."""
    source = detect_format(state_dict) if source == "auto" else source
    if source == "hf":
        from .hf import hf_to_ours

        return hf_to_ours(state_dict)
    if source in ("timm", "ours"):
        return {k: v for k, v in state_dict.items() if not k.endswith(BUFFER_SUFFIXES)}
    if source != "official":
        raise UserError(f"unknown checkpoint format {source!r}; use 'official', 'timm', 'hf' or 'auto'")
    out = {}
    for k, v in state_dict.items():
        if k.endswith(BUFFER_SUFFIXES):
            continue  # geometry buffers are rebuilt from the model's own sizes
        k = k.replace(".rpe_mlp.", ".cpb_mlp.")
        if m := _DOWNSAMPLE.match(k):  # end of stage i -> start of stage i+1
            k = f"{m['pre']}{int(m['i']) + 1}{m['post']}"
        elif k.removeprefix("encoder.") in ("head.weight", "head.bias"):
            k = k.replace("head.", "head.fc.")
        out[k] = v
    return out


def to_official(state_dict: Mapping[str, torch.Tensor], rpe_mlp: bool = False) -> dict[str, torch.Tensor]:
    """Our/timm keys -> the official layout (no buffers; ``rpe_mlp`` names as in the released SimMIM weights)."""
    out = {}
    for k, v in state_dict.items():
        if m := _DOWNSAMPLE.match(k):
            k = f"{m['pre']}{int(m['i']) - 1}{m['post']}"
        elif k.removeprefix("encoder.").startswith("head.fc."):
            k = k.replace("head.fc.", "head.")
        if rpe_mlp:
            k = k.replace(".cpb_mlp.", ".rpe_mlp.")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# loading into a model


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match ``model.state_dict()`` exactly; weights
    of another SwinV2 variant than the model's are named as such."""
    expected = model.state_dict()
    found, have = variant_of(state_dict), variant_of(expected)
    if found and have and found != have:  # one line naming both, not hundreds of keys
        raise CheckpointMismatchError(f"{what} holds a {found} encoder, the model is a {have}; build the model as "
                                      f"{found} (create_model({found!r}, ...)) or load {have} weights")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" ... (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = [f"{name} ({len(items)}): {show(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
        raise CheckpointMismatchError(
            f"{what} does not match the model; " + "; ".join(parts)
            + ". Check the variant (embed_dim/depths/heads), num_classes and in_chans, or pass exclude=[...] "
            "for parts you mean to re-initialise (e.g. 'head.')")


class ReadWeights(Protocol):
    """What :func:`simmim.weights.read_weights` returns, as far as :func:`load_pretrained` uses it."""

    state_dict: dict[str, torch.Tensor]
    windows: list[tuple[int, int]] | None

    def describe(self) -> str: ...


def _backbone(model: nn.Module) -> Any:
    """The SwinV2 inside ``model`` (itself, or a SimMIM wrapper's ``encoder``), None for anything else."""
    for candidate in (model, getattr(model, "encoder", None)):
        if hasattr(candidate, "trained_window_sizes"):
            return candidate
    return None


def check_trained_windows(model: nn.Module, windows: Sequence[Sequence[int]] | None, what: str,
                          fix: str = "") -> None:
    """Refuse weights whose log-CPB was trained at other windows than ``model`` normalises its position bias by
    (the model's ``trained_window_sizes``): it would run, with outputs silently off (1-25% on a 64 px / W4 encoder
    loaded at the default 192 px / W12). ``fix`` says how to build the right model."""
    backbone = _backbone(model)
    if windows is None or backbone is None:
        return
    trained = [tuple(w) for w in windows]
    have = backbone.trained_window_sizes
    if trained != have:
        def show(ws: Sequence[Sequence[int]]) -> str:
            return "/".join(str(w[0]) if w[0] == w[1] else f"{w[0]}x{w[1]}" for w in ws)

        size = backbone.img_size[0] if backbone.img_size[0] == backbone.img_size[1] else backbone.img_size
        raise UserError(
            f"{what} was trained with position-bias windows {show(trained)}, but the model normalises by "
            f"{show(have)} ({size} px, window {backbone.window_size[0]}); "
            + (fix or f"build it with pretrained_window_sizes={[list(w) for w in trained]}") + " (or load the "
            "encoder with simmim.load_encoder(path), which builds it at its trained geometry)")


def load_pretrained(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor] | ReadWeights,
    source: Format | Literal["auto"] = "auto",
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Load a state dict (official, timm, HF or ours) or what :func:`simmim.weights.read_weights` returned into
    ``model``: all keys or a clear error, nothing partially loaded.

    A SimMIM checkpoint (``encoder.*`` + ``decoder.*``) loaded into a bare encoder contributes its encoder only;
    ``exclude`` lists key prefixes skipped on both sides (they keep the model's own values). When the windows the
    weights were trained at are known (read weights; official buffers in a state dict) and differ from the ones the
    model normalises its log-CPB by, the load is refused with the fix (see :func:`check_trained_windows`). Returns
    the converted state dict that was loaded. Files are read with ``read_weights(path)``, not here.
    """
    if isinstance(weights, (str, Path)):
        raise TypeError(f"load_pretrained takes a state dict or read weights, not the path {str(weights)!r}: "
                        "pass simmim.weights.read_weights(path) (or use simmim.load_encoder(path))")
    if isinstance(weights, Mapping):
        raw, what = unwrap(weights), "checkpoint"
        sd = convert_state_dict(raw, source)
        windows = windows_from_coords_tables(raw) if detect_format(raw) == "official" else None
    else:
        sd, what, windows = dict(weights.state_dict), weights.describe(), weights.windows
    check_trained_windows(model, windows, what)
    own = model.state_dict()
    if not any(k.startswith("encoder.") for k in own) and any(k.startswith("encoder.") for k in sd):
        sd = encoder_state(sd, keep=("mask_token",) if "mask_token" in own else ())
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(exclude))}
    kept = {k: v for k, v in own.items() if k.startswith(tuple(exclude))}
    check_compatible(model, {**sd, **kept}, what=what)
    model.load_state_dict({**sd, **kept}, strict=True)
    return sd
