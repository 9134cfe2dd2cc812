"""The training engine shared by pretraining and fine-tuning, on top of ``accelerate``.

The loop reads top to bottom, as MAE's ``train_one_epoch``: per micro-batch, reseed -> forward (autocast) ->
backward; once per optimizer step, finite check -> clip -> step -> log -> the task's after-step work -> checkpoint.
accelerate owns devices, processes, mixed precision, gradient accumulation (``accumulate``) and TensorBoard.

Determinism: each micro-batch reseeds the global RNG from (seed, micro-batch index, rank), and the data pipeline
draws every sample from (seed, epoch, index), so a resumed run repeats an uninterrupted one exactly.

No host sync per step: the loss, the finite check and the counters stay on the device, and a non-finite step is
skipped on the device by the fused AdamW (``found_inf``); values are read at log steps, every
``max_bad_steps`` steps (to stop a diverged run on time) and around checkpoints.

Divergence: a step whose loss or gradient is not finite is skipped; ``max_bad_steps`` in a row stop the run. No
checkpoint is written during such a streak or from non-finite weights (:meth:`Engine.save_if_healthy`); which
checkpoints count as good, rotate or are set aside is :class:`simmim.run_dir.CheckpointPolicy`'s business (its
module docstring says what happens on resume and on divergence).

Saving: with ``run.async_save`` a save only copies the state to host memory; a thread writes it (atomic, at most
one in flight, rotation after it lands; see :class:`simmim.run_dir.CheckpointPolicy`), and :meth:`Engine.fit` waits
for it before returning or raising.

Sharded optimizer state (FSDP, DeepSpeed, and ``optim.shard_state``: torch's ZeRO stage 1 under DDP, where every
process writes its own part) goes into ``checkpoints/accelerate-<step>/`` beside the step's file.

Stops: SIGTERM/SIGINT make the step they arrive in save like a periodic save, then stop (:mod:`simmim.signals`);
TensorBoard and pictures go through :class:`simmim.side_outputs.SideOutputs`, whose failures never stop training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from simmim import signals
from simmim.checkpoint import save_checkpoint
from simmim.compat import can_skip_on_device, skip_step_on_device
from simmim.data import sample_seed
from simmim.errors import UserError
from simmim.models.convert import check_compatible
from simmim.optim import local_optimizer
from simmim.perf import PerfMeter, count_flops, peak_flops
from simmim.run_dir import CheckpointPolicy
from simmim.run_dir import CheckpointWriteError as CheckpointWriteError  # re-exported: raised by the policy
from simmim.run_dir import NonFiniteLossError as NonFiniteLossError
from simmim.side_outputs import SideOutputs
from simmim.weights import Weights

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What a task's after-step work produced: scalars to log, and a named checkpoint to write (e.g. ``best``)
    with metadata updates recorded in it (and in every later checkpoint)."""

    metrics: dict[str, float] = field(default_factory=dict)
    save_as: str | None = None
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    """What the engine needs from a job (pretraining, fine-tuning). A task never reaches back into the engine."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        """Forward one micro-batch: (scalar loss, outputs for logging)."""

    def log_images(self, model: nn.Module, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Image grids to log (``model`` unwrapped), name -> (3, H, W) float in [0, 1]; may be empty."""

    def after_step(self, step: int, model: nn.Module, final: bool) -> StepResult | None:
        """Work after optimizer step ``step`` on every process (EMA update, evaluation, monitoring)."""

    def extra_state(self) -> dict:
        """Task state saved in checkpoints beside the model (e.g. EMA weights, best accuracy); plain data."""

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` on resume."""


@dataclass
class LoopSettings:
    total_steps: int  # optimizer steps of the whole run
    clip_grad: float | None = None
    log_every: int = 20
    image_every: int = 1000
    save_every: int = 1000
    max_bad_steps: int = 5
    seed: int = 0
    progress: bool = True
    # in a distributed run the processes vote on a stop request (SIGTERM/SIGINT) every this many steps: a
    # collective and a host sync, so not every step; a single process checks its own flag at every step
    stop_vote_every: int = 5
    peak_flops: float | None = None  # FLOP/s of one device for MFU (None: a known GPU's, else MFU is not logged)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (including skipped ones: their data was consumed)
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    skipped_files: int = 0  # unreadable inputs replaced by the data pipeline
    first_loss: float | None = None
    last_loss: float | None = None


class _Meter:
    """Per-step numbers kept on the device until a sync point reads them all at once."""

    def __init__(self, device: torch.device) -> None:
        z = torch.zeros((), device=device)
        self.loss_sum, self.loss_n, self.skipped, self.files = z.clone(), z.clone(), z.clone(), z.clone()
        self.bad_run, self.max_run = z.clone(), z.clone()
        self.last_ok = torch.ones((), device=device, dtype=torch.bool)
        self.first: torch.Tensor | None = None
        self.last = torch.full((), math.nan, device=device)
        self.images = 0

    def step(self, loss: torch.Tensor, ok: torch.Tensor, files: torch.Tensor, images: int) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.loss_n += finite
        self.skipped += ~ok
        self.files += files
        self.bad_run = torch.where(ok, 0.0, self.bad_run + 1)
        self.max_run = torch.maximum(self.max_run, self.bad_run)
        self.last_ok, self.last = ok, loss
        self.first = loss if self.first is None else self.first
        self.images += images

    def read(self) -> dict[str, float]:
        """Every value as a Python number (one host sync); the step and file counters and the longest bad run
        start again from zero."""
        first = self.first if self.first is not None else torch.full_like(self.last, math.nan)
        values = torch.stack([self.loss_sum, self.loss_n, self.skipped, self.files, self.bad_run, self.max_run,
                              self.last_ok.float(), first, self.last]).tolist()
        names = ("loss_sum", "loss_n", "skipped", "files", "bad_run", "max_run", "last_ok", "first", "last")
        self.skipped.zero_(), self.files.zero_(), self.max_run.zero_()
        return dict(zip(names, values, strict=True))

    def reset_window(self) -> None:
        """Start a new logging window (loss average and images/s)."""
        self.loss_sum.zero_(), self.loss_n.zero_()
        self.images = 0



def _load_optimizer_state(optimizer: Any, state: dict, where: Path | str) -> None:
    """Load a saved optimizer state, refusing in one line one whose parameter groups no longer fit."""
    try:
        optimizer.load_state_dict(state)
    except ValueError as err:
        raise UserError(f"the optimizer state in {where} does not fit the current parameter groups ({err}); was "
                        "optim.layer_decay changed? Resume with the original setting") from None

class Engine:
    """Runs ``task`` for ``settings.total_steps`` optimizer steps with checkpoints in ``checkpoints``.

    ``model``, ``optimizer`` and ``loader`` are already passed through ``accelerator.prepare``; ``scheduler`` is a
    timm scheduler stepped per optimizer step with ``step_update`` (a pure function of the step, rebuilt from the
    current config on resume). ``metadata`` is stored in every checkpoint.
    """

    def __init__(self, accelerator: Accelerator, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: Any, checkpoints: CheckpointPolicy, settings: LoopSettings,
                 metadata: dict, image_dir: Path | None = None,
                 record: Callable[[Path], None] = lambda path: None) -> None:
        self.acc, self.task, self.model, self.optimizer = accelerator, task, model, optimizer
        self.scheduler, self.loader, self.checkpoints, self.settings = scheduler, loader, checkpoints, settings
        self.metadata = metadata
        self.state = TrainState()
        wrapped = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        inner = local_optimizer(optimizer)  # under ZeRO the local AdamW, which runs the step (and the skip)
        self._zero = wrapped if inner is not wrapped else None  # ZeroRedundancyOptimizer (optim.shard_state)
        self._skip_on_device = (can_skip_on_device(inner) and accelerator.mixed_precision != "fp16"
                                and accelerator.distributed_type != DistributedType.DEEPSPEED)
        self._inner_optimizer = inner
        # TensorBoard and pictures: a failed write warns once and never stops the run
        self.side_outputs = SideOutputs(accelerator, image_dir, record)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _sharded(self) -> bool:
        return self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint (all processes must call; the main process writes). Returns its path on main.
        A step checkpoint is not rotated here: the policy rotates once it has proven good."""
        step = self.state.step
        weights = self.acc.get_state_dict(self.model)  # a collective under FSDP/DeepSpeed
        if (self._sharded() or self._zero is not None) and name is None:
            self.checkpoints.state_dir_opening(step)  # listed before any process creates it
            self.acc.wait_for_everyone()
            if self._zero is not None:  # each process writes its own share of the optimizer state
                save_checkpoint(self._inner_optimizer.state_dict(), self._shard_path(step, self.acc.process_index))
                self.acc.wait_for_everyone()
            else:  # optimizer shards live in accelerate's own folder beside our file
                self.acc.save_state(str(self.checkpoints.state_dir(step)))
            self.checkpoints.state_dir_written(step)
        path = None
        if self.acc.is_main_process:
            scaler = getattr(self.acc, "scaler", None)
            # an async save copies device tensors to (pinned) host memory itself: no second, blocking copy here
            host = (lambda v: v.detach()) if self.checkpoints.async_save else (lambda v: v.detach().cpu())
            state = {
                "model": {k: host(v) for k, v in weights.items()},
                "optimizer": None if self._sharded() or self._zero is not None else self.optimizer.state_dict(),
                "optimizer_shards": self.acc.num_processes if self._zero is not None and name is None else None,
                "scheduler": self.scheduler.state_dict(),  # informational: resume rebuilds the schedule from config
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "train_state": asdict(self.state),
                "extra": self.task.extra_state(),
                "meta": self.metadata,
            }
            path = self.checkpoints.write(state, step, name)
        self.acc.wait_for_everyone()
        return path

    def _shard_path(self, step: int, rank: int, directory: Path | None = None) -> Path:
        """Where process ``rank`` keeps its share of the optimizer state (``optim.shard_state``) for ``step``."""
        directory = directory or self.checkpoints.state_dir(step)
        return directory / f"optimizer-{rank:05d}-of-{self.acc.num_processes:05d}.pt"

    def _load_optimizer_shard(self, weights: Weights, state_dir: Path | None) -> None:
        """Restore this process's share of a sharded optimizer state; the same process count is needed, since the
        shares follow from how the parameters were split over the processes."""
        shards, path = weights.checkpoint["optimizer_shards"], weights.path
        if self._zero is None or shards != self.acc.num_processes:
            now = f"{self.acc.num_processes} process{'es' if self.acc.num_processes > 1 else ''}" + (
                "" if self._zero is not None else ", optimizer not sharded")
            raise UserError(f"the optimizer state of {path} is sharded over {shards} processes (optim.shard_state="
                            f"true); resume it with {shards} processes and optim.shard_state=true (this run: {now})")
        shard = self._shard_path(weights.checkpoint["step"], self.acc.process_index,
                                 state_dir or self.checkpoints.state_dir(weights.checkpoint["step"]))
        if not shard.is_file():
            raise UserError(f"{shard}, this process's share of the optimizer state of {path}, is missing; resume "
                            "from an earlier checkpoint with --resume PATH")
        _load_optimizer_state(self._inner_optimizer, torch.load(shard, map_location="cpu", weights_only=True), shard)

    def save_if_healthy(self, final: bool) -> None:
        """Save a step checkpoint now unless the run is in a non-finite streak or its weights are not finite
        (all processes call it; the loop at its save points, and whoever must stop the run at a step boundary)."""
        st = self.state
        if st.bad_in_a_row or not self._weights_finite():
            log.warning("step %d: not writing a checkpoint: %s", st.step,
                        "the loss is non-finite now" if st.bad_in_a_row else "the weights are non-finite")
            return
        self.save()
        self.checkpoints.written(st.step, final)

    def _weights_finite(self) -> bool:
        """Whether every weight is finite, agreed by all processes (under FSDP each holds only its shards)."""
        flags = [torch.isfinite(p).all() for p in self.model.parameters() if p.is_floating_point()]
        bad = (~torch.stack(flags).all()).float() if flags else torch.zeros((), device=self.acc.device)
        return float(self.acc.reduce(bad.to(self.acc.device), "sum")) == 0

    def resume(self, weights: Weights) -> None:
        """Restore weights, optimizer, grad scaler, counters, task state and (through the step) the data position.
        The lr schedule is not restored: it follows the current config at the resumed step."""
        ckpt = weights.checkpoint
        assert ckpt is not None, "resume needs a run checkpoint (read_run_checkpoint)"
        model = self.acc.unwrap_model(self.model)
        check_compatible(model, ckpt["model"], what=f"resume checkpoint {weights.path} (was the model config "
                                                     "changed?)")
        model.load_state_dict(ckpt["model"])
        state_dir = self.checkpoints.resumed(weights)  # the resumed file counts as the last good checkpoint
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if ckpt.get("optimizer") is not None:
            _load_optimizer_state(self.optimizer, ckpt["optimizer"], weights.path)
        elif ckpt.get("optimizer_shards"):
            self._load_optimizer_shard(weights, state_dir)
        elif state_dir is not None:
            self.acc.load_state(str(state_dir))
        for group, hyper in zip(self.optimizer.param_groups, current, strict=True):
            group.update(hyper)  # lr, weight decay, betas of the current config, not the checkpoint's
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        self.state.bad_in_a_row = 0
        self.task.load_extra_state(ckpt.get("extra") or {})
        log.info("resumed from %s at step %d", weights.path, self.state.step)

    # -- data ------------------------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[dict]:
        """Endless micro-batches, starting where ``state.step`` left off (epoch and offset inside it). An epoch
        holds whole optimizer steps: its last ``len % accumulation`` micro-batches are dropped, so B x k with
        accumulation k sees the same samples per step as one batch of k x B."""
        accum = self.acc.gradient_accumulation_steps
        if not hasattr(self.loader.dataset, "__len__"):  # a stream: endless, shards itself, resumes by position
            self.loader.dataset.set_start(self.state.step * accum)
            yield from self.loader
            raise RuntimeError("the stream ended; streams for training are endless (MaskedImageStream endless=True)")
        steps_per_epoch = len(self.loader) // accum
        if steps_per_epoch == 0:
            raise UserError(f"an epoch has {len(self.loader)} batches per process, fewer than "
                             f"optim.accumulation_steps {accum}; lower it or data.batch_size")
        epoch, step_in_epoch = divmod(self.state.step, steps_per_epoch)
        while True:
            self._set_epoch(epoch)
            offset = step_in_epoch * accum
            loader = self.acc.skip_first_batches(self.loader, offset) if offset else self.loader
            count = offset
            for batch in loader:
                yield batch
                count += 1
                if count == steps_per_epoch * accum:
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

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip, check, step: ``loss`` is this step's loss (same on every process). Returns (ok, grad norm), both
        device tensors; a non-finite loss or gradient skips the update on every process alike."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = self.acc.clip_grad_norm_(params, self.settings.clip_grad or math.inf)  # None under DeepSpeed
        ok = torch.isfinite(loss)
        if norm is not None and self.acc.mixed_precision != "fp16":  # under fp16 the grad scaler handles overflow
            ok = ok & torch.isfinite(norm)
        if self._skip_on_device:
            skip_step_on_device(self._inner_optimizer, ok)
            self.optimizer.step()
        elif bool(ok):  # a host sync: optimizers that cannot skip on the device (DeepSpeed, fp16 scaler, ...)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ok, norm

    def fit(self) -> TrainState:
        """Train to ``total_steps``; checkpoints every ``save_every`` steps and at the end. With asynchronous
        saving, the write in flight is on disk before this returns or raises (a stop's checkpoint before the
        stop's message names it), so the run's lock is released only after it."""
        try:
            state = self._fit()
        except KeyboardInterrupt:  # a second Ctrl-C: abort at once; a write in flight leaves a temp file at worst
            raise
        except signals.StoppedBySignal:
            self.checkpoints.wait()  # a failed write replaces the stop's message with its own
            raise
        except BaseException:
            self.checkpoints.wait(raise_errors=False)  # the run's own error is the one to report
            raise
        self.checkpoints.wait()
        return state

    def _fit(self) -> TrainState:
        s, st, acc = self.settings, self.state, self.acc
        accum = acc.gradient_accumulation_steps
        meter = _Meter(acc.device)
        bar = tqdm(total=s.total_steps, initial=st.step, disable=not (s.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        peak = peak_flops(acc.device, acc.mixed_precision, s.peak_flops)
        perf = PerfMeter(acc.device, peak * acc.num_processes if peak else None)
        t0, micro, grad_norm = time.perf_counter(), st.step * accum, None
        step_loss = torch.zeros((), device=acc.device)
        files = torch.zeros((), device=acc.device)
        if st.step < s.total_steps and (signum := signals.agreed(acc, st.step, s.stop_vote_every, force=True)):
            bar.close()  # a signal during setup: nothing trained yet, nothing new to save
            raise signals.StoppedBySignal(signum, st.step, self.checkpoints, before_first=True)
        with logging_redirect_tqdm(loggers=[logging.getLogger("simmim")]):
            for batch in perf.timed(self._micro_batches()) if st.step < s.total_steps else ():
                if perf.flops_per_image is None:  # once, on the first micro-batch, outside the timed window
                    counted = self._count_flops(batch, perf)
                    t0 += counted
                if micro % accum == 0:
                    self.scheduler.step_update(st.step)  # lr of this step: a pure function of the step
                    self.model.train()
                set_seed(sample_seed(s.seed, micro, acc.process_index) % 2**32)  # drop path, mixup, ...
                micro += 1
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, outputs = self.task.loss(self.model, batch)
                    acc.backward(loss)  # accelerate divides by the accumulation steps
                    step_loss += loss.detach().float() / accum
                    if "skipped" in batch:
                        files += torch.as_tensor(batch["skipped"], device=acc.device).sum()
                    if not acc.sync_gradients:
                        continue
                    step_loss = acc.reduce(step_loss, "mean")  # every process decides on the same number
                    ok, grad_norm = self._optimizer_step(step_loss)
                st.step += 1
                meter.step(step_loss, ok, files, len(batch["image"]) * accum * acc.num_processes)
                step_loss, files = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
                bar.update(1)
                self.checkpoints.poll()  # a background write that failed stops the run here, one step late
                perf.step_done()
                final = st.step >= s.total_steps
                stop = signals.agreed(acc, st.step, s.stop_vote_every)  # SIGTERM/SIGINT: save, then stop
                if stop is not None:  # every process says so (before the save's barrier, so before any exits)
                    log.warning("step %d: stopping on %s (process %d of %d); saving a checkpoint first", st.step,
                                signals.signal_name(stop), acc.process_index, acc.num_processes)
                save_due = st.step % s.save_every == 0 or final or stop is not None
                if (st.step % s.log_every == 0 or st.step % s.max_bad_steps == 0 or final or save_due
                        or self.checkpoints.pending is not None):
                    t0 = self._sync(meter, perf, grad_norm, t0, bar, log_now=st.step % s.log_every == 0 or final)
                if (s.image_every and st.step % s.image_every == 0) or final:
                    self._log_images(st.step, batch, outputs)
                result = self.task.after_step(st.step, self.model, final)
                if result is not None:
                    self._record(result)
                if save_due:
                    self.save_if_healthy(final)
                if final:
                    break
                if stop is not None:
                    bar.close()
                    raise signals.StoppedBySignal(stop, st.step, self.checkpoints)
        bar.close()
        return st

    def _count_flops(self, batch: dict, perf: PerfMeter) -> float:
        """Count the model FLOPs of a training step per image on ``batch`` (a no-grad forward of the task's loss x 3,
        see :mod:`simmim.perf`) into ``perf``; every process does (a sharded model's forward is a collective).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        self.model.train()  # the model as trained (recompute modes, drop path; no inference caches)

        def forward() -> None:
            with torch.no_grad(), self.acc.autocast():
                self.task.loss(self.model, batch)

        flops = count_flops(forward)
        perf.flops_per_image = 3 * flops / len(batch["image"])
        seconds = time.perf_counter() - t0
        perf.pause(seconds)
        log.info("model FLOPs of a training step: %.3g GFLOP per image (forward x 3; counted in %.1f s)",
                 perf.flops_per_image / 1e9, seconds)
        return seconds

    def _sync(self, meter: _Meter, perf: PerfMeter, grad_norm: torch.Tensor | None, t0: float, bar: Any,
              log_now: bool) -> float:
        """Read the device-side numbers (one host sync, one collective): count skipped steps and unreadable files,
        stop a diverged run, confirm the pending checkpoint and, at log steps, log a window of scalars. Every
        process calls it at the same steps. Returns the time the next logging window starts at."""
        s, st, acc = self.settings, self.state, self.acc
        values = meter.read()
        totals = torch.tensor([values["files"]], device=acc.device)
        st.skipped_files += int(acc.reduce(totals, "sum").item())  # unreadable inputs met on every process
        st.skipped_steps += int(values["skipped"])
        st.bad_in_a_row = int(values["bad_run"])
        if math.isfinite(values["first"]) and st.first_loss is None:
            st.first_loss = values["first"]
        if math.isfinite(values["last"]):
            st.last_loss = values["last"]
        if values["skipped"]:
            log.warning("step %d: %d step(s) since the last check had a non-finite loss or gradient and were "
                        "skipped (%d in a row now)", st.step, values["skipped"], st.bad_in_a_row)
        if values["max_run"] >= s.max_bad_steps:
            raise self.checkpoints.diverged(int(values["max_run"]), st.step)
        if self.checkpoints.pending is not None and values["last_ok"]:
            self.checkpoints.proven()
        if not log_now:
            return t0
        elapsed = time.perf_counter() - t0
        window_loss = values["loss_sum"] / values["loss_n"] if values["loss_n"] else math.nan
        norm = float(grad_norm) if grad_norm is not None else math.nan
        hours = perf.window(meter.images, elapsed, s.total_steps - st.step)
        scalars = {
            "train/loss": window_loss,
            "train/lr": max(g["lr"] for g in self.optimizer.param_groups),
            "train/grad_norm": norm,
            "train/skipped_steps": st.skipped_steps,
            "data/skipped_files": st.skipped_files,
            **{k: v for k, v in hours.items() if k.startswith("perf/")},
        }
        self.side_outputs.scalars(scalars, self.state.step)
        text, postfix = perf.summary(hours)
        bar.set_postfix({"loss": f"{window_loss:.4f}", "lr": f"{scalars['train/lr']:.2e}", **postfix})  # in order
        log.info("step %d/%d loss %.4f lr %.3e grad %.3f | %s | skipped steps %d files %d", st.step,
                 s.total_steps, window_loss, scalars["train/lr"], norm, text, st.skipped_steps, st.skipped_files)
        meter.reset_window()
        return time.perf_counter()

    def _record(self, result: StepResult) -> None:
        if result.metrics:
            self.side_outputs.scalars(result.metrics, self.state.step)
        self.metadata.update(result.meta)
        if result.save_as:
            self.save(name=result.save_as)

    def _log_images(self, step: int, batch: dict, outputs: Any) -> None:
        if self.acc.is_main_process:
            self.side_outputs.images(self.task.log_images(self.acc.unwrap_model(self.model), batch, outputs), step)
