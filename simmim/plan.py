"""From a config to step counts, learning rates, optimizer and schedule: the part of the build layer that
pretraining and fine-tuning share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simmim.config import OptimConfig, ScheduleConfig, scaled_lr
from simmim.errors import UserError
from simmim.optim import build_optimizer, build_scheduler


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


def build_optimization(groups: list[dict], schedule: ScheduleConfig, optim: OptimConfig, plan: Plan
                       ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``groups`` and its per-iteration schedule, with epochs converted to steps and every lr scaled
    to the global batch."""
    optimizer = build_optimizer(groups, plan.lr, optim.betas, optim.eps)
    per_epoch = plan.steps_per_epoch
    scheduler = build_scheduler(
        optimizer, schedule.kind, plan.total_steps, warmup_steps=round(schedule.warmup_epochs * per_epoch),
        warmup_lr=scaled_lr(optim.warmup_lr, plan.global_batch), min_lr=scaled_lr(optim.min_lr, plan.global_batch),
        milestones=tuple(round(m * per_epoch) for m in schedule.milestones), gamma=schedule.gamma)
    return optimizer, scheduler
