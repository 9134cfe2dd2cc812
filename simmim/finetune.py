"""Fine-tuning a pretrained SwinV2 encoder as a classifier, at a new image size and window size.

The pretrained windows (what the log-CPB MLP was trained at) come from the checkpoint: our run checkpoints and
exported cards record them; official checkpoints carry them in their saved ``relative_coords_table`` buffers; a
bare timm file needs ``model.pretrained_window_sizes``. The loop is :mod:`simmim.engine`, shared with pretraining.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from simmim.checkpoint import CheckpointManager
from simmim.config import FinetuneConfig, save_config, to_dict
from simmim.data.labeled import LabeledDataset, open_labeled
from simmim.data.sampler import EpochSampler
from simmim.data.transforms import eval_transform, finetune_transform
from simmim.engine import Engine, LoopSettings, start_run
from simmim.models import SwinTransformerV2, create_model
from simmim.models.convert import convert_state_dict, load_pretrained, read_checkpoint, unwrap
from simmim.optim import param_groups
from simmim.plan import build_optimization, plan_training
from simmim.weights import geometry_metadata, trained_windows

log = logging.getLogger(__name__)

Pair = tuple[int, int]
_DROP = ("mask_token", "decoder.", "head.")


# ----------------------------------------------------------------------------------------------------------------
# pretrained weights and the windows they were trained at


def windows_from_coords_tables(state_dict: dict[str, torch.Tensor]) -> list[Pair] | None:
    """Recover each stage's CPB normalisation window from the ``relative_coords_table`` buffers that official
    checkpoints save: the table spans offsets up to W-1 and its largest value is log2(1 + 8 (W-1)/(P-1)) / 3."""
    out = []
    for i in range(8):
        table = next((v for k, v in state_dict.items()
                      if k.removeprefix("encoder.").startswith(f"layers.{i}.blocks.0.") and
                      k.endswith("relative_coords_table")), None)
        if table is None:
            break
        pair = []
        for axis in (0, 1):
            window = (table.shape[1 + axis] + 1) // 2
            top = float(table[..., axis].max())
            pair.append(window if window == 1 or top <= 0 else
                        round(8 * (window - 1) / (2 ** (3 * top) - 1)) + 1)
        out.append(tuple(pair))
    return out or None


@dataclass
class PretrainedWeights:
    state_dict: dict[str, torch.Tensor]  # encoder keys (ours = timm), no head / mask token / decoder
    windows: list[Pair] | None  # the windows the CPB MLP was trained at; None when the file does not say
    source: str
    meta: dict = field(default_factory=dict)


def _read_hf_directory(path: Path) -> PretrainedWeights:
    """A transformers ``Swinv2*`` directory (``config.json`` + ``model.safetensors``), e.g. our hf export."""
    from safetensors.torch import load_file

    from simmim.models.hf import hf_to_ours
    from simmim.models.swin_transformer_v2 import stage_geometry, to_pair

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "swinv2":
        raise ValueError(f"{path} holds a {config.get('model_type')!r} model, not swinv2")
    sd = hf_to_ours(load_file(str(path / "model.safetensors")))
    geometry = stage_geometry(to_pair(config["image_size"]), config["patch_size"], len(config["depths"]),
                              to_pair(config["window_size"]))
    windows = [to_pair(p) if p else win for p, (_, win) in zip(config["pretrained_window_sizes"], geometry,
                                                               strict=True)]
    return PretrainedWeights({k: v for k, v in sd.items() if not k.startswith(_DROP)}, windows,
                             f"{path} (transformers Swinv2)", {})


def read_pretrained(path: str | Path) -> PretrainedWeights:
    """Read encoder weights from one of our run checkpoints, an exported ``.safetensors`` (+ card), a transformers
    ``Swinv2`` directory, an official SimMIM / classification checkpoint or a timm file."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _read_hf_directory(path)
    raw = read_checkpoint(path)
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    card = path.with_name(path.name + ".json")  # simmim export writes x.safetensors.json
    if not meta and card.is_file():
        meta = json.loads(card.read_text())
    sd = unwrap(raw)
    windows = trained_windows(meta) if "effective_window_sizes" in meta else windows_from_coords_tables(sd)
    sd = convert_state_dict(sd)
    if any(k.startswith("encoder.") for k in sd):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROP)}
    kind = meta.get("kind", "official/timm")
    return PretrainedWeights(sd, windows, f"{path} ({kind})", meta)


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> tuple[SwinTransformerV2, PretrainedWeights | None]:
    """The classifier at the fine-tuning geometry, with pretrained encoder weights and a new head."""
    m = cfg.model
    weights = read_pretrained(cfg.pretrained) if cfg.pretrained else None
    windows: Any = m.pretrained_window_sizes
    if windows is None and weights is not None:
        if weights.windows is None:
            raise ValueError(f"cannot tell which window sizes {cfg.pretrained} was trained at (a timm file has no "
                             "metadata); set model.pretrained_window_sizes, e.g. [12,12,12,6] for 192 px / W12")
        windows = weights.windows
    model = create_model(m.name, img_size=m.img_size, window_size=m.window_size, num_classes=num_classes,
                         pretrained_window_sizes=windows, drop_path_rate=m.drop_path_rate, in_chans=m.in_chans)
    if weights is not None:  # every encoder key must match: a silent partial load is refused
        load_pretrained(model, weights.state_dict, source="timm", exclude=["head."])
        log.info("loaded %s; pretrained windows %s -> effective windows %s at %d px", weights.source,
                 [w[0] for w in model.pretrained_window_sizes], [w[0] for w in model.effective_window_sizes],
                 m.img_size)
    model.set_recompute("full" if m.grad_checkpointing else m.recompute)
    model.set_sequential_attention(m.sequential_attention)
    return model, weights


# ----------------------------------------------------------------------------------------------------------------
# evaluation


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


# ----------------------------------------------------------------------------------------------------------------
# the task the engine runs


class FinetuneTask:
    """Mixup/CutMix + soft-target loss for training; evaluation, best checkpoint and EMA at epoch ends."""

    def __init__(self, cfg: FinetuneConfig, num_classes: int, accelerator: Accelerator, val_loader: Any,
                 eval_every: int, total_steps: int) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        x = cfg.mixup
        self.mixup = None
        if x.mixup > 0 or x.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=x.mixup, cutmix_alpha=x.cutmix, prob=x.prob, switch_prob=x.switch_prob,
                               label_smoothing=x.label_smoothing, num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif x.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(x.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.acc, self.val_loader, self.eval_every, self.total_steps = accelerator, val_loader, eval_every, total_steps
        self.ema_cfg, self.ema = cfg.ema, None
        self.best_top1, self.last_metrics = -1.0, {}
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        if self.ema_cfg.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.acc.unwrap_model(engine.model), decay=self.ema_cfg.decay)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)  # labels become soft (B, num_classes)
        logits = model(images)
        return self.criterion(logits, labels), logits

    def log_images(self, model: nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    def on_step(self, step: int) -> None:
        assert self.engine is not None
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(self.engine.model), step=step)
        if step % self.eval_every and step != self.total_steps:
            return
        metrics = {f"val/{k}": v for k, v in evaluate(self.engine.model, self.val_loader, self.acc).items()}
        if self.ema is not None:
            ema_metrics = evaluate(self.ema.module.to(self.acc.device), self.val_loader, self.acc)
            metrics.update({f"val_ema/{k}": v for k, v in ema_metrics.items()})
        self.acc.log({k: v for k, v in metrics.items() if not k.endswith("count")}, step=step)
        log.info("step %d: val top-1 %.2f top-5 %.2f loss %.4f (%d images)%s", step, metrics["val/top1"],
                 metrics["val/top5"], metrics["val/loss"], metrics["val/count"],
                 f"; EMA top-1 {metrics['val_ema/top1']:.2f}" if self.ema is not None else "")
        self.last_metrics = metrics
        if metrics["val/top1"] > self.best_top1:
            self.best_top1 = metrics["val/top1"]
            self.engine.metadata["best_top1"] = self.best_top1
            self.engine.metadata["best_step"] = step
            self.engine.save(name="best")

    def extra_state(self) -> dict:
        state: dict = {"best_top1": self.best_top1}
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        self.best_top1 = state.get("best_top1", -1.0)
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])


# ----------------------------------------------------------------------------------------------------------------
# run


def build_data(cfg: FinetuneConfig, seed: int) -> tuple[LabeledDataset, LabeledDataset, list[str]]:
    d = cfg.data
    if not d.path:
        raise ValueError("no training data: pass --data PATH (an ImageNet-style folder with train/ and val/, a "
                         "datasets save_to_disk folder, hf:NAME or embedded:digits) or set data.path")
    train_src = open_labeled(d.path, d.train_split, d.image_column, d.label_column)
    classes = list(train_src.classes)
    val_src = open_labeled(d.path, d.val_split, d.image_column, d.label_column,
                           classes=classes if hasattr(train_src, "samples") else None)
    size = cfg.model.img_size
    train_tf = finetune_transform(size, d.crop_scale, d.hflip, d.auto_augment, d.color_jitter, d.re_prob,
                                  interpolation=d.interpolation, mean=d.mean, std=d.std)
    val_tf = eval_transform(size, d.crop_pct, d.interpolation, d.mean, d.std)
    return LabeledDataset(train_src, train_tf, seed), LabeledDataset(val_src, val_tf, seed), classes


def finetune_metadata(cfg: FinetuneConfig, model: SwinTransformerV2, classes: list[str],
                      weights: PretrainedWeights | None) -> dict:
    return {
        "kind": "simmim-finetune",
        **geometry_metadata(model, cfg.model.name),
        "num_classes": model.num_classes,
        "classes": classes,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "crop_pct": cfg.data.crop_pct,
        "interpolation": cfg.data.interpolation,
        "pretrained_from": weights.source if weights else None,
        "config": to_dict(cfg),
    }


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured. Returns a summary (steps, best/last top-1, output paths)."""
    out, accelerator, resume = start_run(cfg.run.output, cfg.run.mixed_precision, cfg.run.resume, cfg.run.seed)
    train_ds, val_ds, classes = build_data(cfg, cfg.run.seed)
    num_classes = cfg.model.num_classes or len(classes)
    model, weights = build_classifier(cfg, num_classes)

    d, o = cfg.data, cfg.optim
    if len(train_ds) < d.batch_size * accelerator.num_processes:
        raise ValueError(f"the training split has {len(train_ds)} images, fewer than one global batch of "
                         f"{d.batch_size * accelerator.num_processes}; lower data.batch_size")
    train_loader = DataLoader(train_ds, batch_size=d.batch_size, sampler=EpochSampler(len(train_ds), cfg.run.seed),
                              num_workers=d.num_workers, drop_last=True)
    val_loader = DataLoader(val_ds, batch_size=d.batch_size, num_workers=d.num_workers)
    plan = plan_training(cfg.schedule, o, d.batch_size, accelerator.num_processes,
                         len(train_loader) // accelerator.num_processes)
    total_steps = plan.total_steps
    eval_every = cfg.run.eval_every or max(round(plan.steps_per_epoch), 1)
    groups = param_groups(model, o.weight_decay, o.layer_decay, depths=model.depths)
    optimizer, scheduler = build_optimization(groups, cfg.schedule, o, plan)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("tensorboard")
    log.info("fine-tuning %s at %dpx W%d on %d classes (%d train / %d val images): %d steps, global batch %d, "
             "lr %.3e, layer decay %.2f", cfg.model.name, cfg.model.img_size, cfg.model.window_size, num_classes,
             len(train_ds), len(val_ds), total_steps, plan.global_batch, plan.lr,
             o.layer_decay)

    r = cfg.run
    task = FinetuneTask(cfg, num_classes, accelerator, val_loader, eval_every, total_steps)
    engine = Engine(
        accelerator, task, model, optimizer, scheduler, train_loader,
        CheckpointManager(out / "checkpoints", keep_last=r.keep_last),
        LoopSettings(total_steps=total_steps, accumulation_steps=o.accumulation_steps, clip_grad=o.clip_grad,
                     log_every=r.log_every, image_every=0, save_every=r.save_every, max_bad_steps=r.max_bad_steps,
                     seed=r.seed, progress=r.progress),
        metadata=finetune_metadata(cfg, accelerator.unwrap_model(model), classes, weights),
        on_step=task.on_step)
    task.attach(engine)
    if resume is not None:
        engine.resume(resume)
    state = engine.fit()
    accelerator.end_training()
    return {
        "steps": state.step,
        "first_loss": state.first_loss,
        "last_loss": state.last_loss,
        "best_top1": task.best_top1,
        "last_top1": task.last_metrics.get("val/top1", math.nan),
        "last_top5": task.last_metrics.get("val/top5", math.nan),
        "output": str(out),
        "checkpoint": str(engine.checkpoints.path_for(state.step)),
        "best_checkpoint": str(engine.checkpoints.directory / "best.pt"),
        "main_process": accelerator.is_main_process,
        "skipped_files": state.skipped_files,
    }
