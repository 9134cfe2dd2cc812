"""Evaluate a fine-tuned checkpoint as trained or at other (image size, window) pairs without re-training, and
probe any checkpoint's encoder with k-NN / linear classifiers.

Moving to a new size keeps the log-CPB coordinates normalised by the windows the model was trained at (the
paper's Table 1 transfer: W8/256 -> W12/384 -> W16/512).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from simmim.data.labeled import LabeledDataset, open_labeled
from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from simmim.finetune import evaluate, windows_from_coords_tables
from simmim.models import SwinTransformerV2, create_model
from simmim.models.convert import convert_state_dict, load_pretrained, read_checkpoint, unwrap
from simmim.monitor import FeatureMonitor
from simmim.weights import is_run_checkpoint, model_from_run


def parse_sweep(spec: str) -> list[tuple[int, int]]:
    """``"256:8,384:12,512:16"`` -> [(256, 8), (384, 12), (512, 16)]."""
    pairs = []
    for item in spec.split(","):
        size, _, window = item.strip().partition(":")
        if not size.isdigit() or not window.isdigit():
            raise ValueError(f"--sweep item {item!r} must look like IMG_SIZE:WINDOW, e.g. 384:12")
        pairs.append((int(size), int(window)))
    return pairs


def at_size(model: SwinTransformerV2, img_size: int, window_size: int) -> SwinTransformerV2:
    """A copy of ``model`` moved to another geometry (pretrained windows: the ones it was trained at)."""
    moved = copy.deepcopy(model)
    moved.set_input_size(img_size=img_size, window_size=window_size)
    return moved


def load_for_eval(checkpoint: str | Path, model_name: str | None = None, img_size: int | None = None,
                  window_size: int | None = None) -> tuple[SwinTransformerV2, dict]:
    """A run checkpoint of ours as trained, or official / timm weights built as ``model_name`` at
    (``img_size``, ``window_size``) (ImageNet normalisation; the class count comes from the head)."""
    raw = read_checkpoint(checkpoint)  # read once: official files can be gigabytes
    if is_run_checkpoint(raw):
        return model_from_run(raw, str(checkpoint))
    if not (model_name and img_size and window_size):
        raise ValueError(f"{checkpoint} is not a simmim run checkpoint; to evaluate official or timm weights "
                         "pass --model NAME --img-size N --window-size W (e.g. --model swinv2_tiny "
                         "--img-size 256 --window-size 8)")
    sd = unwrap(raw)
    windows = windows_from_coords_tables(sd)  # official files record the CPB windows; timm files train at their own
    sd = convert_state_dict(sd)
    num_classes = sd["head.fc.weight"].shape[0] if "head.fc.weight" in sd else 0
    model = create_model(model_name, img_size=img_size, window_size=window_size, num_classes=num_classes,
                         pretrained_window_sizes=windows, drop_path_rate=0.0)
    load_pretrained(model, sd, source="timm")
    kind = "simmim-finetune" if num_classes else "simmim-pretrain"
    return model.eval(), {"kind": kind, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "classes": None}


def evaluate_checkpoint(checkpoint: str | Path, data: str, sizes: Sequence[tuple[int, int]] | None = None,
                        split: str = "val", batch_size: int = 64, num_workers: int = 0,
                        model_name: str | None = None, build_size: tuple[int, int] | None = None) -> list[dict]:
    """Top-1/top-5 of a classifier checkpoint on ``data``'s ``split``, one row per (img_size, window); ``sizes``
    None evaluates at the trained geometry only. Official/timm files need ``model_name`` and ``build_size``
    (their img_size, window)."""
    model, meta = load_for_eval(checkpoint, model_name, *(build_size or (None, None)))
    if meta["kind"] != "simmim-finetune":
        raise ValueError(f"{checkpoint} holds an encoder without a classifier; use --knn/--linear-probe, or "
                         "fine-tune it first with simmim finetune")
    source = open_labeled(data, split, classes=meta.get("classes"))
    if sizes is None:
        sizes = [(model.img_size[0], model.window_size[0])]
    rows = []
    for img_size, window in sizes:
        moved = model if (img_size, window) == (model.img_size[0], model.window_size[0]) else \
            at_size(model, img_size, window)
        tf = eval_transform(img_size, meta.get("crop_pct", 0.875), meta.get("interpolation", "bicubic"),
                            meta["mean"], meta["std"])
        loader = DataLoader(LabeledDataset(source, tf), batch_size=batch_size, num_workers=num_workers)
        metrics = evaluate(moved, loader)
        rows.append({"img_size": img_size, "window": window,
                     "windows": "/".join(str(w[0]) for w in moved.effective_window_sizes), **metrics})
    return rows


def probe_checkpoint(checkpoint: str | Path, data: str, stage: int = -1, k: int = 20, linear_probe: bool = True,
                     batch_size: int = 64, num_workers: int = 0, model_name: str | None = None,
                     build_size: tuple[int, int] | None = None) -> dict[str, float]:
    """k-NN (and linear-probe) top-1 of a checkpoint's frozen encoder on ``data`` (train split fits, val scores)."""
    model, meta = load_for_eval(checkpoint, model_name, *(build_size or (None, None)))
    monitor = FeatureMonitor(data, model.img_size[0], meta["mean"], meta["std"], stage=stage, k=k,
                             batch_size=batch_size, num_workers=num_workers)
    return monitor(model, linear_probe=linear_probe)


def format_table(rows: list[dict]) -> str:
    """The paper-style table: one row per (img_size, window)."""
    lines = [f"{'img_size':>8}  {'window':>6}  {'stage windows':<14} {'top-1':>7}  {'top-5':>7}  {'images':>7}"]
    for r in rows:
        lines.append(f"{r['img_size']:>8}  {'W' + str(r['window']):>6}  {r['windows']:<14} {r['top1']:>7.2f}  "
                     f"{r['top5']:>7.2f}  {r['count']:>7}")
    return "\n".join(lines)
