"""The encoder as a dense-task backbone: any input size (padded), forward_intermediates, pruning, timm's model API."""

import pytest
import torch
from conftest import perturb_

from simmim.models import create_model
from simmim.models.swin_transformer_v2 import pad_to_multiple, shift_mask_for


def pico(**kw):
    return perturb_(create_model("swinv2_pico", **{"img_size": 64, "window_size": 4, "num_classes": 0, **kw})).eval()


@pytest.mark.parametrize("size", [(96, 128), (100, 140), (800, 1344)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_input_size_gives_ceil_sized_maps(size):
    model = pico(img_size=192, window_size=12)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
    expected = [(-(-size[0] // r), -(-size[1] // r)) for r in (4, 8, 16, 32)]
    assert [tuple(m.shape[2:]) for m in maps] == expected
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    assert features.shape == (1, *expected[-1], 128) and torch.isfinite(features).all()
    torch.testing.assert_close(final, features)


def test_padding_follows_hf_swinv2():
    """HF's Swinv2 pads to the patch size, to even sides before merging and to the window (then shifts, with the mask
    of the padded grid): the same weights give the same features at sizes that need all three."""
    transformers = pytest.importorskip("transformers")
    from simmim.models.hf import hf_config, ours_to_hf

    model = pico(img_size=192, window_size=12)
    hf = transformers.Swinv2Model(transformers.Swinv2Config(**hf_config(model))).eval()
    hf.load_state_dict(ours_to_hf(model.state_dict(), prefix=""), strict=True)
    for size in [(192, 192), (96, 128), (100, 140)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf(x).pooler_output, atol=2e-5, rtol=1e-5)


def test_the_built_size_pads_nothing_and_uses_the_precomputed_mask():
    x = torch.randn(2, 16, 16, 8)
    assert pad_to_multiple(x, (4, 4)) is x  # no copy at the built size
    assert pad_to_multiple(x, (5, 6)).shape == (2, 20, 18, 8)
    model = pico()
    blk = model.layers[0].blocks[1]  # shifted, 16x16 grid, window 4
    assert shift_mask_for(x, blk.attn_mask, blk.resolution, blk.window, blk.shift) is blk.attn_mask
    other = torch.randn(1, 20, 24, 8)
    mask = shift_mask_for(other, blk.attn_mask, blk.resolution, blk.window, blk.shift)
    assert mask.shape == (5 * 6, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert shift_mask_for(other, blk.attn_mask, blk.resolution, blk.window, blk.shift) is mask  # cached


def test_forward_intermediates_follows_timm_semantics():
    model = pico()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == 4 and all(m.is_contiguous() for m in maps)
        torch.testing.assert_close(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2, maps[2:])
        picked = model.forward_intermediates(x, indices=[0, -1], norm=True, intermediates_only=True)
        torch.testing.assert_close(picked[0], maps[0])
        torch.testing.assert_close(picked[1], final.permute(0, 3, 1, 2))  # norm applies to the last stage only
        early, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early.permute(0, 3, 1, 2), maps[1])  # stopped after stage 1, unnormed
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[1].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers_keeps_the_maps_it_returns():
    model = pico(num_classes=7)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and len(model.layers) == 2
        assert isinstance(model.norm, torch.nn.Identity) and model.num_classes == 0
        assert model.num_features == model.head_hidden_size == 32
        torch.testing.assert_close(model.forward_intermediates(x, kept, intermediates_only=True), maps[:2])
        assert model.forward_features(x).shape == (1, 12, 8, 32)


def test_timm_model_api():
    model = pico(num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    assert model.get_classifier() is model.head.fc and model.head_hidden_size == 128
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["pool_size"] == (2, 2) and not cfg["fixed_input_size"]
    assert f"{cfg['first_conv']}.weight" in model.state_dict() and f"{cfg['classifier']}.weight" in model.state_dict()
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 2, 2, 128)  # unpooled, channels-last (output_fmt NHWC)
    model.reset_classifier(3, "avg")
    assert model(x).shape == (2, 3) and model.global_pool == "avg"
    from timm.models._manipulate import group_parameters

    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    group_of = {n: g for g, members in groups.items() for n in members}
    assert all(n.startswith("patch_embed") for n in groups[0])  # the stem first, a group per block, the norm
    assert group_of["layers.1.downsample.reduction.weight"] == group_of["layers.1.blocks.0.norm1.weight"]
    assert group_of["norm.weight"] == max(group_of[n] for n in group_of if n.startswith("layers."))  # as timm
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1  # stem, 4 stages, norm/head
