"""Our variants in timm's registry: timm.create_model, its feature wrappers and pretrained_cfg_overlay files."""

import pytest
import timm
import torch
from conftest import perturb_
from safetensors.torch import save_file

import simmim.models  # noqa: F401  (registers the simmim_* names)
from simmim import SimMIM
from simmim.models import SwinTransformerV2, create_model, list_models, to_official
from simmim.models.hf import ours_to_hf

GEOMETRY = dict(img_size=64, window_size=4)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return perturb_(create_model("swinv2_pico", num_classes=0, **GEOMETRY)).eval()


def test_every_variant_is_registered_under_its_own_name():
    names = timm.list_models("simmim_*")
    assert sorted(names) == sorted(f"simmim_{v}" for v in list_models())
    assert not set(names) & set(timm.list_models("swinv2_*"))  # timm's own names stay timm's
    model = timm.create_model("simmim_swinv2_pico", **GEOMETRY)
    assert isinstance(model, SwinTransformerV2) and model.num_classes == 1000
    assert model.pretrained_cfg["architecture"] == "simmim_swinv2_pico"
    assert create_model("swinv2_pico").pretrained_cfg["architecture"] == "simmim_swinv2_pico"
    assert isinstance(timm.create_model("swinv2_tiny_window8_256"), timm.models.SwinTransformerV2)


def test_features_only_wrappers(encoder):
    x = torch.randn(1, 3, 96, 64)
    weights = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=encoder.state_dict()), **GEOMETRY)
    with torch.no_grad():
        maps = encoder.forward_intermediates(x, intermediates_only=True)  # (B, C, h, w)
        listed = timm.create_model("simmim_swinv2_pico", features_only=True, out_indices=(1, 3), **weights).eval()
        assert listed.feature_info.channels() == [32, 128] and listed.feature_info.reduction() == [8, 32]
        out = listed(x)  # timm's swin convention for this wrapper: channels-last maps
        torch.testing.assert_close(out, [maps[1].permute(0, 2, 3, 1), maps[3].permute(0, 2, 3, 1)])
        getter = timm.create_model("simmim_swinv2_pico", features_only=True, out_indices=(0, 2),
                                   feature_cls="getter", **weights).eval()
        torch.testing.assert_close(getter(x), [maps[0], maps[2]])
        assert len(getter.model.layers) == 3  # pruned after the last stage taken


@pytest.mark.parametrize("layout", ["ours", "simmim", "official", "hf"])
def test_pretrained_cfg_overlay_reads_our_files_and_foreign_layouts(encoder, layout, tmp_path):
    sd = encoder.state_dict()
    if layout == "simmim":
        wrapped = SimMIM(create_model("swinv2_pico", num_classes=0, **GEOMETRY))
        wrapped.encoder.load_state_dict(sd, strict=False)
        sd = wrapped.state_dict()  # encoder.* with mask_token, decoder.0.*
    elif layout == "official":
        sd = to_official(sd, rpe_mlp=True)
    elif layout == "hf":
        sd = ours_to_hf(sd)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    x = torch.randn(2, 3, 64, 64)
    loaded = timm.create_model("simmim_swinv2_pico", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(path)), **GEOMETRY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
        classifier = timm.create_model("simmim_swinv2_pico", pretrained=True, num_classes=7,
                                       pretrained_cfg_overlay=dict(file=str(path)), **GEOMETRY).eval()
        torch.testing.assert_close(classifier.forward_features(x), encoder.forward_features(x), rtol=0, atol=0)
    assert classifier(x).shape == (2, 7)


def test_pretrained_weights_adapt_to_one_channel(encoder, tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_file(encoder.state_dict(), str(path))
    gray = timm.create_model("simmim_swinv2_pico", pretrained=True, num_classes=0, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(path)), **GEOMETRY)
    torch.testing.assert_close(gray.patch_embed.proj.weight, encoder.patch_embed.proj.weight.sum(1, keepdim=True))
