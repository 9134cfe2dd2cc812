"""Checkpoint converters: official classification and SimMIM layouts, timm, safe loading and clear mismatches."""

import pytest
import torch
from conftest import PICO, perturb_
from safetensors.torch import save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from simmim.models import convert_state_dict, create_model, detect_format, load_pretrained, to_official
from simmim.models.convert import CheckpointMismatchError
from simmim.weights import read_checkpoint, read_weights


class OfficialConfig:
    """Stands in for the yacs CfgNode the official code pickles into its checkpoints."""

    def __init__(self):
        self.MODEL = {"TYPE": "swinv2"}


def timm_reference(num_classes=7):
    return perturb_(TimmSwinV2(img_size=64, window_size=4, num_classes=num_classes, **PICO)).eval()


def official_from_timm(ref, rpe_mlp=False, prefix=""):
    """The official key layout, built from a timm model: stage-end downsample, `head`, saved geometry buffers."""
    sd = to_official(ref.state_dict(), rpe_mlp=rpe_mlp)
    for name, buf in ref.named_buffers():
        if name.endswith(("relative_coords_table", "relative_position_index", "attn_mask")):
            sd[name] = buf.clone()  # the official code saves these; the converter must drop them
    return {prefix + k: v for k, v in sd.items()}


def test_official_layout_differs_where_the_reference_says():
    ref = timm_reference()
    sd = official_from_timm(ref)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    assert "head.weight" in sd and "head.fc.weight" not in sd
    assert detect_format(sd) == "official" and detect_format(ref.state_dict()) == "timm"
    assert convert_state_dict(sd).keys() == ref.state_dict().keys()
    assert convert_state_dict(to_official(ref.state_dict())).keys() == ref.state_dict().keys()


def test_official_classification_checkpoint_round_trip(tmp_path):
    ref = timm_reference()
    path = tmp_path / "official.pth"
    torch.save({"model": official_from_timm(ref), "epoch": 99, "config": OfficialConfig()}, path)
    ours = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=7).eval()
    load_pretrained(ours, read_weights(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_official_simmim_checkpoint_converts_and_loads_into_an_encoder(tmp_path):
    ref = timm_reference(num_classes=0)
    sd = official_from_timm(ref, rpe_mlp=True, prefix="encoder.")
    sd["encoder.mask_token"] = torch.randn(1, 1, 16)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.randn(3072, 128, 1, 1), torch.randn(3072)
    path = tmp_path / "simmim_official.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 799, "config": OfficialConfig()}, path)

    converted = convert_state_dict(read_checkpoint(path)["model"])
    assert "encoder.layers.1.blocks.0.attn.cpb_mlp.0.weight" in converted
    assert "encoder.layers.1.downsample.reduction.weight" in converted
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias"} <= converted.keys()
    assert not any(k.endswith("relative_position_index") or ".rpe_mlp." in k for k in converted)

    encoder = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0).eval()
    load_pretrained(encoder, read_weights(path))  # decoder and mask token are not part of a bare encoder
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), ref(x), atol=1e-5, rtol=1e-5)


def test_timm_safetensors_file_loads(tmp_path):
    ref = timm_reference()
    save_file(ref.state_dict(), tmp_path / "timm.safetensors")
    ours = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=7).eval()
    load_pretrained(ours, read_weights(tmp_path / "timm.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # and back: our weights load into timm with strict=True
    back = TimmSwinV2(img_size=64, window_size=4, num_classes=7, **PICO).eval()
    back.load_state_dict(ours.state_dict(), strict=True)


def test_mismatched_checkpoints_fail_loudly_and_leave_the_model_untouched():
    ref = timm_reference()
    nano = create_model("swinv2_nano", img_size=64, window_size=4, num_classes=7)
    before = {k: v.clone() for k, v in nano.state_dict().items()}
    wrong_variant = "checkpoint holds a swinv2_pico encoder, the model is a swinv2_nano; build the model as swinv2_pico"
    with pytest.raises(CheckpointMismatchError, match=wrong_variant):  # named, not hundreds of mismatched keys
        load_pretrained(nano, ref.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in nano.state_dict().items())

    other_head = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match=r"head.fc.weight: checkpoint \(7, 128\) vs model \(3, 128\)"):
        load_pretrained(other_head, ref.state_dict())
    load_pretrained(other_head, ref.state_dict(), exclude=["head."])  # a deliberate re-initialisation
    torch.testing.assert_close(other_head.patch_embed.proj.weight, ref.patch_embed.proj.weight)

    encoder = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(2\): head.fc.bias, head.fc.weight"):
        load_pretrained(encoder, ref.state_dict())
    partial = {k: v for k, v in ref.state_dict().items() if not k.startswith("layers.3")}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): layers.3"):
        load_pretrained(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=7), partial)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match="no state dict found"):
        load_pretrained(create_model("swinv2_pico", img_size=64, window_size=4), {"epoch": 3})


@pytest.mark.parametrize("num_classes", [7, 0])
def test_official_conversion_agrees_with_timms_own_filter(num_classes):
    """An oracle independent of our converters: timm's checkpoint_filter_fn (timm's code, not ours) turns the
    official fixture into timm's layout. If to_official (which builds the fixture) or convert_state_dict had a
    mirrored bug, the timm model loaded through timm's filter would not reproduce the reference model."""
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    ref = timm_reference(num_classes)
    official = official_from_timm(ref)
    x = torch.randn(2, 3, 64, 64)
    through_timm = TimmSwinV2(img_size=64, window_size=4, num_classes=num_classes, **PICO).eval()
    through_timm.load_state_dict(checkpoint_filter_fn({"model": official}, through_timm), strict=True)
    ours = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=num_classes).eval()
    ours.load_state_dict(convert_state_dict(official), strict=True)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(through_timm(x), expected, rtol=0, atol=0)  # the fixture is really official
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_a_pickle_that_runs_code_is_refused_by_name_and_never_executed(tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload()}, path)
    with pytest.raises(ValueError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "system" in message and str(path) in message and "never executes pickled code" in message
    assert "weights_only=False" not in message  # no advice to load unsafely
    assert not marker.exists()
