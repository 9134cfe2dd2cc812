"""Fine-tuning a pretrained SwinV2 encoder as a classifier, at a new image size and window size.

The pretrained windows (what the log-CPB MLP was trained at) come from the checkpoint: our run checkpoints and
exported cards record them; official checkpoints carry them in their saved ``relative_coords_table`` buffers; a
bare timm file needs ``model.pretrained_window_sizes``. The loop is :mod:`simmim.engine`, shared with pretraining.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from simmim.config import FinetuneConfig, to_dict
from simmim.data import make_loader
from simmim.data.labeled import LabeledDataset, check_class_count, check_classes, open_labeled
from simmim.data.transforms import eval_transform, finetune_transform
from simmim.engine import Engine, LoopSettings, StepResult
from simmim.errors import UserError
from simmim.evaluate import evaluate
from simmim.models import compile_model
from simmim.models.convert import load_pretrained
from simmim.models.encoders import family_of, make_encoder
from simmim.optim import build_optimization, param_groups, plan_training, shard_state
from simmim.run_dir import open_run, start_run
from simmim.signals import stops_on_signals
from simmim.weights import (
    Weights,
    check_channels,
    check_variant,
    geometry_metadata,
    read_weights,
    sha256,
    start_windows,
)

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------------------------
# the classifier


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, Weights | None]:
    """The classifier (any encoder family) at the fine-tuning geometry, with pretrained encoder weights and a new
    head. The family's conversion adapts the weights to the new geometry (Swin V1: position tables resized)."""
    m = cfg.model
    weights = read_weights(cfg.pretrained) if cfg.pretrained else None
    if weights is not None:
        check_channels(weights, m.in_chans)
        check_variant(weights, m.name)
    model = make_encoder(m.name, img_size=m.img_size, window_size=m.window_size, num_classes=num_classes,
                         pretrained_window_sizes=start_windows(weights, m.pretrained_window_sizes),
                         drop_path_rate=m.drop_path_rate, in_chans=m.in_chans, recompute=m.recompute,
                         sequential_attention=m.sequential_attention, linear_backend=m.linear_backend)
    if weights is not None:  # every encoder key must match: a silent partial load is refused
        state = family_of(m.name).convert(weights.encoder(), model)
        load_pretrained(model, state, source="timm", exclude=["head."])
        log.info("loaded %s; pretrained windows %s -> effective windows %s at %d px", weights.describe(),
                 [w[0] for w in getattr(model, "pretrained_window_sizes", [])],
                 [w[0] for w in getattr(model, "effective_window_sizes", [])], m.img_size)
    return model, weights


# ----------------------------------------------------------------------------------------------------------------
# the task the engine runs


class FinetuneTask:
    """Mixup/CutMix + soft-target loss for training; EMA updates, evaluation and the best checkpoint after steps."""

    def __init__(self, cfg: FinetuneConfig, num_classes: int, accelerator: Accelerator, model: nn.Module,
                 val_loader: Any, eval_every: int) -> None:
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
        self.acc, self.val_loader, self.eval_every = accelerator, val_loader, eval_every
        self.best_top1, self.last_metrics = -1.0, {}
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema.decay)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)  # labels become soft (B, num_classes)
        logits = model(images)
        return self.criterion(logits, labels), logits

    def log_images(self, model: nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, step: int, model: nn.Module, final: bool) -> StepResult | None:
        """Update the EMA; every ``eval_every`` steps and at the end, evaluate (and ask for ``best.pt``)."""
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(model), step=step)
        if step % self.eval_every and not final:
            return None
        metrics = {f"val/{k}": v for k, v in evaluate(model, self.val_loader, self.acc).items()}
        if self.ema is not None:
            ema_metrics = evaluate(self.ema.module.to(self.acc.device), self.val_loader, self.acc)
            metrics.update({f"val_ema/{k}": v for k, v in ema_metrics.items()})
        log.info("step %d: val top-1 %.2f top-5 %.2f loss %.4f (%d images)%s", step, metrics["val/top1"],
                 metrics["val/top5"], metrics["val/loss"], metrics["val/count"],
                 f"; EMA top-1 {metrics['val_ema/top1']:.2f}" if self.ema is not None else "")
        self.last_metrics = metrics
        result = StepResult(metrics={k: v for k, v in metrics.items() if not k.endswith("count")})
        if metrics["val/top1"] > self.best_top1:
            self.best_top1 = metrics["val/top1"]
            result.save_as, result.meta = "best", {"best_top1": self.best_top1, "best_step": step}
        return result

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
        raise UserError("no training data: pass --data PATH (an ImageNet-style folder with train/ and val/, a "
                         "datasets save_to_disk folder, hf:NAME or embedded:digits) or set data.path")
    channels = cfg.model.in_chans
    train_src = open_labeled(d.path, d.train_split, d.image_column, d.label_column, channels=channels,
                             split_key="data.train_split")
    classes = list(train_src.classes)
    check_class_count(classes, f"the training data {d.path}")
    val_src = open_labeled(d.path, d.val_split, d.image_column, d.label_column, classes=classes, channels=channels,
                           split_key="data.val_split")
    size = cfg.model.img_size
    train_tf = finetune_transform(size, d.crop_scale, d.hflip, d.auto_augment, d.color_jitter, d.re_prob,
                                  interpolation=d.interpolation, mean=d.mean, std=d.std, channels=channels)
    val_tf = eval_transform(size, d.crop_pct, d.interpolation, d.mean, d.std, channels=channels)
    return LabeledDataset(train_src, train_tf, seed), LabeledDataset(val_src, val_tf, seed), classes


def check_resume_classes(resume: Weights | None, classes: list[str], data: str) -> None:
    """A resumed fine-tune must train on the classes its head was trained on, in the same order: otherwise the
    head would be silently relabelled and the best top-1 compared across two tasks. Refuses naming the classes
    that differ (the check ``eval`` makes)."""
    trained = resume.meta.get("classes") if resume is not None else None
    if trained is None:
        return
    check_classes(classes, list(trained), f"the data {data}", f"resume checkpoint {resume.path}",
                  "resume on the data the run was trained on, or fine-tune into a new --output")


def finetune_metadata(cfg: FinetuneConfig, model: nn.Module, classes: list[str],
                      weights: Weights | None) -> dict:
    return {
        "kind": "simmim-finetune",
        **geometry_metadata(model, cfg.model.name),
        "num_classes": model.num_classes,
        "classes": classes,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "crop_pct": cfg.data.crop_pct,
        "interpolation": cfg.data.interpolation,
        "pretrained_from": weights.describe() if weights else None,
        "pretrained_sha256": sha256(weights.path) if weights else None,
        "config": to_dict(cfg),
    }


@stops_on_signals  # SIGTERM/SIGINT: finish the step, save, exit 128 + signal
def run(cfg: FinetuneConfig, overwrite: bool = False) -> dict:
    """Fine-tune as configured. Returns a summary (steps, best/last top-1, output paths). Inputs are checked
    before anything is written; ``overwrite`` replaces another run found in ``run.output``."""
    r, d, o = cfg.run, cfg.data, cfg.optim
    with start_run(r.output, r.mixed_precision, r.resume, r.seed, o.accumulation_steps, overwrite,
                   model_name=cfg.model.name, data=d.path, threads=r.threads,
                   workers=cfg.data.num_workers) as start:
        accelerator, out = start.accelerator, start.out
        train_ds, val_ds, classes = build_data(cfg, r.seed)
        check_resume_classes(start.resume, classes, d.path)
        num_classes = cfg.model.num_classes or len(classes)
        model, weights = build_classifier(cfg, num_classes)

        if len(train_ds) < d.batch_size * accelerator.num_processes:
            raise UserError(f"the training split has {len(train_ds)} images, fewer than one global batch of "
                             f"{d.batch_size * accelerator.num_processes}; lower data.batch_size")
        pin = accelerator.device.type == "cuda"
        train_loader = make_loader(train_ds, d.batch_size, d.num_workers, seed=r.seed, pin_memory=pin)
        val_loader = make_loader(val_ds, d.batch_size, d.num_workers, shuffle=False, drop_last=False, pin_memory=pin)
        plan = plan_training(cfg.schedule, o, d.batch_size, accelerator.num_processes,
                             len(train_loader) // accelerator.num_processes)
        eval_every = r.eval_every or max(round(plan.steps_per_epoch), 1)
        groups = param_groups(model, o.weight_decay, o.layer_decay)
        shard = shard_state(o, accelerator.num_processes, accelerator.distributed_type)  # ZeRO stage 1
        if shard:  # ZeRO takes its device from the parameters: place them first
            model.to(accelerator.device)
        optimizer, scheduler = build_optimization(groups, cfg.schedule, o, plan, shard)
        metadata = finetune_metadata(cfg, model, classes, weights)
        windows = [w[0] for w in getattr(model, "pretrained_window_sizes", [])]
        # accelerate's placement of an optimizer reads its whole state, which a sharded one does not have
        model, optimizer, train_loader, val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader, device_placement=[True, not shard, True, True])

        log.info("fine-tuning %s at %dpx W%d on %d classes (%d train / %d val images): %d steps, global batch %d, "
                 "lr %.3e, layer decay %.2f", cfg.model.name, cfg.model.img_size, cfg.model.window_size,
                 num_classes, len(train_ds), len(val_ds), plan.total_steps, plan.global_batch, plan.lr,
                 o.layer_decay)
        task = FinetuneTask(cfg, num_classes, accelerator, model, val_loader, eval_every)
        if r.compile:  # after the EMA copy is made: a deep copy of a compiled model would call the original
            compile_model(accelerator.unwrap_model(model))
        engine = Engine(
            accelerator, task, model, optimizer, scheduler, train_loader,
            start.checkpoints(r.keep_last, r.async_save),
            LoopSettings(total_steps=plan.total_steps, clip_grad=o.clip_grad, log_every=r.log_every,
                         image_every=0, save_every=r.save_every, max_bad_steps=r.max_bad_steps, seed=r.seed,
                         progress=r.progress, peak_flops=r.peak_flops),
            metadata=metadata)
        if start.resume is not None:  # a resumed state that does not fit is refused before anything is written
            engine.resume(start.resume)

        open_run(start, cfg, overwrite)
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
        "checkpoint": str(engine.checkpoints.newest(state.step)),
        "best_checkpoint": str(engine.checkpoints.directory / "best.pt"),
        "main_process": accelerator.is_main_process,
        "skipped_files": state.skipped_files,
        "pretrained_windows": windows,  # what the log-CPB is normalised by, as read from the checkpoint
        "pretrained_from": weights.describe() if weights else None,
    }
