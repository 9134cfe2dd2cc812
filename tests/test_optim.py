"""Tests for optimizer groups and schedules (simmim.optim): which parameters take weight decay, layer-wise lr
decay ids and scales, that a group's scale is applied exactly once, and the warmup / cosine / multistep shapes."""

from __future__ import annotations

import math

import pytest
import torch

from simmim.masked_modeling import SimMIM
from simmim.models import create_model
from simmim.optim import build_optimizer, build_scheduler, layer_id, param_groups, takes_weight_decay

DEPTHS = (2, 2, 2, 2)  # swinv2_pico: N = 8 blocks, ids 0 (embedding) .. 9 (final norm / head / decoder)
N = sum(DEPTHS)


def simmim_pico() -> SimMIM:
    return SimMIM(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0))


def names_by_decay(groups: list[dict]) -> tuple[set[str], set[str]]:
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    return decay, no_decay


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def single_group_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return build_optimizer(param_groups(torch.nn.Linear(2, 2), 0.0), lr=lr, betas=(0.9, 0.999), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# weight decay


def test_every_parameter_lands_in_exactly_one_group():
    model = simmim_pico()
    groups = param_groups(model, 0.05)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        assert all(p is dict(model.named_parameters())[n] for p, n in zip(g["params"], g["names"], strict=True))


def test_no_weight_decay_on_biases_1d_params_cpb_mlp_logit_scale_and_mask_token():
    model = simmim_pico()
    params = dict(model.named_parameters())
    decay, no_decay = names_by_decay(param_groups(model, 0.05))
    expected_no_decay = {
        n for n, p in params.items()
        if n.endswith(".bias") or p.ndim <= 1 or ".cpb_mlp." in n or n.endswith("logit_scale")
        or n == "encoder.mask_token"
    }
    assert no_decay == expected_no_decay
    assert decay == set(params) - expected_no_decay
    # the cases a "1-D or bias" rule alone would miss
    assert "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight" in no_decay  # (512, 2)
    assert "encoder.layers.2.blocks.1.attn.cpb_mlp.2.weight" in no_decay  # (heads, 512), no bias
    assert params["encoder.layers.0.blocks.0.attn.logit_scale"].ndim == 3
    assert "encoder.layers.0.blocks.0.attn.logit_scale" in no_decay
    assert params["encoder.mask_token"].ndim == 3 and "encoder.mask_token" in no_decay
    for n in ("attn.q_bias", "attn.v_bias", "norm1.weight", "norm2.bias"):
        assert f"encoder.layers.1.blocks.0.{n}" in no_decay
    assert {"encoder.norm.weight", "encoder.patch_embed.norm.weight", "decoder.0.bias"} <= no_decay


def test_weight_decay_on_linear_and_conv_weights():
    model = simmim_pico()
    decay, _ = names_by_decay(param_groups(model, 0.05))
    for n in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        assert f"encoder.layers.3.blocks.1.{n}" in decay
    assert {"encoder.layers.1.downsample.reduction.weight", "encoder.patch_embed.proj.weight",
            "decoder.0.weight"} <= decay
    assert all(g["weight_decay"] == 0.05 for g in param_groups(model, 0.05) if g["names"][0] in decay)


def test_takes_weight_decay_rules():
    w2 = torch.zeros(3, 3)
    assert takes_weight_decay("x.weight", w2)
    assert not takes_weight_decay("x.bias", w2)
    assert not takes_weight_decay("x.weight", torch.zeros(3))
    assert not takes_weight_decay("x.weight", w2, {"x.weight"})


# ----------------------------------------------------------------------------------------------------------------
# layer-wise lr decay


@pytest.mark.parametrize(("name", "expected"), [
    ("encoder.patch_embed.proj.weight", 0),
    ("encoder.patch_embed.norm.bias", 0),
    ("encoder.mask_token", 0),
    ("encoder.layers.0.blocks.0.attn.qkv.weight", 1),
    ("encoder.layers.0.blocks.1.norm1.weight", 2),
    ("encoder.layers.1.downsample.reduction.weight", 2),  # = id of the last block of stage 0
    ("encoder.layers.1.downsample.norm.bias", 2),
    ("encoder.layers.1.blocks.0.mlp.fc1.weight", 3),
    ("encoder.layers.2.downsample.reduction.weight", 4),
    ("encoder.layers.2.blocks.1.attn.logit_scale", 6),
    ("encoder.layers.3.downsample.reduction.weight", 6),
    ("encoder.layers.3.blocks.0.attn.q_bias", 7),
    ("encoder.layers.3.blocks.1.attn.cpb_mlp.2.weight", 8),
    ("encoder.norm.weight", 9),
    ("encoder.head.fc.weight", 9),
    ("decoder.0.weight", 9),
    ("layers.1.blocks.1.attn.qkv.weight", 4),  # a bare encoder (fine-tuning) has no "encoder." prefix
    ("patch_embed.proj.weight", 0),
    ("head.fc.bias", 9),
])
def test_layer_ids(name, expected):
    assert layer_id(name, DEPTHS) == expected


def test_layer_ids_follow_stage_depths():
    depths = (2, 2, 6, 2)  # swinv2_tiny: N = 12
    assert layer_id("layers.2.blocks.5.mlp.fc2.weight", depths) == 10
    assert layer_id("layers.3.downsample.reduction.weight", depths) == 10
    assert layer_id("layers.3.blocks.1.mlp.fc2.weight", depths) == 12
    assert layer_id("norm.weight", depths) == 13


def test_layer_decay_scales_are_decay_to_the_distance_from_the_top():
    model = simmim_pico()
    groups = param_groups(model, 0.05, layer_decay=0.75, depths=DEPTHS)
    seen = set()
    for g in groups:
        ids = {layer_id(n, DEPTHS) for n in g["names"]}
        assert len(ids) == 1  # one layer per group
        (lid,) = ids
        seen.add(lid)
        assert g["lr_scale"] == pytest.approx(0.75 ** (N + 1 - lid))
        assert all(takes_weight_decay(n, p, model.no_weight_decay()) == (g["weight_decay"] > 0)
                   for n, p in zip(g["names"], g["params"], strict=True))
    assert seen == set(range(N + 2))
    by_name = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert by_name["encoder.patch_embed.proj.weight"] == pytest.approx(0.75**9)
    assert by_name["encoder.layers.1.downsample.reduction.weight"] == pytest.approx(0.75**7)
    assert by_name["decoder.0.weight"] == 1.0


def test_without_layer_decay_every_scale_is_one():
    groups = param_groups(simmim_pico(), 0.05)
    assert len(groups) == 2  # decay / no decay
    assert all(g["lr_scale"] == 1.0 for g in groups)


# ----------------------------------------------------------------------------------------------------------------
# the scale is applied once


def _layer_decay_optimizer() -> torch.optim.Optimizer:
    groups = param_groups(simmim_pico(), 0.05, layer_decay=0.75, depths=DEPTHS)
    return build_optimizer(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8)


def test_layer_scale_is_applied_exactly_once():
    opt = _layer_decay_optimizer()
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_steps=0, warmup_lr=0.0, min_lr=0.0)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert min(scales) < 0.1  # 0.75**9: a double application (0.75**18) would be far off
    for step in (0, 0, 1, 0):  # repeated updates must not compound
        sched.step_update(step)
    sched.step_update(0)
    assert lrs(opt) == pytest.approx([1.0 * s for s in scales], rel=1e-9)
    sched.step_update(50)  # cosine half way: 0.5 of the base
    assert lrs(opt) == pytest.approx([0.5 * s for s in scales], rel=1e-9)


def test_warmup_is_linear_and_scaled_once():
    opt = _layer_decay_optimizer()
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_steps=10, warmup_lr=0.1, min_lr=0.0)
    scales = [g["lr_scale"] for g in opt.param_groups]
    sched.step_update(0)
    assert lrs(opt) == pytest.approx([0.1 * s for s in scales], rel=1e-9)
    sched.step_update(5)
    assert lrs(opt) == pytest.approx([(0.1 + (1.0 - 0.1) * 5 / 10) * s for s in scales], rel=1e-9)
    sched.step_update(10)  # warmup over: the cosine starts from the base lr
    assert lrs(opt) == pytest.approx(scales, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# schedule shapes


def test_cosine_reaches_min_lr_at_the_end():
    opt = single_group_optimizer(1.0)
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_steps=10, warmup_lr=0.0, min_lr=0.01)
    values = []
    for step in range(10, 101):
        sched.step_update(step)
        values.append(lrs(opt)[0])
    assert values[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone after warmup
    mid = 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * 45 / 90))
    assert values[55 - 10] == pytest.approx(mid)
    assert values[-1] == pytest.approx(0.01)  # step == total_steps
    assert values[-2] == pytest.approx(0.01, abs=1e-3)  # the last real step is already at the floor


def test_multistep_multiplies_by_gamma_per_milestone_in_absolute_steps():
    # timm 1.0's MultiStepLRScheduler counts milestones from the end of warmup by default (warmup_prefix=True):
    # with 10 warmup steps, (30, 60) would act at steps 39 and 69. build_optimization passes absolute steps
    # (round(m * per_epoch)) and the official recipe means epoch 700 of 800, not 700 + warmup.
    opt = single_group_optimizer(1.0)
    sched = build_scheduler(opt, "multistep", total_steps=100, warmup_steps=10, warmup_lr=0.0, min_lr=0.0,
                            milestones=(30, 60), gamma=0.1)
    expected = {5: 0.5, 10: 1.0, 20: 1.0, 35: 0.1, 45: 0.1, 65: 0.01, 99: 0.01}  # away from the m-1 edge
    for step, lr in expected.items():
        sched.step_update(step)
        assert lrs(opt)[0] == pytest.approx(lr), step


def test_multistep_drops_exactly_at_the_milestone_step():
    # timm's MultiStepLRScheduler applies milestone m at t == m - 1 (bisect_right(decay_t, t + 1)), one step
    # early; the official Swin scheduler (bisect_right(milestones, t)) and build_scheduler's docstring drop at m.
    opt = single_group_optimizer(1.0)
    sched = build_scheduler(opt, "multistep", total_steps=100, warmup_steps=0, warmup_lr=0.0, min_lr=0.0,
                            milestones=(30, 60), gamma=0.1)
    got = {}
    for step in (29, 30, 59, 60):
        sched.step_update(step)
        got[step] = lrs(opt)[0]
    assert got == pytest.approx({29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01})


def test_unknown_schedule_kind_raises():
    with pytest.raises(ValueError, match="linear"):
        build_scheduler(single_group_optimizer(), "linear", total_steps=10, warmup_steps=0, warmup_lr=0.0,
                        min_lr=0.0)
