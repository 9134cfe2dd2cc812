"""The training engine shared by pretraining and fine-tuning, on top of ``accelerate``.

One optimizer step reads top to bottom: schedule -> forward (per micro-batch) -> backward -> finite check -> clip
-> step -> log -> checkpoint. accelerate owns devices, processes, mixed precision and the TensorBoard tracker.

Determinism: each micro-batch reseeds the global RNG from (seed, micro-batch index, rank), and the data pipeline
draws every sample from (seed, epoch, index), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm

from simmim.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from simmim.data import sample_seed
from simmim.models.convert import check_compatible

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the engine needs from a job (pretraining, fine-tuning)."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        """Forward one micro-batch: (scalar loss, outputs for logging)."""

    def log_images(self, model: nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Image grids to log (``model`` unwrapped), name -> (3, H, W) float in [0, 1]; may be empty."""

    def extra_state(self) -> dict:
        """Task state saved in checkpoints beside the model (e.g. EMA weights, best accuracy); plain data."""

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` on resume."""


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for too many steps in a row."""


@dataclass
class LoopSettings:
    total_steps: int  # optimizer steps of the whole run
    accumulation_steps: int = 1
    clip_grad: float | None = None
    log_every: int = 20
    image_every: int = 1000
    save_every: int = 1000
    max_bad_steps: int = 5
    seed: int = 0
    progress: bool = True


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (including skipped ones: their data was consumed)
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    skipped_files: int = 0  # unreadable inputs replaced by the data pipeline
    first_loss: float | None = None
    last_loss: float | None = None


class Engine:
    """Runs ``task`` for ``settings.total_steps`` optimizer steps with checkpoints in ``checkpoints``.

    ``model``, ``optimizer`` and ``loader`` are already passed through ``accelerator.prepare``; ``scheduler`` is a
    timm scheduler stepped per iteration with ``step_update``. ``metadata`` is stored in every checkpoint.
    """

    def __init__(self, accelerator: Accelerator, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: Any, checkpoints: CheckpointManager, settings: LoopSettings,
                 metadata: dict, image_dir: Path | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.acc, self.task, self.model, self.optimizer = accelerator, task, model, optimizer
        self.scheduler, self.loader, self.checkpoints, self.settings = scheduler, loader, checkpoints, settings
        self.metadata, self.image_dir, self.on_step = metadata, image_dir, on_step
        self.state = TrainState()
        if accelerator.distributed_type == DistributedType.DEEPSPEED and settings.accumulation_steps > 1:
            raise ValueError("under DeepSpeed keep optim.accumulation_steps=1: DeepSpeed steps the optimizer inside "
                             "backward, so accumulate with a larger data.batch_size or more processes")

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _sharded(self) -> bool:
        return self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint (all processes must call; the main process writes). Returns its path on main."""
        weights = self.acc.get_state_dict(self.model)  # a collective under FSDP/DeepSpeed
        path = None
        if self._sharded():  # optimizer shards live in accelerate's own state folder beside our file
            self.acc.save_state(str(self.checkpoints.directory / f"accelerate-{self.state.step:08d}"))
        if self.acc.is_main_process:
            scaler = getattr(self.acc, "scaler", None)
            state = {
                "model": {k: v.detach().cpu() for k, v in weights.items()},
                "optimizer": None if self._sharded() else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": self.state.step,
                "train_state": asdict(self.state),
                "extra": self.task.extra_state(),
                # exactness comes from reseeding every micro-batch; the global RNG state is kept for user code
                "rng": rng_state(),
                "meta": self.metadata,
            }
            path = (self.checkpoints.save_named(state, name) if name
                    else self.checkpoints.save(state, self.state.step))
            log.info("saved checkpoint %s", path)
        self.acc.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, counters and (through the step) the data position."""
        ckpt = load_checkpoint(path)
        model = self.acc.unwrap_model(self.model)
        check_compatible(model, ckpt["model"], what=f"resume checkpoint {path} (was the model config changed?)")
        model.load_state_dict(ckpt["model"])
        accel_dir = self.checkpoints.directory / f"accelerate-{ckpt['step']:08d}"
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        elif accel_dir.is_dir():
            self.acc.load_state(str(accel_dir))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
        self.task.load_extra_state(ckpt.get("extra") or {})
        log.info("resumed from %s at step %d", path, self.state.step)

    # -- data ------------------------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[dict]:
        """Endless micro-batches, starting where ``state.step`` left off (epoch and offset inside it). An epoch
        holds whole optimizer steps: its last ``len % accumulation_steps`` micro-batches are dropped, so B x k
        with accumulation k sees the same samples per step as one batch of k x B."""
        accum = self.settings.accumulation_steps
        try:
            steps_per_epoch = len(self.loader) // accum
        except TypeError:  # a stream: one long epoch
            steps_per_epoch = None
        if steps_per_epoch == 0:
            raise RuntimeError(f"an epoch has {len(self.loader)} batches per process, fewer than "
                               f"optim.accumulation_steps {accum}; lower it or data.batch_size")
        epoch, step_in_epoch = divmod(self.state.step, steps_per_epoch) if steps_per_epoch else (0, self.state.step)
        while True:
            self._set_epoch(epoch)
            offset = step_in_epoch * accum
            loader = self.acc.skip_first_batches(self.loader, offset) if offset else self.loader
            count = offset
            for batch in loader:
                yield batch
                count += 1
                if steps_per_epoch and count == steps_per_epoch * accum:
                    break
            if count == 0:
                raise RuntimeError("the data loader produced no batches; check the data source and batch size")
            epoch, step_in_epoch = epoch + 1, 0

    def _set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        for obj in (getattr(self.loader, "dataset", None), getattr(self.loader, "base_dataloader", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    # -- the loop --------------------------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict]) -> tuple[float, float, bool, dict, Any]:
        """One optimizer step over ``accumulation_steps`` micro-batches. Returns (loss, grad_norm, applied, last
        batch, last outputs); a non-finite loss or gradient skips the update on every process alike."""
        s = self.settings
        self.scheduler.step_update(self.state.step)  # lr of this step: a pure function of the step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(2, device=self.acc.device)  # (loss, unreadable files): reduced once per step
        for i in range(s.accumulation_steps):
            batch = next(batches)
            micro = self.state.step * s.accumulation_steps + i
            set_seed(sample_seed(s.seed, micro, self.acc.process_index) % 2**32)  # drop path, mixup, ...
            last = i == s.accumulation_steps - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model), self.acc.autocast():
                loss, outputs = self.task.loss(self.model, batch)
                self.acc.backward(loss / s.accumulation_steps)
            totals[0] += loss.detach().float() / s.accumulation_steps
            if "skipped" in batch:
                totals[1] += batch["skipped"].sum()
        loss_sum, skipped = self.acc.reduce(totals, "sum").tolist()
        loss_value = loss_sum / self.acc.num_processes
        self.state.skipped_files += int(skipped)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, s.clip_grad or math.inf)  # None under DeepSpeed: it clips itself
        grad_norm = float(norm) if norm is not None else float("nan")
        grads_ok = norm is None or math.isfinite(grad_norm) or self.acc.mixed_precision == "fp16"
        applied = math.isfinite(loss_value) and grads_ok
        if applied:  # under fp16 the grad scaler itself skips overflowing steps and lowers its scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, applied, batch, outputs

    def fit(self) -> TrainState:
        """Train to ``total_steps``; checkpoints every ``save_every`` steps and at the end."""
        s, st = self.settings, self.state
        batches = self._micro_batches()
        bar = tqdm(total=s.total_steps, initial=st.step, disable=not (s.progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        window_loss, window_n, window_imgs, t0 = 0.0, 0, 0, time.perf_counter()
        while st.step < s.total_steps:
            loss, grad_norm, applied, batch, outputs = self.train_step(batches)
            step = st.step = st.step + 1
            if math.isfinite(loss):
                st.bad_in_a_row = 0
                st.first_loss = loss if st.first_loss is None else st.first_loss
                st.last_loss = loss
                window_loss, window_n = window_loss + loss, window_n + 1
            else:
                st.bad_in_a_row += 1
            if not applied:
                st.skipped_steps += 1
                log.warning("step %d: non-finite loss %.4g / grad norm %.4g, update skipped (%d in a row)",
                            step, loss, grad_norm, st.bad_in_a_row)
            if st.bad_in_a_row >= s.max_bad_steps:
                last = self.checkpoints.latest_valid()
                raise NonFiniteLossError(
                    f"the loss was non-finite for {st.bad_in_a_row} steps in a row (step {step}); the last good "
                    f"checkpoint is {last[0] if last else 'none'}. Lower optim.base_lr, raise schedule.warmup_epochs "
                    f"or use run.mixed_precision=bf16/no, then resume with --resume auto")
            window_imgs += len(batch["image"]) * s.accumulation_steps * self.acc.num_processes
            bar.update(1)
            if step % s.log_every == 0 or step == s.total_steps:
                elapsed = time.perf_counter() - t0
                scalars = {
                    "train/loss": window_loss / max(window_n, 1),
                    "train/lr": max(g["lr"] for g in self.optimizer.param_groups),
                    "train/grad_norm": grad_norm,
                    "train/images_per_sec": window_imgs / max(elapsed, 1e-9),
                    "train/skipped_steps": st.skipped_steps,
                    "data/skipped_files": st.skipped_files,
                }
                self.acc.log(scalars, step=step)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}")
                log.info("step %d/%d loss %.4f lr %.3e grad %.3f %.1f img/s skipped steps %d files %d", step,
                         s.total_steps, scalars["train/loss"], scalars["train/lr"], grad_norm,
                         scalars["train/images_per_sec"], st.skipped_steps, st.skipped_files)
                window_loss, window_n, window_imgs, t0 = 0.0, 0, 0, time.perf_counter()
            if (s.image_every and step % s.image_every == 0) or step == s.total_steps:
                self._log_images(step, batch, outputs)
            if self.on_step is not None:
                self.on_step(step)
            if step % s.save_every == 0 or step == s.total_steps:
                self.save()
        bar.close()
        return st

    def _log_images(self, step: int, batch: dict, outputs: Any) -> None:
        if not self.acc.is_main_process:
            return
        from simmim.visualize import save_png

        images = self.task.log_images(self.acc.unwrap_model(self.model), batch, outputs)
        writer = _tensorboard_writer(self.acc)
        for name, grid in images.items():
            if writer is not None:
                writer.add_image(name, grid, step)
            if self.image_dir is not None:
                save_png(grid, self.image_dir / f"{name.replace('/', '_')}_{step:08d}.png")


def make_accelerator(output: Path, mixed_precision: str) -> Accelerator:
    """An Accelerator logging to ``output/tensorboard``. On machines without a GPU it runs on the CPU, and under
    ``torchrun`` its processes join one gloo group (accelerate only does this when told it is on the CPU)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if AcceleratorState._shared_state:  # a second run in one process (tests, the demo) may change precision
        AcceleratorState._reset_state(reset_partial_state=False)

    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(
        cpu=not has_accelerator,
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output)),
    )


def start_run(output: str | Path, mixed_precision: str, resume: str | None, seed: int
              ) -> tuple[Path, Accelerator, Path | None]:
    """The opening every run shares: the accelerator, logging to ``output/train.log``, the checkpoint to resume
    from (checked before any heavy work) and the seed of the initial weights (equal on every process)."""
    from simmim.checkpoint import resolve_resume
    from simmim.run_dir import setup_logging

    out = Path(output)
    accelerator = make_accelerator(out, mixed_precision)
    setup_logging(out / "train.log", main_process=accelerator.is_main_process)
    resume_path = resolve_resume(resume, out)
    set_seed(seed)
    return out, accelerator, resume_path


def _tensorboard_writer(acc: Accelerator) -> Any:
    try:
        return acc.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError, AttributeError):
        return None
