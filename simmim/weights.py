"""One way in for weights: every entry point that reads weights (fine-tuning, evaluation, export, resume and the
``--init`` warm start) calls :func:`read_weights`, which turns any supported source into our state dict plus what
is known about it (:class:`Weights`). Pure state-dict conversion lives in :mod:`simmim.models.convert` and
:mod:`simmim.models.hf`; this module decides which conversion a file needs and what its metadata says.

Sources, by what :attr:`Weights.source` calls them:

* ``run``: a checkpoint written by ``simmim pretrain``/``finetune`` (``model``, ``meta``, optimizer, step, ...);
* ``export``: an exported ``.safetensors`` with its JSON card (``x.safetensors.json``), or without one;
* ``hf``: a transformers ``Swinv2*`` directory (``config.json`` + ``model.safetensors``), e.g. our hf export;
* ``official``: an official Swin-Transformer classification or SimMIM checkpoint (``.pth``);
* ``timm``: any other state dict in timm's (= our) layout.

The windows the log-CPB MLP was trained at (:attr:`Weights.windows`) come from the run metadata, the card, the HF
config, or the ``relative_coords_table`` buffers official files save; a bare timm file does not record them (None).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from simmim.errors import UserError
from simmim.models import SwinTransformerV2, create_model
from simmim.models.convert import (
    check_compatible,
    convert_state_dict,
    detect_format,
    encoder_state,
    read_checkpoint,
    unwrap,
    windows_from_coords_tables,
)
from simmim.models.swin_transformer_v2 import stage_geometry, to_pair, trained_windows

log = logging.getLogger(__name__)

Pair = tuple[int, int]
Source = Literal["run", "export", "hf", "official", "timm"]
KINDS = ("simmim-pretrain", "simmim-finetune")  # meta.kind of the checkpoints our runs write
HF_CARD = "simmim_card.json"  # the card inside an hf export directory


class WrongCheckpointError(UserError):
    """The file holds weights, but not ones this command can use (the message says which it needs)."""


@dataclass
class Weights:
    """What a weights file holds, in our layout.

    ``state_dict``: a SimMIM model's ``encoder.*`` + ``decoder.0.*`` (pretraining), a classifier's keys with
    ``head.fc.*``, or a bare encoder; geometry buffers dropped. ``meta``: the run metadata or export card
    (``model``, ``img_size``, window sizes, ``mean``/``std``, ``classes``...), ``{}`` when the file says nothing.
    ``windows``: per-stage windows the log-CPB was trained at, None if unknown. ``checkpoint``: the whole run
    checkpoint (optimizer, scheduler, step, ...) for ``source == "run"``.
    """

    path: Path
    source: Source
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    windows: list[Pair] | None = None
    checkpoint: dict | None = None

    @property
    def kind(self) -> str | None:
        """``simmim-pretrain``/``simmim-finetune`` for what our runs wrote (also through an export), else None."""
        kind = self.meta.get("kind")
        return kind if kind in KINDS else None

    def encoder(self) -> dict[str, torch.Tensor]:
        """The bare encoder: no ``encoder.`` prefix, no mask token, decoder or classifier head."""
        return encoder_state(self.state_dict)

    def describe(self) -> str:
        what = {"run": "run checkpoint", "export": "exported weights", "hf": "transformers Swinv2 directory",
                "official": "official Swin-Transformer checkpoint", "timm": "timm-layout state dict"}[self.source]
        return f"{self.path} ({self.kind + ' ' if self.kind else ''}{what})"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file (or of a directory's files in name order), read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# metadata of our runs


def geometry_metadata(model: SwinTransformerV2, name: str) -> dict:
    """What :func:`model_from_weights` needs to rebuild ``model`` (variant, sizes, per-stage windows, channels)."""
    return {
        "model": name,
        "img_size": list(model.img_size),
        "window_size": list(model.window_size),
        "effective_window_sizes": [list(w) for w in model.effective_window_sizes],
        "pretrained_window_sizes": [list(w) for w in model.pretrained_window_sizes],
        "in_chans": model.in_chans,
    }


def meta_windows(meta: dict) -> list[Pair]:
    """The trained windows recorded in run metadata or an export card."""
    return trained_windows(meta["pretrained_window_sizes"], meta["effective_window_sizes"])


def run_checkpoint_problem(ckpt: Any, resume: bool = False) -> str | None:
    """Why ``ckpt`` (a loaded file) is not a checkpoint of our runs, in words; None when it is one. ``resume``
    also asks for the training state (step, counters) that resuming needs."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        return f"its meta.kind is {kind!r}, not one of {', '.join(KINDS)}"
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "it has no 'model' state dict"
    missing = [k for k in ("step", "train_state") if k not in ckpt]
    if resume and (missing or not isinstance(ckpt["step"], int)):
        return f"it lacks {', '.join(missing) or 'an integer step'} (a weights-only file cannot be resumed)"
    for key in ("model", "img_size", "window_size", "effective_window_sizes", "pretrained_window_sizes"):
        if key not in meta:
            return f"its metadata lacks {key!r}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# the reader


def _hf_directory(path: Path) -> Weights:
    from safetensors.torch import load_file

    from simmim.models.hf import hf_to_ours

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "swinv2":
        raise WrongCheckpointError(f"{path} holds a transformers {config.get('model_type')!r} model, not swinv2")
    try:
        sd = hf_to_ours(load_file(str(path / "model.safetensors")))
    except Exception as err:
        raise UserError(f"{path / 'model.safetensors'} is not a readable Swinv2 safetensors file: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    geometry = stage_geometry(to_pair(config["image_size"]), config["patch_size"], len(config["depths"]),
                              to_pair(config["window_size"]))
    pretrained = [to_pair(p) for p in config["pretrained_window_sizes"]]
    windows = trained_windows(pretrained, [win for _, win in geometry])
    card = path / HF_CARD
    meta = _card_meta(json.loads(card.read_text())) if card.is_file() else {}
    return Weights(path, "hf", sd, meta, windows)


def _card_meta(card: dict) -> dict:
    """Run-style metadata from an export card (variant, geometry, normalisation, classes)."""
    arch = card.get("architecture", {})
    meta = {k: card[k] for k in ("img_size", "window_size", "effective_window_sizes", "pretrained_window_sizes",
                                 "mean", "std", "classes", "crop_pct", "interpolation") if k in card}
    meta.update(kind=card.get("source", {}).get("kind"), model=arch.get("variant"),
                num_classes=arch.get("num_classes", 0), in_chans=arch.get("in_chans", 3))
    return meta


def _classify(sd: dict[str, torch.Tensor]) -> tuple[Source, dict[str, torch.Tensor], list[Pair] | None]:
    """A foreign state dict -> (source, our layout, windows recovered from saved buffers)."""
    fmt = detect_format(sd)
    windows = windows_from_coords_tables(sd) if fmt == "official" else None
    return ("timm" if fmt == "ours" else fmt), convert_state_dict(sd, fmt), windows


def read_weights(path: str | Path) -> Weights:
    """Read any supported weights file or directory into :class:`Weights` (see the module docstring).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` (one line naming the file) for anything
    unreadable or holding no SwinV2 weights. Nothing pickled is ever executed.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return _hf_directory(path)
        raise UserError(f"{path} is a directory without config.json + model.safetensors; pass a checkpoint "
                                "file (.pt/.pth/.safetensors) or a transformers Swinv2 directory")
    raw = read_checkpoint(path)
    if path.suffix == ".safetensors":
        card = path.with_name(path.name + ".json")  # simmim export writes x.safetensors.json beside it
        meta = _card_meta(json.loads(card.read_text())) if card.is_file() else {}
        source, sd, _ = _classify(raw)
        windows = meta_windows(meta) if "effective_window_sizes" in meta else None
        return Weights(path, "export" if source == "timm" else source, sd, meta, windows)
    if run_checkpoint_problem(raw) is None:
        meta = raw["meta"]
        return Weights(path, "run", dict(raw["model"]), meta, meta_windows(meta), checkpoint=raw)
    if isinstance(raw, dict) and isinstance(raw.get("meta"), dict) and raw["meta"].get("kind") in KINDS:
        raise UserError(f"{path} is a damaged simmim checkpoint: {run_checkpoint_problem(raw)}")
    try:
        sd = unwrap(raw)
    except ValueError as err:
        raise UserError(f"{path} holds no SwinV2 weights: {err}") from None
    source, sd, windows = _classify(sd)
    return Weights(path, source, sd, {}, windows)


def read_run_checkpoint(path: str | Path, what: str = "this command", resume: bool = False) -> Weights:
    """:func:`read_weights` for a checkpoint our runs wrote; :class:`WrongCheckpointError` naming what it is
    otherwise (official and timm weights are read by ``simmim finetune --pretrained`` and ``--init``). ``resume``
    also requires the training state."""
    weights = read_weights(path)
    if weights.source == "run" and resume and (problem := run_checkpoint_problem(weights.checkpoint, resume=True)):
        raise WrongCheckpointError(f"{path} cannot be resumed: {problem}")
    if weights.source != "run":
        raise WrongCheckpointError(
            f"{weights.describe()} is not a checkpoint written by simmim pretrain/finetune, which {what} needs; "
            "fine-tune from these weights with `simmim finetune CONFIG --pretrained PATH` (or start a pretraining "
            "run from them with `--init PATH`)")
    return weights


# ----------------------------------------------------------------------------------------------------------------
# models from weights


def check_channels(weights: Weights, in_chans: int) -> None:
    """Refuse weights made for another number of input channels before anything is built on them."""
    stem = weights.encoder().get("patch_embed.proj.weight")
    if stem is not None and stem.shape[1] != in_chans:
        have = stem.shape[1]
        raise UserError(f"{weights.path} was trained on {have}-channel images but model.in_chans is {in_chans}; "
                         f"set model.in_chans={have} (and data.mean/data.std with {have} values)")


def start_windows(weights: Weights | None, override: Any) -> Any:
    """The ``pretrained_window_sizes`` of a model that starts from ``weights`` (fine-tuning, warm start): the
    config's ``model.pretrained_window_sizes`` when set, else the windows the weights were trained at."""
    if override is not None or weights is None:
        return override
    if weights.windows is None:
        raise UserError(f"cannot tell which window sizes {weights.path} was trained at (a timm file has no "
                         "metadata); set model.pretrained_window_sizes, e.g. [12,12,12,6] for 192 px / W12")
    return weights.windows


def model_from_weights(weights: Weights) -> SwinTransformerV2:
    """The model our metadata describes (run checkpoint or export card), at the geometry it was trained at, in eval
    mode: the encoder of a pretraining run (``num_classes=0``, no mask token), the classifier of a fine-tuning run."""
    meta = weights.meta
    if not meta.get("model"):
        raise WrongCheckpointError(f"{weights.describe()} does not record its architecture; pass the variant "
                                   "(e.g. --model swinv2_tiny --img-size 256 --window-size 8)")
    num_classes = meta.get("num_classes", 0) or 0
    state = weights.state_dict if num_classes else weights.encoder()
    model = create_model(
        meta["model"], img_size=tuple(meta["img_size"]), window_size=tuple(meta["window_size"]),
        pretrained_window_sizes=[tuple(w) for w in meta["pretrained_window_sizes"]], num_classes=num_classes,
        in_chans=meta.get("in_chans", 3), drop_path_rate=0.0)
    check_compatible(model, state, what=str(weights.path))
    model.load_state_dict(state)
    return model.eval()
