"""Evaluate a fine-tuned checkpoint as trained or at other (image size, window) pairs without re-training, and
probe any checkpoint's encoder with k-NN / linear classifiers.

Moving to a new size keeps the log-CPB coordinates normalised by the windows the model was trained at (the
paper's Table 1 transfer: W8/256 -> W12/384 -> W16/512).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader

from simmim.data.labeled import LabeledDataset, open_labeled
from simmim.data.transforms import eval_transform
from simmim.errors import UserError
from simmim.models import SwinTransformerV2, create_model, family_of
from simmim.models.convert import load_pretrained
from simmim.models.encoders import make_encoder, probe_points
from simmim.monitor import FeatureMonitor
from simmim.weights import check_variant, model_from_weights, read_weights


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Accelerator | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy and cross-entropy over ``loader``; under data parallelism every sample is counted
    exactly once (``gather_for_metrics`` drops the padding of uneven shards)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for batch in loader:
        logits = model(batch["image"]).float()
        labels = batch["label"]
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top == labels[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        total += len(labels)
    model.train(was_training)
    return {"top1": 100 * correct1 / max(total, 1), "top5": 100 * correct5 / max(total, 1),
            "loss": loss_sum / max(total, 1), "count": total}


def parse_sweep(spec: str) -> list[tuple[int, int]]:
    """``"256:8,384:12,512:16"`` -> [(256, 8), (384, 12), (512, 16)]."""
    pairs = []
    for item in spec.split(","):
        size, _, window = item.strip().partition(":")
        if not size.isdigit() or not window.isdigit() or int(size) < 1 or int(window) < 1:
            raise UserError(f"--sweep item {item!r} must look like IMG_SIZE:WINDOW with positive numbers, e.g. 384:12")
        pairs.append((int(size), int(window)))
    return pairs


def at_size(model: SwinTransformerV2, img_size: int, window_size: int) -> SwinTransformerV2:
    """A copy of ``model`` moved to another geometry (pretrained windows: the ones it was trained at)."""
    moved = copy.deepcopy(model)
    moved.set_input_size(img_size=img_size, window_size=window_size)
    return moved


def load_for_eval(checkpoint: str | Path, model_name: str | None = None, img_size: int | None = None,
                  window_size: int | None = None) -> tuple[SwinTransformerV2, dict]:
    """A run checkpoint of ours (or an export with its card) as trained, or official / timm / transformers weights
    built as ``model_name`` at (``img_size``, ``window_size``) with ImageNet normalisation (the class count comes
    from the head). Returns the model in eval mode and its metadata."""
    weights = read_weights(checkpoint)  # read once: official files can be gigabytes
    if weights.meta.get("model"):
        return model_from_weights(weights), weights.meta
    windowed = family_of(model_name).windowed if model_name else True
    if not (model_name and img_size and (window_size or not windowed)):
        raise UserError(f"{weights.describe()} does not record its architecture; to evaluate it pass --model NAME "
                         "--img-size N --window-size W (e.g. --model swinv2_tiny --img-size 256 --window-size 8; "
                         "a ViT has no window: --model vit_base_patch16_ft --img-size 224)")
    check_variant(weights, model_name, key="--model")
    head = next((k for k in ("head.fc.weight", "head.weight") if k in weights.state_dict), None)  # Swin, ViT
    sd = weights.state_dict if head else weights.encoder()
    num_classes = sd[head].shape[0] if head else 0
    family = family_of(model_name)
    if family.name == "swinv2":
        model = create_model(model_name, img_size=img_size, window_size=window_size, num_classes=num_classes,
                             pretrained_window_sizes=weights.windows, drop_path_rate=0.0)
    else:  # Swin V1 / ViT: the family's conversion resizes position tables to this geometry
        model = make_encoder(model_name, img_size=img_size, window_size=window_size, num_classes=num_classes)
        sd = family.convert(sd, model)
    load_pretrained(model, sd, source="timm")
    kind = "simmim-finetune" if num_classes else "simmim-pretrain"
    return model.eval(), {"kind": kind, "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
                          "classes": None}


def evaluate_checkpoint(checkpoint: str | Path, data: str, sizes: Sequence[tuple[int, int]] | None = None,
                        split: str = "val", batch_size: int = 64, num_workers: int = 0,
                        model_name: str | None = None, build_size: tuple[int, int] | None = None) -> list[dict]:
    """Top-1/top-5 of a classifier checkpoint on ``data``'s ``split``, one row per (img_size, window); ``sizes``
    None evaluates at the trained geometry only. Official/timm files need ``model_name`` and ``build_size``
    (their img_size, window)."""
    model, meta = load_for_eval(checkpoint, model_name, *(build_size or (None, None)))
    if not getattr(model, "num_classes", 0):
        raise UserError(f"{checkpoint} holds an encoder without a classifier; use --knn/--linear-probe, or "
                         "fine-tune it first with simmim finetune")
    source = open_labeled(data, split, classes=meta.get("classes"), channels=model.in_chans, split_key="--split",
                          against=f"checkpoint {checkpoint}")
    trained = (model.img_size[0], model.window_size[0] if hasattr(model, "window_size") else None)
    if sizes is None:
        sizes = [trained]
    if trained[1] is not None and any(window is None for _, window in sizes):
        raise UserError("--img-size and --window-size go together")  # only a ViT has no window
    rows = []
    for img_size, window in sizes:
        moved = model if (img_size, window) in (trained, (trained[0], None)) else at_size(model, img_size, window)
        tf = eval_transform(img_size, meta.get("crop_pct", 0.875), meta.get("interpolation", "bicubic"),
                            meta["mean"], meta["std"], channels=model.in_chans)
        loader = DataLoader(LabeledDataset(source, tf), batch_size=batch_size, num_workers=num_workers)
        metrics = evaluate(moved, loader)
        windows = getattr(moved, "effective_window_sizes", [])  # a ViT attends globally: no windows
        rows.append({"img_size": img_size, "window": window if windows else None,
                     "windows": "/".join(str(w[0]) for w in windows) or "-", **metrics})
    return rows


def check_stage(stage: int, stages: int, model: str, what: str = "stage", key: str = "--stage") -> None:
    """Refuse a ``--stage`` the encoder does not have: 0..stages-1, or counted from the last (-1 = the last);
    ``what`` is what it counts (a ViT's blocks)."""
    if not -stages <= stage < stages:
        raise UserError(f"{key} {stage} is not a {what} of {model}, which has {stages}: use 0..{stages - 1}, or -1 "
                        "for the last")


def probe_stage(name: str, encoder: nn.Module, stage: int | None, key: str = "--stage") -> int:
    """The probed stage (Swin) or block (ViT, 0-based) index: ``stage`` checked against ``encoder``, or the
    family's default when None (Swin: the last stage; ViT: block depth * 2 // 3 - 1, the SimMIM paper's 8th of 12)."""
    what, count, default = probe_points(name, encoder)
    if stage is None:
        return default
    check_stage(stage, count, name, what, key)
    return stage


def probe_checkpoint(checkpoint: str | Path, data: str, stage: int | None = None, k: int = 20,
                     linear_probe: bool = True, batch_size: int = 64, num_workers: int = 0,
                     model_name: str | None = None, build_size: tuple[int, int | None] | None = None
                     ) -> dict[str, float]:
    """k-NN (and linear-probe) top-1 of a checkpoint's frozen encoder on ``data`` (train split fits, val scores),
    on the pooled features of ``stage`` (see :func:`probe_stage`; None = the family's default)."""
    model, meta = load_for_eval(checkpoint, model_name, *(build_size or (None, None)))
    name = meta.get("model") or model_name
    monitor = FeatureMonitor(data, model.img_size[0], meta["mean"], meta["std"],
                             stage=probe_stage(name, model, stage), k=k, batch_size=batch_size,
                             num_workers=num_workers)
    return monitor(model, linear_probe=linear_probe)


def format_table(rows: list[dict]) -> str:
    """The paper-style table: one row per (img_size, window)."""
    lines = [f"{'img_size':>8}  {'window':>6}  {'stage windows':<14} {'top-1':>7}  {'top-5':>7}  {'images':>7}"]
    for r in rows:
        window = "-" if r["window"] is None else f"W{r['window']}"
        lines.append(f"{r['img_size']:>8}  {window:>6}  {r['windows']:<14} {r['top1']:>7.2f}  "
                     f"{r['top5']:>7.2f}  {r['count']:>7}")
    return "\n".join(lines)
