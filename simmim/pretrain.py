"""SimMIM pretraining: the ``build_*(cfg)`` layer that turns a :class:`PretrainConfig` into objects, and ``run``.

Everything that can be wrong with the inputs (config, data source, sizes, resume path) is checked here before the
first step; the loop itself lives in :mod:`simmim.engine`, shared with fine-tuning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from simmim.checkpoint import CheckpointManager
from simmim.config import PretrainConfig, save_config, to_dict
from simmim.data import (
    MaskedImageDataset,
    MaskedImageStream,
    MaskGenerator,
    open_source,
    pretrain_transform,
)
from simmim.data.sampler import EpochSampler
from simmim.engine import Engine, LoopSettings, TrainState, start_run
from simmim.model import SimMIM, normalize_target
from simmim.models import SwinTransformerV2, create_model
from simmim.monitor import FeatureMonitor
from simmim.optim import param_groups
from simmim.plan import build_optimization, plan_training
from simmim.visualize import reconstruction_grid
from simmim.weights import geometry_metadata

log = logging.getLogger(__name__)


def build_encoder(cfg: PretrainConfig) -> SwinTransformerV2:
    m = cfg.model
    encoder = create_model(m.name, img_size=m.img_size, window_size=m.window_size, num_classes=0,
                           pretrained_window_sizes=m.pretrained_window_sizes, drop_path_rate=m.drop_path_rate,
                           in_chans=m.in_chans)
    encoder.set_recompute("full" if m.grad_checkpointing else m.recompute)
    encoder.set_sequential_attention(m.sequential_attention)
    return encoder


def build_dataset(cfg: PretrainConfig, patch_size: int) -> MaskedImageDataset | MaskedImageStream:
    """The masked-image dataset; raises before training for a missing/empty source or bad mask geometry."""
    d = cfg.data
    if not d.path:
        raise ValueError("no training data: pass --data PATH (a folder of images, a datasets save_to_disk folder, "
                         "hf:NAME or embedded) or set data.path")
    masks = MaskGenerator(cfg.model.img_size, d.mask_patch_size, patch_size, d.mask_ratio)
    transform = pretrain_transform(cfg.model.img_size, scale=d.crop_scale, mean=d.mean, std=d.std)
    source = open_source(d.path, split=d.split, streaming=d.streaming, image_column=d.image_column)
    if getattr(source, "is_streaming", False):
        return MaskedImageStream(source, transform, masks, seed=cfg.run.seed)
    return MaskedImageDataset(source, transform, masks, seed=cfg.run.seed)


def build_loader(cfg: PretrainConfig, dataset: Any, num_processes: int) -> DataLoader:
    d = cfg.data
    if isinstance(dataset, MaskedImageStream):
        return DataLoader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, drop_last=True)
    global_batch = d.batch_size * num_processes
    if len(dataset) < global_batch:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one global batch of {global_batch} "
                         f"(data.batch_size {d.batch_size} x {num_processes} processes); lower data.batch_size")
    sampler = EpochSampler(len(dataset), seed=cfg.run.seed)
    return DataLoader(dataset, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers, drop_last=True,
                      persistent_workers=False)


@dataclass
class PretrainTask:
    """The engine's view of SimMIM: loss, reconstruction grids and (optionally) k-NN / linear-probe monitoring."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    monitor: FeatureMonitor | None = None
    monitor_every: int = 0
    total_steps: int = 0
    accelerator: Any = None
    model: Any = None
    last_monitor: dict = field(default_factory=dict)

    def on_step(self, step: int) -> None:
        """Probe the encoder's frozen features every ``monitor_every`` steps and at the end (main process)."""
        due = (self.monitor_every and step % self.monitor_every == 0) or step == self.total_steps
        if self.monitor is None or not due or not self.accelerator.is_main_process:
            return
        self.last_monitor = self.monitor(self.accelerator.unwrap_model(self.model).encoder)
        self.accelerator.log(self.last_monitor, step=step)
        log.info("step %d: %s", step, ", ".join(f"{k.split('/')[1]} {100 * v:.2f}" for k, v in
                                                self.last_monitor.items()))

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        out = model(batch["image"], batch["mask"])
        return out.loss, out.pred

    def log_images(self, model: torch.nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        images, pred = batch["image"].float(), outputs.detach().float()
        if not model.norm_target:  # the prediction is an image: show it de-normalised beside the input
            return {"reconstruction": reconstruction_grid(images, batch["mask"], pred, self.mean, self.std, 4)}
        # with a normalised target the model predicts local contrast, not pixels: show target and prediction in
        # that space (0.5 + 0.25 * value) rather than borrowing the hidden pixels' statistics to fake an image
        target = normalize_target(images, model.norm_target_window)
        grid = reconstruction_grid(target, batch["mask"], pred, mean=(0.5,) * 3, std=(0.25,) * 3, max_images=4)
        return {"reconstruction_normalized_target": grid}


    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def checkpoint_metadata(cfg: PretrainConfig, encoder: SwinTransformerV2) -> dict:
    """What fine-tuning and export need to know about the pretrained encoder (plain data)."""
    return {
        "kind": "simmim-pretrain",
        **geometry_metadata(encoder, cfg.model.name),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "config": to_dict(cfg),
    }


def run(cfg: PretrainConfig) -> dict:
    """Pretrain as configured. Returns a summary (steps, first/last loss, output paths)."""
    # everything that can fail on bad input, before any heavy work
    out, accelerator, resume = start_run(cfg.run.output, cfg.run.mixed_precision, cfg.run.resume, cfg.run.seed)
    encoder = build_encoder(cfg)
    dataset = build_dataset(cfg, encoder.patch_size)
    loader = build_loader(cfg, dataset, accelerator.num_processes)
    monitor = None
    if cfg.monitor.data:  # labelled data for k-NN / linear-probe monitoring, opened now so a bad path fails early
        monitor = FeatureMonitor(cfg.monitor.data, cfg.monitor.img_size or cfg.model.img_size, cfg.data.mean,
                                 cfg.data.std, stage=cfg.monitor.stage, k=cfg.monitor.knn_k)

    batches = None if isinstance(dataset, MaskedImageStream) else len(loader) // accelerator.num_processes
    plan = plan_training(cfg.schedule, cfg.optim, cfg.data.batch_size, accelerator.num_processes, batches)
    total_steps = plan.total_steps

    model = SimMIM(encoder, norm_target=cfg.simmim.norm_target, norm_target_window=cfg.simmim.norm_target_window)
    o = cfg.optim
    optimizer, scheduler = build_optimization(param_groups(model, o.weight_decay), cfg.schedule, o, plan)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("tensorboard")
    log.info("pretraining %s at %dpx W%d: %d steps, global batch %d, lr %.3e, %d processes, %s precision",
             cfg.model.name, cfg.model.img_size, cfg.model.window_size, total_steps, plan.global_batch, plan.lr,
             accelerator.num_processes, cfg.run.mixed_precision)

    r = cfg.run
    mon = cfg.monitor
    task = PretrainTask(cfg.data.mean, cfg.data.std, monitor=monitor, monitor_every=mon.every,
                        total_steps=total_steps, accelerator=accelerator, model=model)
    engine = Engine(
        accelerator, task, model, optimizer, scheduler, loader,
        CheckpointManager(out / "checkpoints", keep_last=r.keep_last),
        LoopSettings(total_steps=total_steps, accumulation_steps=o.accumulation_steps, clip_grad=o.clip_grad,
                     log_every=r.log_every, image_every=r.image_every, save_every=r.save_every,
                     max_bad_steps=r.max_bad_steps, seed=r.seed, progress=r.progress),
        metadata=checkpoint_metadata(cfg, encoder), image_dir=out / "images", on_step=task.on_step)
    if resume is not None:
        engine.resume(resume)
    state: TrainState = engine.fit()
    accelerator.end_training()
    return {
        "steps": state.step,
        "first_loss": state.first_loss,
        "last_loss": state.last_loss,
        "skipped_steps": state.skipped_steps,
        "skipped_files": state.skipped_files,
        "output": str(out),
        "checkpoint": str(engine.checkpoints.path_for(state.step)),
        "finite": state.last_loss is not None and math.isfinite(state.last_loss),
        "main_process": accelerator.is_main_process,
        "monitor": task.last_monitor,
    }
