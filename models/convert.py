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
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from simmim.errors import InputNotFoundError, UserError

log = logging.getLogger(__name__)

Format = Literal["ours", "timm", "official", "hf"]
_HF_KEYS = ("swinv2.", "embeddings.patch_embeddings.", "encoder.layers.0.blocks.0.attention.")
BUFFER_SUFFIXES = ("relative_coords_table", "relative_position_index", "attn_mask")
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_DOWNSAMPLE = re.compile(r"^(?P<pre>(?:encoder\.)?layers\.)(?P<i>\d+)(?P<post>\.downsample\..*)$")


class CheckpointMismatchError(UserError):
    """A checkpoint does not fit the model: lists missing, unexpected and wrongly shaped keys."""


# ----------------------------------------------------------------------------------------------------------------
# reading files: the one place where this package calls torch.load


def _stub_class(qualified: str) -> type:
    """A harmless dict subclass standing in for a pickled config class (e.g. the official yacs ``CfgNode``)."""
    module, _, name = qualified.rpartition(".")
    stub = type(name, (dict,), {"__setstate__": lambda self, state: None, "__module__": module})
    stub.__qualname__ = name
    return stub


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # truncated, foreign (a renamed pickle), empty
        raise UserError(f"{path} is not a readable safetensors file (truncated, or another format renamed "
                         f"to .safetensors?): {_first_line(err)}") from err


def read_checkpoint(path: str | Path, stub_classes: bool = True) -> dict:
    """Load a ``.safetensors`` file or a torch checkpoint with ``weights_only=True`` (no pickled code ever runs).

    Official checkpoints pickle their training config (a yacs ``CfgNode``); the classes such a file names are
    replaced by empty dict stand-ins (listed in one pass with ``get_unsafe_globals_in_checkpoint``), so the tensors
    load and the config is dropped. Zip-format files are memory-mapped: tensors are read from disk when used.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything unreadable:
    truncated, corrupt, not a checkpoint, or pickling objects that cannot be stood in for (functions, blocked
    modules such as ``os``), whose global names the message lists. ``stub_classes=False`` refuses every pickled
    class too (the files this package writes hold plain data only).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint {path} does not exist (check the path)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    zipped = zipfile.is_zipfile(path)
    stubs: list[type] = []
    if zipped and stub_classes:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # a damaged archive: torch.load below names the problem
            log.debug("cannot list the globals of %s: %s", path, err)
            names = []
        stubs = [_stub_class(n) for n in names]
        if names:
            log.info("%s pickles %s: read as empty stand-ins, never executed", path, ", ".join(names))
    try:
        with torch.serialization.safe_globals(stubs):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        refused = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise UserError(
                f"{path} was not loaded: it pickles Python objects ({', '.join(dict.fromkeys(refused))}), not only "
                "tensors and plain data, and simmim never executes pickled code; re-save the weights as a plain "
                "state dict (torch.save(model.state_dict(), ...)) or as .safetensors") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(err)}") from err
    return state


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
        sd = encoder_state(sd, keep=("mask_token",) if "mask_token" in own else ())
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(exclude))}
    kept = {k: v for k, v in own.items() if k.startswith(tuple(exclude))}
    check_compatible(model, {**sd, **kept}, what=str(checkpoint) if isinstance(checkpoint, (str, Path)) else
                     "checkpoint")
    model.load_state_dict({**sd, **kept}, strict=True)
    return sd
