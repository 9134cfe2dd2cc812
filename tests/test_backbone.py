"""The SwinV2 backbone: numerical parity with timm, geometry, memory switches, ablations and errors."""

import math

import pytest
import torch
from conftest import PICO, perturb_
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from simmim.models import SwinTransformerV2, create_model, list_models
from simmim.models.swin_transformer_v2 import (
    relative_coords_table,
    shifted_window_mask,
    shifted_window_order,
    window_partition,
)

PARITY_CASES = [
    dict(img_size=192, window_size=12),
    dict(img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6)),
    dict(img_size=288, window_size=3),  # 24/12/6/3 windows per side: stage 4 has an odd count, all shifted
]


def timm_pair(num_classes: int, **geometry):
    ref = perturb_(TimmSwinV2(num_classes=num_classes, **PICO, **geometry)).eval()
    ours = SwinTransformerV2(num_classes=num_classes, **PICO, **geometry).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("geometry", PARITY_CASES, ids=lambda g: f"{g['img_size']}px-W{g['window_size']}")
@pytest.mark.parametrize("num_classes", [0, 10])
def test_parity_with_timm(geometry, num_classes):
    ref, ours = timm_pair(num_classes, **geometry)
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    x = torch.randn(2, 3, geometry["img_size"], geometry["img_size"])
    with torch.no_grad():
        expected = ref(x)
        for fused in (True, False):  # the SDPA kernel and the explicit softmax path
            ours.set_fused_attn(fused)
            got = ours(x)
            torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (2, num_classes or ours.num_features)
    assert expected.std() > 0.1  # the comparison is on non-trivial outputs


def test_parity_with_timm_under_bf16_autocast():
    """Same casts as timm under autocast: bf16 products, a float32 residual stream and float32 softmax."""
    ref, ours = timm_pair(0, img_size=64, window_size=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref.forward_features(x), ours.forward_features(x)
        block_out = ours.layers[0].blocks[1](torch.randn(2, 16, 16, 16))
    assert got.dtype == expected.dtype and block_out.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_parity_with_timm_after_set_input_size():
    ref, ours = timm_pair(10, img_size=192, window_size=12, pretrained_window_sizes=(12, 12, 12, 6))
    ref.set_input_size(img_size=(256, 256), window_size=16)
    ours.set_input_size(img_size=256, window_size=16)
    assert ours.effective_window_sizes == [(16, 16)] * 3 + [(8, 8)]
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_effective_windows_and_shifts_follow_the_reference():
    for img, win, expected in [(192, 12, [12, 12, 12, 6]), (224, 14, [14, 14, 14, 7]), (256, 16, [16, 16, 16, 8])]:
        with torch.device("meta"):
            model = create_model("swinv2_pico", img_size=img, window_size=win)
        assert [w[0] for w in model.effective_window_sizes] == expected
        shifts = [blk.shift[0] for blk in model.blocks()]
        # odd blocks shift by window // 2, except where the stage is no larger than the window (<=)
        assert shifts == [0, win // 2, 0, win // 2, 0, 0, 0, 0]


def test_log_cpb_coordinates_match_the_formula():
    table = relative_coords_table((3, 3), (0, 0))  # normalised by window - 1 = 2
    assert table.shape == (1, 5, 5, 2)
    x = 2 / 2 * 8  # offset +2 -> 1.0 -> 8 -> log2(9)/log2(8)
    assert table[0, 4, 2, 0].item() == pytest.approx(math.log2(1 + x) / 3)
    assert table[0, 0, 2, 0].item() == pytest.approx(-math.log2(1 + x) / 3)
    transferred = relative_coords_table((5, 5), (3, 3))  # normalised by the pretrained window - 1
    assert transferred[0, 8, 4, 0].item() == pytest.approx(math.log2(1 + 4 / 2 * 8) / 3)
    assert torch.isfinite(relative_coords_table((1, 1), (0, 0))).all()  # window 1: no 0/0


def test_shift_mask_separates_regions():
    mask = shifted_window_mask((8, 8), (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window is one region
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert shifted_window_mask((8, 8), (4, 4), (0, 0)) is None


def test_shifted_window_gather_equals_roll_and_partition():
    x = torch.randn(2, 8, 12, 5)
    order = shifted_window_order((8, 12), (4, 4), (2, 2))
    expected = window_partition(torch.roll(x, (-2, -2), dims=(1, 2)), (4, 4))  # (B*nW, N, C)
    assert torch.equal(x.reshape(2, 96, 5).index_select(1, order).view(-1, 16, 5), expected)
    assert torch.equal(order[order.argsort()], torch.arange(96))
    assert shifted_window_order((8, 12), (4, 4), (0, 0)) is None


def test_set_input_size_keeps_parameters_and_uses_pretrained_windows():
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_input_size(img_size=96, window_size=6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # CPB coordinates are normalised by the windows the MLP was trained at (64 px / W4 -> 4/4/4/2)
    assert model.pretrained_window_sizes == [(4, 4), (4, 4), (4, 4), (2, 2)]
    direct = create_model("swinv2_pico", img_size=96, window_size=6, num_classes=0,
                          pretrained_window_sizes=(4, 4, 4, 2))
    for a, b in zip(model.blocks(), direct.blocks(), strict=True):
        torch.testing.assert_close(a.attn.relative_coords_table, b.attn.relative_coords_table)
        assert torch.equal(a.attn.relative_position_index, b.attn.relative_position_index)
        assert (a.attn_mask is None) == (b.attn_mask is None)
    direct.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), direct.eval()(x))


def test_set_input_size_validates_before_changing_anything():
    model = create_model("swinv2_pico", img_size=64, window_size=4)
    with pytest.raises(ValueError, match="not a multiple of window_size"):
        model.set_input_size(img_size=96, window_size=5)
    assert model.img_size == (64, 64) and model.window_size == (4, 4)


def _loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("switch", ["fused", "checkpointing", "sequential-1", "sequential-3", "sequential-big"])
def test_memory_and_speed_switches_do_not_change_results(switch):
    model = perturb_(create_model("swinv2_pico", img_size=96, window_size=6, num_classes=5, drop_path_rate=0.0))
    model.train()
    x = torch.randn(2, 3, 96, 96)
    model.set_fused_attn(False)
    ref_out, ref_grads = _loss_and_grads(model, x)
    if switch == "fused":
        model.set_fused_attn(True)
    elif switch == "checkpointing":
        model.set_grad_checkpointing(True)
    else:  # chunk sizes that divide nW, do not divide it, and exceed B*nW
        model.set_sequential_attention({"sequential-1": 1, "sequential-3": 3, "sequential-big": 10_000}[
            switch])
    out, grads = _loss_and_grads(model, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_position_bias_is_cached_at_inference_and_refreshed_when_weights_change():
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4)).eval()
    attn = model.blocks()[0].attn
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        cached = attn._bias_cache[1]
        model(x)
        assert attn._bias_cache[1] is cached  # reused
        other = perturb_(create_model("swinv2_pico", img_size=64, window_size=4), seed=1)
        model.load_state_dict(other.state_dict())  # in-place copy bumps the parameter versions
        second = model(x)
    assert attn._bias_cache[1] is not cached
    torch.testing.assert_close(second, other.eval()(x).detach())
    assert not torch.allclose(first, second)
    model.train()
    model(x)
    assert attn._bias_cache is None  # never cached while training


def test_blocks_start_as_identity():
    model = create_model("swinv2_pico", img_size=64, window_size=4)
    x = torch.randn(2, 8, 8, 32)
    blk = model.layers[1].blocks[1]
    assert torch.equal(blk(x), x)  # zero-initialised res-post-norms


@pytest.mark.parametrize("option", [
    dict(norm_placement="pre"), dict(attention="dot"), dict(position_bias="linear_cpb"),
    dict(position_bias="table"), dict(extra_norm_period=1),
])
def test_ablation_switches_build_run_and_transfer(option):
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=3, **option))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    names = set(model.state_dict())
    assert any("logit_scale" in n for n in names) == (option.get("attention", "cosine") == "cosine")
    assert any("relative_position_bias_table" in n for n in names) == (option.get("position_bias") == "table")
    model.set_input_size(img_size=96, window_size=6)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_pre_norm_keeps_unit_norm_weights():
    model = create_model("swinv2_pico", img_size=64, window_size=4, norm_placement="pre")
    assert torch.equal(model.blocks()[0].norm1.weight, torch.ones(16))


def test_forward_intermediates_give_the_feature_pyramid():
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
        final = model.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    torch.testing.assert_close(maps[-1], final.permute(0, 3, 1, 2))
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


def test_masked_tokens_are_replaced_by_the_mask_token():
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0))
    with pytest.raises(ValueError, match="init_mask_token"):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 16, 16, dtype=torch.bool))
    model.init_mask_token()
    assert model.state_dict()["mask_token"].shape == (1, 1, 16)
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    tokens = model._embed(x, mask)
    torch.testing.assert_close(tokens[0, :8], model.mask_token[0].expand(8, 16, 16))
    torch.testing.assert_close(tokens[0, 8:], model.patch_embed(x)[0, 8:])


def test_meta_device_build_and_materialise():
    with torch.device("meta"):
        model = create_model("swinv2_pico", img_size=64, window_size=4)
    model.to_empty(device="cpu")
    model.init_non_persistent_buffers()
    fresh = create_model("swinv2_pico", img_size=64, window_size=4)
    for (name, a), (_, b) in zip(model.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name,expected,tol", [("swinv2_giant", 3.0e9, 0.1e9), ("swinv2_huge", 0.66e9, 0.01e9),
                                               ("swinv2_base", 88e6, 1e6), ("swinv2_tiny", 28e6, 0.5e6)])
def test_parameter_counts_on_meta_device(name, expected, tol):
    with torch.device("meta"):
        model = create_model(name)
    assert abs(sum(p.numel() for p in model.parameters()) - expected) < tol


def test_extra_norm_every_six_blocks_in_huge_and_giant_only():
    with torch.device("meta"):
        giant, base = create_model("swinv2_giant"), create_model("swinv2_base")
    assert sum(b.extra_norm is not None for b in giant.blocks()) == 42 // 6
    assert all(b.extra_norm is None for b in base.blocks())
    assert list_models()[-2:] == ["swinv2_huge", "swinv2_giant"]


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'swinv2_tinny'.*swinv2_tiny"):
        create_model("swinv2_tinny")
    with pytest.raises(TypeError, match="unknown option.*windowsize"):
        create_model("swinv2_pico", windowsize=7)
    with pytest.raises(ValueError, match="not a multiple of patch_size 4"):
        create_model("swinv2_pico", img_size=194)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        create_model("swinv2_pico", img_size=200)
    with pytest.raises(ValueError, match="stage 1 token grid 12x12.*window_size 8x8"):
        create_model("swinv2_pico", img_size=96, window_size=8)
