"""Activation recomputation modes: same outputs and gradients, less kept for backward, wired to model.recompute."""

import pytest
import torch
from conftest import perturb_

from simmim.config import ConfigError, PretrainConfig, load_config
from simmim.models import create_model
from simmim.pretrain import build_encoder


def _step(model, x, mode, amp=False):
    model.set_recompute(mode)
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout / drop-path draws in every mode
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_modes_give_the_same_outputs_and_gradients(amp):
    model = perturb_(create_model("swinv2_pico", img_size=96, window_size=6, num_classes=5, drop_path_rate=0.2,
                                  attn_drop_rate=0.1)).train()
    x = torch.randn(2, 3, 96, 96)
    ref_out, ref_grads = _step(model, x, "none", amp)
    for mode in ("attention", "full"):
        out, grads = _step(model, x, mode, amp)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0, msg=mode)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=f"{mode}: {name}")


def _saved_bytes_per_image(model, mode):
    """Bytes autograd keeps for backward per image (two batch sizes, parameters excluded)."""
    model.set_recompute(mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    totals = []
    for batch in (1, 3):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(batch, 3, 96, 96)).sum()
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / 2


def test_attention_mode_keeps_no_attention_maps():
    model = create_model("swinv2_pico", img_size=96, window_size=6, num_classes=0).train()
    kept = {mode: _saved_bytes_per_image(model, mode) for mode in ("none", "attention", "full")}
    assert kept["full"] < kept["attention"] < kept["none"]
    grids, heads, windows = [24, 12, 6, 3], [1, 2, 4, 8], [36, 36, 36, 9]  # 96 px, W6 (stage 4 clamped to 3x3)
    maps = sum(2 * g * g * h * n * 4 for g, h, n in zip(grids, heads, windows, strict=True))  # 2 blocks per stage
    assert kept["none"] - kept["attention"] >= maps  # at least the attention maps are gone
    # what attention mode keeps per token and block: qkv input C, qkv 3C, proj input C, proj output C, fc1 input C,
    # fc1 output 4C, fc2 output C = 12C (the stem, merges and head are counted in 'full' too)
    tokens_x_channels = sum(2 * g * g * 16 * 2**i for i, g in enumerate(grids))
    assert kept["attention"] - kept["full"] <= 12 * 4 * tokens_x_channels


def test_switches_and_config_key():
    model = create_model("swinv2_pico", img_size=64, window_size=4)
    model.set_grad_checkpointing(True)  # timm's switch means full recomputation
    assert model.recompute == "full" and all(stage.grad_checkpointing for stage in model.layers)
    model.set_recompute("attention")
    assert all(b.attn.recompute_core and b.mlp.recompute_act for b in model.blocks())
    model.layers[0].grad_checkpointing = False
    assert model.layers[0].recompute == "none" and not model.layers[0].blocks[0].attn.recompute_core
    with pytest.raises(ValueError, match="recompute must be one of none, attention, full.*model.recompute"):
        model.set_recompute("selective")

    cfg = load_config(PretrainConfig, None, ["model.name=swinv2_pico", "model.img_size=64", "model.window_size=4",
                                             "model.recompute=attention"])
    assert build_encoder(cfg).recompute == "attention"
    # one key for one switch: the older model.grad_checkpointing (which silently overrode recompute) is refused,
    # naming its replacement
    with pytest.raises(ConfigError, match=r"'model\.grad_checkpointing' was removed; use model\.recompute=full"):
        load_config(PretrainConfig, None, ["model.recompute=attention", "model.grad_checkpointing=true"])
    with pytest.raises(ConfigError, match="model.recompute"):
        load_config(PretrainConfig, None, ["model.recompute=some"])
