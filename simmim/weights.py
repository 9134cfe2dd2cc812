"""Rebuild models from checkpoints of this package (pretraining and fine-tuning runs) using their metadata."""

from __future__ import annotations

from pathlib import Path

from simmim.models import SwinTransformerV2, create_model
from simmim.models.convert import check_compatible, read_checkpoint

KINDS = ("simmim-pretrain", "simmim-finetune")


class WrongCheckpointError(ValueError):
    """The file is a checkpoint, but not one this command can use."""


def trained_windows(meta: dict) -> list[tuple[int, int]]:
    """The windows a checkpoint's CPB MLP normalises by: its pretrained windows where set, else its effective
    windows (192 px / W12 pretraining -> 12/12/12/6)."""
    return [tuple(p) if p[0] > 0 else tuple(e)
            for p, e in zip(meta["pretrained_window_sizes"], meta["effective_window_sizes"], strict=True)]


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


def is_run_checkpoint(ckpt: object) -> bool:
    """Whether a loaded checkpoint was written by ``simmim pretrain``/``finetune``."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) and ckpt["meta"].get("kind") in KINDS


def read_run_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``simmim pretrain``/``finetune`` (``model``, ``meta``, ...); a clear error otherwise.
    Other checkpoints (official ones pickle a config object) are read safely only to say what they are not."""
    ckpt = read_checkpoint(path)
    if not is_run_checkpoint(ckpt):
        kind = (ckpt.get("meta") or {}).get("kind") if isinstance(ckpt.get("meta"), dict) else None
        raise WrongCheckpointError(
            f"{path} is not a simmim run checkpoint (meta.kind is {kind!r}, expected one of {', '.join(KINDS)}); "
            "official and timm weights are read by `simmim finetune --pretrained`")
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[SwinTransformerV2, dict]:
    """The model a run checkpoint holds, at the geometry it was trained at, in eval mode, with its metadata.

    A pretraining checkpoint gives its encoder (``num_classes=0``, no mask token); a fine-tuning checkpoint gives
    the classifier.
    """
    return model_from_run(read_run_checkpoint(path), str(path))


def model_from_run(ckpt: dict, what: str = "checkpoint") -> tuple[SwinTransformerV2, dict]:
    """:func:`model_from_checkpoint` for a run checkpoint already in memory."""
    meta = ckpt["meta"]
    state = ckpt["model"]
    if meta["kind"] == "simmim-pretrain":
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.") and k != "encoder.mask_token"}
    model = create_model(
        meta["model"], img_size=tuple(meta["img_size"]), window_size=tuple(meta["window_size"]),
        pretrained_window_sizes=[tuple(w) for w in meta["pretrained_window_sizes"]],
        num_classes=meta.get("num_classes", 0), in_chans=meta.get("in_chans", 3), drop_path_rate=0.0)
    check_compatible(model, state, what=what)
    model.load_state_dict(state)
    return model.eval(), meta
