"""Checkpoint reading and key conversion between the official Swin-Transformer release, timm and this package.

Our encoder keys equal timm's. The official code differs in three ways: a stage's ``downsample`` sits at the *end* of
stage i (timm/ours: start of stage i+1), the classifier is ``head`` (ours ``head.fc``), and the geometry buffers
(``relative_coords_table``, ``relative_position_index``, ``attn_mask``) are saved; they are dropped here and rebuilt
by the model. Released SwinV2 SimMIM weights also name the CPB MLP ``rpe_mlp``. SimMIM checkpoints wrap the encoder as
``encoder.*`` beside ``decoder.0.*``; that prefix is kept so a SimMIM model loads the result directly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Format = Literal["ours", "timm", "official"]
BUFFER_SUFFIXES = ("relative_coords_table", "relative_position_index", "attn_mask")
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_DOWNSAMPLE = re.compile(r"^(?P<pre>(?:encoder\.)?layers\.)(?P<i>\d+)(?P<post>\.downsample\..*)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and wrongly shaped keys."""


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _stub_class(qualified: str) -> type:
    """A harmless dict subclass standing in for a pickled config class (e.g. the official yacs ``CfgNode``)."""
    module, _, name = qualified.rpartition(".")
    stub = type(name, (dict,), {"__setstate__": lambda self, state: None, "__module__": module})
    stub.__qualname__ = name
    return stub


def read_checkpoint(path: str | Path) -> dict:
    """Load a ``.safetensors`` file or a torch checkpoint with ``weights_only=True`` (no code runs).

    Official checkpoints pickle their training config (a yacs ``CfgNode``); such Python objects are replaced by
    empty stand-ins, so the tensors load safely and the config is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (check the path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    stubs: list[type] = []
    for _ in range(16):
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the weights-only unpickler names the global it refused
            found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(err))
            if not found or any(f"{s.__module__}.{s.__qualname__}" == found.group(1) for s in stubs):
                raise ValueError(f"{path} is not a readable checkpoint: {str(err).splitlines()[0]}") from err
            log.info("ignoring pickled object %s in %s", found.group(1), path)
            stubs.append(_stub_class(found.group(1)))
    raise ValueError(f"{path} pickles too many Python objects to load safely")


def unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``{'model': ...}`` and similar), without DDP's ``module.``."""
    sd = checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict found in checkpoint with keys {sorted(sd)[:8]}")
        sd = inner
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------------------------
# key conversion


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> Format:
    """``official`` (downsample at stage end, ``head.weight``, saved buffers, ``rpe_mlp``) or ``timm`` (= ours)."""
    for k in state_dict:
        key = k.removeprefix("encoder.")
        if (key.startswith("layers.0.downsample.") or key.endswith(BUFFER_SUFFIXES) or ".rpe_mlp." in key
                or key in ("head.weight", "head.bias")):
            return "official"
    return "timm"


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], source: Format | Literal["auto"] = "auto"
                       ) -> dict[str, torch.Tensor]:
    """Convert an official or timm state dict to our keys (a SimMIM ``encoder.`` prefix is preserved)."""
    source = detect_format(state_dict) if source == "auto" else source
    if source in ("timm", "ours"):
        return {k: v for k, v in state_dict.items() if not k.endswith(BUFFER_SUFFIXES)}
    if source != "official":
        raise ValueError(f"unknown checkpoint format {source!r}; use 'official', 'timm' or 'auto'")
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
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match ``model.state_dict()`` exactly."""
    expected = model.state_dict()
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


def load_pretrained(
    model: nn.Module,
    checkpoint: str | Path | Mapping,
    source: Format | Literal["auto"] = "auto",
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Load an official, timm or own checkpoint (file or dict) into ``model``, all keys or a clear error.

    A SimMIM checkpoint (``encoder.*`` + ``decoder.*``) loaded into a bare encoder contributes its encoder only;
    ``exclude`` lists key prefixes skipped on both sides (they keep the model's own values). Returns the
    converted state dict that was loaded.
    """
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    sd = convert_state_dict(unwrap(raw), source)
    own = model.state_dict()
    if not any(k.startswith("encoder.") for k in own) and any(k.startswith("encoder.") for k in sd):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        if "mask_token" not in own:
            sd.pop("mask_token", None)
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(exclude))}
    kept = {k: v for k, v in own.items() if k.startswith(tuple(exclude))}
    check_compatible(model, {**sd, **kept}, what=str(checkpoint) if isinstance(checkpoint, (str, Path)) else
                     "checkpoint")
    model.load_state_dict({**sd, **kept}, strict=True)
    return sd
