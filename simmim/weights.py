"""One way in for weights: every entry point that reads weights (fine-tuning, evaluation, export, resume, the
``--init`` warm start, :func:`load_encoder` and the ``simmim_*`` models registered with timm) calls
:func:`read_weights`, which turns any supported source into our state dict plus what is known about it
(:class:`Weights`, with the :class:`Geometry` it was trained at). This module is the only one that opens weight
files (:func:`read_checkpoint` decodes one file for it); everything else takes state dicts. Pure state-dict
conversion lives in :mod:`simmim.models.convert` and :mod:`simmim.models.hf`; this module decides which conversion
a file needs and what its metadata says.

Sources, by what :attr:`Weights.source` calls them:

* ``run``: a checkpoint written by ``simmim pretrain``/``finetune`` (``model``, ``meta``, optimizer, step, ...);
* ``export``: an exported ``.safetensors`` with its JSON card (``x.safetensors.json``), or without one;
* ``hf``: a transformers ``Swinv2*``, ``Swin*`` or ``Beit*`` directory (``config.json`` + ``model.safetensors``), e.g.
  our hf export;
* ``official``: an official Swin-Transformer classification or SimMIM checkpoint (``.pth``);
* ``timm``: any other state dict in timm's (= our) layout.

The windows the log-CPB MLP was trained at (:attr:`Weights.windows`) come from the run metadata, the card, the
safetensors header of an export, the HF config, or the ``relative_coords_table`` buffers official files save; a
bare timm file does not record them (None). :attr:`Weights.geometry` adds the variant, image size and window where
the file records them too (an official file through its saved buffers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from simmim.errors import InputNotFoundError, UserError
from simmim.models import VARIANTS, SwinTransformerV2, create_model
from simmim.models.convert import (
    CheckpointMismatchError,
    check_compatible,
    convert_state_dict,
    detect_format,
    encoder_state,
    geometry_from_buffers,
    load_pretrained,
    unwrap,
    windows_from_coords_tables,
)
from simmim.models.encoders import FAMILIES, detect_family, family_of, make_encoder, same_architecture
from simmim.models.swin_transformer_v2 import stage_geometry, to_pair, trained_windows
from simmim.models.variants import variant_of

log = logging.getLogger(__name__)

Pair = tuple[int, int]
Source = Literal["run", "export", "hf", "official", "timm"]
KINDS = ("simmim-pretrain", "simmim-finetune")  # meta.kind of the checkpoints our runs write
HF_CARD = "simmim_card.json"  # the card inside an hf export directory


class WrongCheckpointError(UserError):
    """The file holds weights, but not ones this command can use (the message says which it needs)."""


@dataclass(frozen=True)
class Geometry:
    """The geometry weights were trained at: what rebuilds the model as trained (``variant`` None when the file does
    not name it; :func:`~simmim.models.variants.variant_of` tells it from the shapes)."""

    variant: str | None
    img_size: Pair
    window_size: Pair
    trained_windows: list[Pair]  # per stage, the windows the log-CPB MLP was trained at (its normalisation)

    def model_kwargs(self) -> dict[str, Any]:
        """``create_model`` keywords that rebuild the trained geometry (pretrained windows = trained windows, which
        gives the same outputs as the trained model and keeps them when the size is changed later)."""
        return dict(img_size=self.img_size, window_size=self.window_size,
                    pretrained_window_sizes=list(self.trained_windows))

    def describe(self) -> str:
        size = self.img_size[0] if self.img_size[0] == self.img_size[1] else f"{self.img_size[0]}x{self.img_size[1]}"
        window = self.window_size[0] if self.window_size[0] == self.window_size[1] else self.window_size
        return f"{size} px, window {window}, position-bias windows {'/'.join(str(w[0]) for w in self.trained_windows)}"


@dataclass
class Weights:
    """What a weights file holds, in our layout.

    ``state_dict``: a SimMIM model's ``encoder.*`` + ``decoder.0.*`` (pretraining), a classifier's keys with
    ``head.fc.*``, or a bare encoder; geometry buffers dropped. ``meta``: the run metadata or export card
    (``model``, ``img_size``, window sizes, ``mean``/``std``, ``classes``...), ``{}`` when the file says nothing.
    ``windows``: per-stage windows the log-CPB was trained at, None if unknown. ``checkpoint``: the whole run
    checkpoint (optimizer, scheduler, step, ...) for ``source == "run"``. ``geometry``: the trained geometry where the
    file records it (see :class:`Geometry`), else None.
    """

    path: Path
    source: Source
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    windows: list[Pair] | None = None
    checkpoint: dict | None = None
    geometry: Geometry | None = None

    @property
    def kind(self) -> str | None:
        """``simmim-pretrain``/``simmim-finetune`` for what our runs wrote (also through an export), else None."""
        kind = self.meta.get("kind")
        return kind if kind in KINDS else None

    def encoder(self) -> dict[str, torch.Tensor]:
        """The bare encoder: no ``encoder.`` prefix, no mask token, decoder or classifier head."""
        return encoder_state(self.state_dict)

    def describe(self) -> str:
        what = {"run": "run checkpoint", "export": "exported weights", "hf": "transformers directory",
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


def geometry_metadata(model: nn.Module, name: str) -> dict:
    """What :func:`model_from_weights` needs to rebuild ``model`` (variant, sizes, per-stage windows, channels).
    A Swin V1 records its windows as trained ones (its tables are trained at them); a ViT has none (``[0, 0]``)."""
    if family_of(name).name != "swinv2":
        windows = [list(w) for w in getattr(model, "effective_window_sizes", [])]
        return {"model": name, "img_size": list(model.img_size),
                "window_size": list(getattr(model, "window_size", (0, 0))), "effective_window_sizes": windows,
                "pretrained_window_sizes": windows, "in_chans": model.in_chans, "encoder": model.geometry()}
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
# decoding one file: the one place where this package calls torch.load


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


def _safetensors_header(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors header (``simmim export`` writes the geometry there); {} if none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_checkpoint(path: str | Path, stub_classes: bool = True) -> dict:
    """Decode one ``.safetensors`` file or torch checkpoint with ``weights_only=True`` (no pickled code ever runs),
    nothing converted: the raw contents under :func:`read_weights`, which library code reads weights through (use
    this to look inside a file, e.g. a run checkpoint's ``step``).

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


# ----------------------------------------------------------------------------------------------------------------
# the reader


def _hf_directory(path: Path) -> Weights:
    """A transformers directory: Swinv2 (with its geometry from config.json), Swin V1 or BEiT (SimMIM's ViT)."""
    from safetensors.torch import load_file

    from simmim.models.hf import hf_layout_of

    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    found = hf_layout_of(model_type)
    if found is None:
        raise WrongCheckpointError(f"{path} holds a transformers {model_type!r} model; simmim reads swinv2, swin "
                                   "and beit directories")
    family, layout = found
    try:
        sd = layout.from_hf(load_file(str(path / "model.safetensors")))
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path / 'model.safetensors'} is not a readable safetensors file: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    card = path / HF_CARD
    meta = _card_meta(json.loads(card.read_text())) if card.is_file() else {}
    if family != "swinv2":  # no log-CPB windows: the family's converter adapts the tables to the model built
        return Weights(path, "hf", sd, meta)
    img, window = to_pair(config["image_size"]), to_pair(config["window_size"])
    geometry = stage_geometry(img, config["patch_size"], len(config["depths"]), window)
    pretrained = [to_pair(p) for p in config["pretrained_window_sizes"]]
    windows = trained_windows(pretrained, [win for _, win in geometry])
    return Weights(path, "hf", sd, meta, windows, geometry=Geometry(meta.get("model"), img, window, windows))


def _card_meta(card: dict) -> dict:
    """Run-style metadata from an export card (variant, geometry, normalisation, classes)."""
    arch = card.get("architecture", {})
    meta = {k: card[k] for k in ("img_size", "window_size", "effective_window_sizes", "pretrained_window_sizes",
                                 "mean", "std", "classes", "crop_pct", "interpolation") if k in card}
    meta.update(kind=card.get("source", {}).get("kind"), model=arch.get("variant"),
                num_classes=arch.get("num_classes", 0), in_chans=arch.get("in_chans", 3))
    return meta


def _header_meta(header: dict[str, str]) -> dict:
    """Run-style metadata from the ``simmim.*`` entries of an export's safetensors header (used without its card);
    {} when the header has none or names an unknown variant."""
    try:
        variant = header["simmim.variant"]
        img, window = to_pair(json.loads(header["simmim.img_size"])), to_pair(json.loads(header["simmim.window_size"]))
        pretrained = [to_pair(p) for p in json.loads(header["simmim.pretrained_window_sizes"])]
        num_classes = int(header.get("simmim.num_classes", 0))
    except (KeyError, ValueError, TypeError):
        return {}
    if variant not in VARIANTS:
        return {}
    spec = VARIANTS[variant]
    effective = [win for _, win in stage_geometry(img, spec.get("patch_size", 4), len(spec["depths"]), window)]
    return {"model": variant, "img_size": list(img), "window_size": list(window), "num_classes": num_classes,
            "effective_window_sizes": [list(w) for w in effective],
            "pretrained_window_sizes": [list(p) for p in pretrained]}


def _meta_geometry(meta: dict) -> Geometry | None:
    """The geometry recorded in run metadata or an export card, None if it is incomplete."""
    if not all(k in meta for k in ("img_size", "window_size", "effective_window_sizes", "pretrained_window_sizes")):
        return None
    return Geometry(meta.get("model"), to_pair(meta["img_size"]), to_pair(meta["window_size"]), meta_windows(meta))


def _classify(sd: dict[str, torch.Tensor]) -> tuple[Source, dict[str, torch.Tensor], list[Pair] | None,
                                                      Geometry | None]:
    """A foreign state dict -> (source, our layout, windows and geometry recovered from saved buffers)."""
    if FAMILIES.get("vit") is not None and detect_family(sd) is FAMILIES["vit"]:  # BEiT keys: the family converts
        official = any(k.endswith("relative_position_index") or k.startswith("decoder.") for k in sd)
        return ("official" if official else "timm"), dict(sd), None, None
    fmt = detect_format(sd)
    windows = geometry = None
    if fmt == "official":
        windows = windows_from_coords_tables(sd)
        if found := geometry_from_buffers(sd):
            geometry = Geometry(None, *found)
    return ("timm" if fmt == "ours" else fmt), convert_state_dict(sd, fmt), windows, geometry


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
                                "file (.pt/.pth/.safetensors) or a transformers Swinv2/Swin/Beit directory")
    raw = read_checkpoint(path)
    card = path.with_name(path.name + ".json")  # simmim export writes x.safetensors.json (x.pth.json) beside it
    if path.suffix == ".safetensors" or card.is_file() and run_checkpoint_problem(raw) is not None:
        meta = _card_meta(json.loads(card.read_text())) if card.is_file() else {}
        source, sd, windows, geometry = _classify(unwrap(raw))
        if not meta and path.suffix == ".safetensors" and (meta := _header_meta(_safetensors_header(path))):
            stem = encoder_state(sd).get("patch_embed.proj.weight")
            meta["in_chans"] = stem.shape[1] if stem is not None else 3
        geometry = _meta_geometry(meta) or geometry
        windows = meta_windows(meta) if "effective_window_sizes" in meta else windows
        return Weights(path, "export" if source == "timm" else source, sd, meta, windows, geometry=geometry)
    if run_checkpoint_problem(raw) is None:
        meta = raw["meta"]
        return Weights(path, "run", dict(raw["model"]), meta, meta_windows(meta), checkpoint=raw,
                       geometry=_meta_geometry(meta))
    if isinstance(raw, dict) and isinstance(raw.get("meta"), dict) and raw["meta"].get("kind") in KINDS:
        raise UserError(f"{path} is a damaged simmim checkpoint: {run_checkpoint_problem(raw)}")
    try:
        sd = unwrap(raw)
    except ValueError as err:
        raise UserError(f"{path} holds no SwinV2 weights: {err}") from None
    source, sd, windows, geometry = _classify(sd)
    return Weights(path, source, sd, {}, windows, geometry=geometry)


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


def check_variant(weights: Weights, model_name: str, key: str = "model.name") -> None:
    """Refuse weights of another encoder family or SwinV2 variant than ``model_name`` before a model is built on
    them, naming the weights' family/variant and the setting (``key``) to change: a key-by-key mismatch list would
    run to hundreds of keys. Weights of no known variant (a custom depth) are left to the load's own key check."""
    family, wanted = detect_family(weights.encoder()), family_of(model_name)
    if family is not None and family is not wanted:
        raise CheckpointMismatchError(f"{weights.describe()} holds a {family.name} encoder, but {key} is "
                                      f"{model_name} ({wanted.name}); set {key} to a {family.name} variant "
                                      f"({', '.join(family.variants)})")
    found = (wanted.variant_of or variant_of)(weights.encoder())
    if found is not None and found != model_name and not same_architecture(found, model_name):
        fits = [v for v in wanted.variants if same_architecture(found, v)]  # e.g. ViT's pretrain/fine-tune pair
        raise CheckpointMismatchError(f"{weights.describe()} holds a {found} encoder, but {key} is {model_name}; "
                                      f"set {key}={' or '.join(fits)}")


def start_windows(weights: Weights | None, override: Any) -> Any:
    """The ``pretrained_window_sizes`` of a model that starts from ``weights`` (fine-tuning, warm start): the
    config's ``model.pretrained_window_sizes`` when set, else the windows the weights were trained at (SwinV2's
    log-CPB only: other families have no such windows, None)."""
    if weights is not None and detect_family(weights.encoder()) not in (None, family_of("swinv2_tiny")):
        return override
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
    if family_of(meta["model"]).name != "swinv2":
        model = make_encoder(meta["model"], img_size=meta["img_size"][0], window_size=meta["window_size"][0],
                              num_classes=num_classes, in_chans=meta.get("in_chans", 3))
        check_compatible(model, state, what=str(weights.path))
        model.load_state_dict(state)
        return model.eval()
    model = create_model(
        meta["model"], img_size=tuple(meta["img_size"]), window_size=tuple(meta["window_size"]),
        pretrained_window_sizes=[tuple(w) for w in meta["pretrained_window_sizes"]], num_classes=num_classes,
        in_chans=meta.get("in_chans", 3), drop_path_rate=0.0)
    check_compatible(model, state, what=str(weights.path))
    model.load_state_dict(state)
    return model.eval()


def load_encoder(path: str | Path | Weights, img_size: int | tuple[int, int] | None = None,
                 window_size: int | tuple[int, int] | None = None, drop_path_rate: float = 0.0
                 ) -> SwinTransformerV2:
    """The encoder in any weights file :func:`read_weights` knows (run checkpoint, export, HF directory, official
    release, timm file), at the geometry it was trained at, or moved to ``img_size``/``window_size`` with its
    log-CPB still normalised by the windows it was trained at (as fine-tuning does). Returns the bare encoder
    (``num_classes=0``: pooled features (B, C); a classifier's head and SimMIM's mask token and decoder dropped) in
    eval mode; ``drop_path_rate`` is for training it further (e.g. as a detection backbone).

    A bare timm state dict records no geometry: pass the ``img_size`` and ``window_size`` it was trained at.
    """
    weights = path if isinstance(path, Weights) else read_weights(path)
    state = weights.encoder()
    geometry = weights.geometry
    family = detect_family(state)
    if family is not None and family.name != "swinv2":
        return _load_other_encoder(weights, family, img_size, window_size, drop_path_rate)
    variant = (geometry.variant if geometry else None) or weights.meta.get("model") or variant_of(state)
    if variant is None:
        raise WrongCheckpointError(f"{weights.describe()} matches none of the variants {', '.join(VARIANTS)}; build "
                                   "the model with simmim.models.create_model and load it with load_pretrained")
    if geometry is None:
        if img_size is None or window_size is None:
            raise UserError(f"{weights.describe()} does not record the geometry it was trained at; pass it: "
                            "load_encoder(path, img_size=..., window_size=...), e.g. 192 and 12 for the paper's "
                            "pretraining")
        geometry = Geometry(variant, to_pair(img_size), to_pair(window_size), [(0, 0)] * len(VARIANTS[variant]
                                                                                               ["depths"]))
        img_size = window_size = None  # built there: that is the geometry it was trained at, by the caller's word
    stem = state.get("patch_embed.proj.weight")
    model = create_model(variant, num_classes=0, in_chans=stem.shape[1] if stem is not None else 3,
                         drop_path_rate=drop_path_rate, **geometry.model_kwargs())
    load_pretrained(model, state, source="timm")
    if img_size is not None or window_size is not None:
        model.set_input_size(img_size=img_size, window_size=window_size)  # keeps the trained windows
    return model.eval()


def _load_other_encoder(weights: Weights, family: Any, img_size: Any, window_size: Any, drop_path_rate: float
                        ) -> nn.Module:
    """:func:`load_encoder` for a Swin V1 / ViT file: built at the geometry its metadata records (or the one
    passed), the family's conversion resizing position tables to it."""
    meta, state = weights.meta, weights.encoder()
    variant = meta.get("model") or (family.variant_of(state) if family.variant_of else None)
    if variant is None:
        raise WrongCheckpointError(f"{weights.describe()} matches none of the {family.name} variants "
                                   f"{', '.join(family.variants)}; build it with simmim.models.create_encoder")
    if img_size is None and "img_size" not in meta:
        raise UserError(f"{weights.describe()} does not record the geometry it was trained at; pass it: "
                        "load_encoder(path, img_size=..., window_size=...), e.g. 192 and 6 for SimMIM's Swin")
    size = to_pair(img_size if img_size is not None else meta["img_size"])[0]
    window = window_size if window_size is not None else (meta.get("window_size") or [None])[0]
    stem = state.get("patch_embed.proj.weight")
    model = make_encoder(variant, img_size=size, window_size=window, num_classes=0, drop_path_rate=drop_path_rate,
                          in_chans=stem.shape[1] if stem is not None else 3)
    load_pretrained(model, family.convert(state, model), source="timm")
    return model.eval()
