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
from torch import nn
from torch.utils.data import DataLoader

from simmim.config import PretrainConfig, to_dict
from simmim.data import (
    MaskedImageDataset,
    MaskedImageStream,
    MaskGenerator,
    make_loader,
    open_source,
    pretrain_transform,
)
from simmim.engine import Engine, LoopSettings, StepResult, TrainState
from simmim.errors import UserError
from simmim.evaluate import probe_stage
from simmim.masked_modeling import SimMIM, normalize_target
from simmim.models import FAMILIES, compile_model
from simmim.models.convert import encoder_state, load_pretrained
from simmim.models.encoders import make_encoder
from simmim.monitor import FeatureMonitor
from simmim.optim import build_optimization, optimizer_state_bytes, param_groups, plan_training, shard_state
from simmim.run_dir import check_stream_layout, open_run, start_run
from simmim.signals import stops_on_signals
from simmim.visualize import reconstruction_grid
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


def build_encoder(cfg: PretrainConfig, init: Weights | None = None) -> nn.Module:
    """The encoder (any family of the contract) at the pretraining geometry. With ``init``, a SwinV2's log-CPB is
    normalised by the windows the source was trained at (as in fine-tuning), unless
    ``model.pretrained_window_sizes`` says otherwise."""
    m = cfg.model
    return make_encoder(m.name, img_size=m.img_size, window_size=m.window_size, num_classes=0,
                        pretrained_window_sizes=start_windows(init, m.pretrained_window_sizes),
                        drop_path_rate=m.drop_path_rate, in_chans=m.in_chans, recompute=m.recompute,
                        sequential_attention=m.sequential_attention, linear_backend=m.linear_backend)


def load_init(model: SimMIM, init: Weights) -> list[str]:
    """Warm start ``model`` from ``init``: the encoder always (every key must match), the mask token and the
    decoder when the source has them with the same shapes (a SimMIM checkpoint), else they stay freshly
    initialised. Returns what was loaded, in words."""
    encoder = encoder_state(init.state_dict, keep=("mask_token",))
    encoder = FAMILIES[model.encoder.geometry()["family"]].convert(encoder, model.encoder)  # e.g. Swin V1 tables
    has_token = "mask_token" in encoder and encoder["mask_token"].shape == model.encoder.mask_token.shape
    if not has_token:
        encoder.pop("mask_token", None)
    load_pretrained(model.encoder, encoder, source="timm", exclude=[] if has_token else ["mask_token"])
    loaded = ["encoder"] + (["mask token"] if has_token else [])
    decoder = {k.removeprefix("decoder."): v for k, v in init.state_dict.items() if k.startswith("decoder.")}
    own = model.decoder.state_dict()
    if decoder.keys() == own.keys() and all(v.shape == own[k].shape for k, v in decoder.items()):
        model.decoder.load_state_dict(decoder)
        loaded.append("decoder")
    elif decoder:
        log.warning("the decoder of %s does not fit this model (%s vs %s): it starts fresh", init.path,
                    {k: tuple(v.shape) for k, v in decoder.items()}, {k: tuple(v.shape) for k, v in own.items()})
    return loaded


def build_dataset(cfg: PretrainConfig, patch_size: int, rank: int = 0, world_size: int = 1
                  ) -> MaskedImageDataset | MaskedImageStream:
    """The masked-image dataset; raises before training for a missing/empty/unreadable source or bad mask
    geometry. A stream is sharded over ``world_size`` processes (this one is ``rank``) and never ends."""
    d = cfg.data
    if not d.path:
        raise UserError("no training data: pass --data PATH (a folder of images, tar shards, parquet files, a datasets "
                         "save_to_disk folder, hf:NAME or embedded) or set data.path")
    masks = MaskGenerator(cfg.model.img_size, d.mask_patch_size, patch_size, d.mask_ratio)
    channels = cfg.model.in_chans
    transform = pretrain_transform(cfg.model.img_size, scale=d.crop_scale, mean=d.mean, std=d.std, channels=channels)
    source = open_source(d.path, split=d.split, streaming=d.streaming, image_column=d.image_column,
                         channels=channels)
    if getattr(source, "is_streaming", False):
        return MaskedImageStream(source, transform, masks, seed=cfg.run.seed, rank=rank, world_size=world_size,
                                 batch_size=d.batch_size, endless=True, shuffle_buffer=d.shuffle_buffer)
    return MaskedImageDataset(source, transform, masks, seed=cfg.run.seed)


def build_loader(cfg: PretrainConfig, dataset: Any, accelerator: Any) -> DataLoader:
    """The training loader. A map-style dataset is checked against one global batch and later sharded by
    ``accelerator.prepare``; a stream shards itself, so it only gets accelerate's device placement here."""
    d = cfg.data
    pin = accelerator.device.type == "cuda"
    if isinstance(dataset, MaskedImageStream):
        from accelerate.data_loader import prepare_data_loader

        loader = make_loader(dataset, d.batch_size, d.num_workers, seed=cfg.run.seed, pin_memory=pin)
        return prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=True, dispatch_batches=False)
    global_batch = d.batch_size * accelerator.num_processes
    if len(dataset) < global_batch:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch of {global_batch} "
                         f"(data.batch_size {d.batch_size} x {accelerator.num_processes} processes); lower "
                         "data.batch_size")
    return make_loader(dataset, d.batch_size, d.num_workers, seed=cfg.run.seed, pin_memory=pin)


@dataclass
class PretrainTask:
    """The engine's view of SimMIM: loss, reconstruction grids and (optionally) k-NN / linear-probe monitoring."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    monitor: FeatureMonitor | None = None
    monitor_every: int = 0
    main_process: bool = True
    last_monitor: dict = field(default_factory=dict)

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
        channels = images.shape[1]
        grid = reconstruction_grid(target, batch["mask"], pred, mean=(0.5,) * channels, std=(0.25,) * channels,
                                   max_images=4)
        return {"reconstruction_normalized_target": grid}

    def after_step(self, step: int, model: torch.nn.Module, final: bool) -> StepResult | None:
        """Probe the encoder's frozen features every ``monitor_every`` steps and at the end (main process)."""
        due = (self.monitor_every and step % self.monitor_every == 0) or final
        if self.monitor is None or not due or not self.main_process:
            return None
        encoder = getattr(model, "module", model).encoder
        self.last_monitor = self.monitor(encoder)
        log.info("step %d: %s", step, ", ".join(f"{k.split('/')[1]} {100 * v:.2f}" for k, v in
                                                self.last_monitor.items()))
        return StepResult(metrics=self.last_monitor)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def stream_layout(cfg: PretrainConfig, accelerator: Any) -> dict:
    """What a stream's position depends on: it resumes exactly only with the same layout."""
    return {"processes": accelerator.num_processes, "num_workers": cfg.data.num_workers,
            "batch_size": cfg.data.batch_size, "accumulation_steps": cfg.optim.accumulation_steps}


def checkpoint_metadata(cfg: PretrainConfig, encoder: nn.Module, init: dict | None = None) -> dict:
    """What fine-tuning and export need to know about the pretrained encoder (plain data); ``init`` describes
    the weights a warm start began from."""
    return {
        "kind": "simmim-pretrain",
        **geometry_metadata(encoder, cfg.model.name),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "init": init,
        "config": to_dict(cfg),
    }


@stops_on_signals  # SIGTERM/SIGINT: finish the step, save, exit 128 + signal
def run(cfg: PretrainConfig, overwrite: bool = False) -> dict:
    """Pretrain as configured. Returns a summary (steps, first/last loss, output paths).

    Everything that can be wrong with the inputs (output directory, resume checkpoint, data, sizes) is checked
    before anything is written; ``overwrite`` replaces another run found in ``run.output``.
    """
    r, o = cfg.run, cfg.optim
    with start_run(r.output, r.mixed_precision, r.resume, r.seed, o.accumulation_steps, overwrite,
                   model_name=cfg.model.name, data=cfg.data.path, threads=r.threads,
                   workers=cfg.data.num_workers) as start:
        accelerator, out = start.accelerator, start.out
        init = None
        if cfg.init and start.resume is None:  # a resumed run has its warm start in its weights already
            init = read_weights(cfg.init)
            check_channels(init, cfg.model.in_chans)
            check_variant(init, cfg.model.name)
        elif cfg.init:
            log.info("resuming: init=%s was applied when the run started (%s)", cfg.init,
                     (start.resume.meta.get("init") or {}).get("path"))
        encoder = build_encoder(cfg, init)
        dataset = build_dataset(cfg, encoder.patch_size, accelerator.process_index, accelerator.num_processes)
        loader = build_loader(cfg, dataset, accelerator)
        stream = isinstance(dataset, MaskedImageStream)
        if stream and start.resume is not None:
            check_stream_layout(start.resume.meta.get("stream"), stream_layout(cfg, accelerator))
        monitor = None
        if cfg.monitor.data:  # labelled data for k-NN / linear-probe monitoring, opened now so a bad path fails early
            stage = probe_stage(cfg.model.name, encoder, cfg.monitor.stage, key="monitor.stage")
            monitor = FeatureMonitor(cfg.monitor.data, cfg.monitor.img_size or cfg.model.img_size, cfg.data.mean,
                                     cfg.data.std, stage=stage, k=cfg.monitor.knn_k)

        batches = None if stream else len(loader) // accelerator.num_processes
        plan = plan_training(cfg.schedule, o, cfg.data.batch_size, accelerator.num_processes, batches)
        model = SimMIM(encoder, norm_target=cfg.simmim.norm_target,
                       norm_target_window=cfg.simmim.norm_target_window)
        init_meta = start.resume.meta.get("init") if start.resume is not None else None
        if init is not None:
            loaded = load_init(model, init)
            init_meta = {"path": str(init.path.resolve()), "sha256": sha256(init.path), "source": init.source,
                         "kind": init.kind, "loaded": loaded,
                         "pretrained_window_sizes": [list(w) for w in getattr(encoder, "pretrained_window_sizes",
                                                                              [])]}
        if r.compile:  # one graph per mode at the fixed size; state_dict keys do not change
            compile_model(model)
        shard = shard_state(o, accelerator.num_processes, accelerator.distributed_type)  # ZeRO stage 1
        if shard:  # ZeRO takes its device from the parameters: place them first
            model.to(accelerator.device)
        optimizer, scheduler = build_optimization(param_groups(model, o.weight_decay), cfg.schedule, o, plan, shard)
        # accelerate's placement of an optimizer reads its whole state, which a sharded one does not have
        if stream:
            model, optimizer = accelerator.prepare(model, optimizer, device_placement=[True, not shard])
        else:
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader,
                                                           device_placement=[True, not shard, True])

        window = f" W{cfg.model.window_size}" if hasattr(encoder, "window_size") else ""  # a ViT has none
        log.info("pretraining %s at %dpx%s: %d steps, global batch %d, lr %.3e, %d processes, %s precision",
                 cfg.model.name, cfg.model.img_size, window, plan.total_steps, plan.global_batch,
                 plan.lr, accelerator.num_processes, r.mixed_precision)
        if init is not None:
            log.info("warm start from %s: %s loaded; pretrained windows %s; fresh optimizer and schedule",
                     init.describe(), ", ".join(init_meta["loaded"]),
                     "/".join(str(w[0]) for w in getattr(encoder, "pretrained_window_sizes", [])) or "-")
        task = PretrainTask(cfg.data.mean, cfg.data.std, monitor=monitor, monitor_every=cfg.monitor.every,
                            main_process=accelerator.is_main_process)
        engine = Engine(
            accelerator, task, model, optimizer, scheduler, loader,
            start.checkpoints(r.keep_last, r.async_save),
            LoopSettings(total_steps=plan.total_steps, clip_grad=o.clip_grad, log_every=r.log_every,
                         image_every=r.image_every, save_every=r.save_every, max_bad_steps=r.max_bad_steps,
                         seed=r.seed, progress=r.progress, peak_flops=r.peak_flops),
            metadata={**checkpoint_metadata(cfg, encoder, init_meta),
                      "stream": stream_layout(cfg, accelerator) if stream else None},
            image_dir=out / "images", record=start.record)
        if start.resume is not None:  # a resumed state that does not fit is refused before anything is written
            engine.resume(start.resume)

        open_run(start, cfg, overwrite)
        state: TrainState = engine.fit()
        accelerator.end_training()
    return {
        "steps": state.step,
        "first_loss": state.first_loss,
        "last_loss": state.last_loss,
        "skipped_steps": state.skipped_steps,
        "skipped_files": state.skipped_files,
        "output": str(out),
        "checkpoint": str(engine.checkpoints.newest(state.step)),
        "finite": state.last_loss is not None and math.isfinite(state.last_loss),
        "main_process": accelerator.is_main_process,
        "monitor": task.last_monitor,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),  # this process's share (optim.shard_state)
    }
