"""Optimization from a config: the plan (step counts, global batch, batch-scaled lr), parameter groups (weight decay,
layer-wise lr decay), AdamW and the per-iteration lr schedule; pretraining and fine-tuning share all of it.

Groups carry an ``lr_scale``; timm's schedulers multiply each group's lr by it, so the scale is applied exactly once
(the group's own ``lr`` stays the unscaled base value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from simmim.config import OptimConfig, ScheduleConfig, scaled_lr
from simmim.errors import UserError
from simmim.models.swin_transformer_v2 import swin_layer_id


def takes_weight_decay(name: str, param: torch.Tensor, no_decay_names: Iterable[str] = ()) -> bool:
    """Biases, every 1-D parameter (norms, q/v biases) and the named exceptions (CPB MLP, logit scales, mask token,
    position tables) take no weight decay."""
    return not (param.ndim <= 1 or name.endswith(".bias") or name in set(no_decay_names))


def layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Layer index for layer-wise lr decay: patch embedding / mask token 0; global block k -> k + 1; a stage's
    downsample (timm layout: at the start of stage i) shares the id of the last block of stage i - 1; the final
    norm, head and decoder N + 1. (A Swin encoder's own ``layer_id`` is this rule.)"""
    return swin_layer_id(name, depths)


def _layer_ids(model: nn.Module, depths: tuple[int, ...] | None) -> tuple[Callable[[str], int], int]:
    """(name -> layer id, number of ids) from the encoder in ``model`` (itself or a SimMIM wrapper's
    ``encoder``: the contract's ``layer_id``/``num_layer_ids``), or from Swin ``depths`` when given."""
    if depths:
        return (lambda name: layer_id(name, depths)), sum(depths) + 2
    encoder = model if hasattr(model, "layer_id") else getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer_id"):
        raise ValueError(f"layer-wise lr decay needs an encoder with layer_id(); {type(model).__name__} has none")
    prefix = "" if encoder is model else "encoder."

    def of(name: str) -> int:
        if not name.startswith(prefix):
            return encoder.num_layer_ids - 1  # the SimMIM decoder goes with the final norm
        return encoder.layer_id(name.removeprefix(prefix))

    return of, encoder.num_layer_ids


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 depths: tuple[int, ...] | None = None) -> list[dict]:
    """AdamW groups keyed by (decay or not, layer id). ``layer_decay < 1`` gives layer ``i`` of ``n`` the scale
    ``layer_decay ** (n - 1 - i)``, the ids coming from the encoder's ``layer_id`` (or Swin ``depths``)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decayed = layer_decay != 1.0
    of, num_ids = _layer_ids(model, depths) if decayed else ((lambda name: 0), 1)
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = takes_weight_decay(name, p, no_decay)
        lid = of(name)
        group = groups.setdefault((decay, lid), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_ids - 1 - lid) if decayed else 1.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], eps: float, shard: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (their ``names`` lists are kept for inspection, torch ignores them).

    The fused implementation (one kernel for all parameters) where the parameters' device supports it: it is the
    fastest, and it skips a step on the device when told ``found_inf``, which spares the engine a host sync per
    step to decide whether a non-finite step is applied.

    ``shard`` (ZeRO stage 1, in a distributed run): a ``ZeroRedundancyOptimizer`` whose local AdamW (``.optim``)
    holds the moments of this process's share of the parameters only; after its step each process broadcasts the
    parameters it owns. AdamW is elementwise, so the weights equal those of the unsharded AdamW bit for bit."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=betas, eps=eps,
                                       fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def shard_state(optim: OptimConfig, num_processes: int, distributed_type: str) -> bool:
    """Whether the AdamW state is sharded (``optim.shard_state``): only under plain data parallel with more than
    one process (one process has nothing to share it with); FSDP and DeepSpeed shard it themselves."""
    if not optim.shard_state:
        return False
    if distributed_type in ("FSDP", "DEEPSPEED"):
        raise UserError(f"optim.shard_state=true shards the AdamW state under plain data parallel, but this run uses "
                        f"{distributed_type}, which shards it itself; drop optim.shard_state")
    return num_processes > 1


def local_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds this process's state: under accelerate's wrapper, and under ZeRO the local
    AdamW over this process's share of the parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    return inner.optim if isinstance(inner, ZeroRedundancyOptimizer) else inner


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer state tensors this process holds (AdamW: two moments per parameter it updates)."""
    return sum(v.nbytes for state in local_optimizer(optimizer).state.values() if state
               for v in state.values() if torch.is_tensor(v))


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                    warmup_lr: float, min_lr: float, milestones: tuple[int, ...] = (), gamma: float = 0.1
                    ) -> Scheduler:
    """Per-iteration schedule (call ``step_update(step)``): linear warmup from ``warmup_lr``, then cosine to
    ``min_lr`` or a multistep decay by ``gamma`` at ``milestones`` (in steps)."""
    common = dict(warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if kind == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr,
                                 warmup_prefix=True, cycle_limit=1, **common)
    if kind == "multistep":
        # timm applies decay_t m at step m - 1 and, by default, counts from the end of warmup; the official
        # schedule drops at the absolute milestone step, hence the + 1 and warmup_prefix=False
        return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in milestones], decay_rate=gamma,
                                    warmup_prefix=False, **common)
    raise UserError(f"unknown schedule {kind!r}; use 'cosine' or 'multistep' (schedule.kind)")


# ----------------------------------------------------------------------------------------------------------------
# from a config: the plan, then optimizer and schedule


@dataclass(frozen=True)
class Plan:
    total_steps: int  # optimizer steps of the run
    steps_per_epoch: float  # optimizer steps in one epoch (spread evenly over max_steps when that is set)
    global_batch: int  # batch_size x processes x accumulation_steps
    lr: float  # base lr scaled to the global batch


def plan_training(schedule: ScheduleConfig, optim: OptimConfig, batch_size: int, num_processes: int,
                  batches_per_process: int | None) -> Plan:
    """``batches_per_process`` is the per-process loader length (None for a stream, which needs max_steps)."""
    global_batch = batch_size * num_processes * optim.accumulation_steps
    if batches_per_process is not None and batches_per_process < optim.accumulation_steps:
        # checked here, before the run directory is written, not when the loop first asks for an epoch
        raise UserError(f"an epoch has {batches_per_process} batches per process, fewer than "
                        f"optim.accumulation_steps {optim.accumulation_steps}; lower it or data.batch_size")
    if schedule.max_steps:
        total, per_epoch = schedule.max_steps, schedule.max_steps / schedule.epochs
    elif batches_per_process is None:
        raise UserError("a streaming dataset has no epoch length: set schedule.max_steps")
    else:
        per_epoch = max(batches_per_process // optim.accumulation_steps, 1)
        total = schedule.epochs * per_epoch
    return Plan(int(total), per_epoch, global_batch, scaled_lr(optim.base_lr, global_batch))


def build_optimization(groups: list[dict], schedule: ScheduleConfig, optim: OptimConfig, plan: Plan,
                       shard: bool = False) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``groups`` (sharded over the processes with ``shard``, see :func:`build_optimizer`) and its
    per-iteration schedule, with epochs converted to steps and every lr scaled to the global batch."""
    optimizer = build_optimizer(groups, plan.lr, optim.betas, optim.eps, shard)
    per_epoch = plan.steps_per_epoch
    scheduler = build_scheduler(
        optimizer, schedule.kind, plan.total_steps, warmup_steps=round(schedule.warmup_epochs * per_epoch),
        warmup_lr=scaled_lr(optim.warmup_lr, plan.global_batch), min_lr=scaled_lr(optim.min_lr, plan.global_batch),
        milestones=tuple(round(m * per_epoch) for m in schedule.milestones), gamma=schedule.gamma)
    return optimizer, scheduler
