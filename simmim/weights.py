"""Rebuild models from checkpoints of this package (pretraining and fine-tuning runs) using their metadata."""

from __future__ import annotations

from pathlib import Path

from simmim.checkpoint import load_checkpoint
from simmim.models import SwinTransformerV2, create_model
from simmim.models.convert import check_compatible

KINDS = ("simmim-pretrain", "simmim-finetune")


class WrongCheckpointError(ValueError):
    """The file is a checkpoint, but not one this command can use."""


def geometry_metadata(model: SwinTransformerV2, name: str) -> dict:
    """What :func:`model_from_checkpoint` needs to rebuild ``model`` (variant, sizes, per-stage windows)."""
    return {
        "model": name,
        "img_size": list(model.img_size),
        "window_size": list(model.window_size),
        "effective_window_sizes": [list(w) for w in model.effective_window_sizes],
        "pretrained_window_sizes": [list(w) for w in model.pretrained_window_sizes],
        "in_chans": model.in_chans,
    }


def read_run_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``simmim pretrain``/``finetune`` (``model``, ``meta``, ...); a clear error otherwise."""
    ckpt = load_checkpoint(path)
    kind = (ckpt.get("meta") or {}).get("kind") if isinstance(ckpt, dict) else None
    if kind not in KINDS:
        raise WrongCheckpointError(
            f"{path} is not a simmim run checkpoint (meta.kind is {kind!r}, expected one of {', '.join(KINDS)}); "
            "official and timm weights are read by `simmim finetune --pretrained`")
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[SwinTransformerV2, dict]:
    """The model a run checkpoint holds, at the geometry it was trained at, in eval mode, with its metadata.

    A pretraining checkpoint gives its encoder (``num_classes=0``, no mask token); a fine-tuning checkpoint gives
    the classifier.
    """
    ckpt = read_run_checkpoint(path)
    meta = ckpt["meta"]
    state = ckpt["model"]
    if meta["kind"] == "simmim-pretrain":
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.") and k != "encoder.mask_token"}
    model = create_model(
        meta["model"], img_size=tuple(meta["img_size"]), window_size=tuple(meta["window_size"]),
        pretrained_window_sizes=[tuple(w) for w in meta["pretrained_window_sizes"]],
        num_classes=meta.get("num_classes", 0), in_chans=meta.get("in_chans", 3), drop_path_rate=0.0)
    check_compatible(model, state, what=str(path))
    model.load_state_dict(state)
    return model.eval(), meta
