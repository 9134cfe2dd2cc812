"""Weights come back at the geometry they were trained at (issue 17 item 1): ``simmim.load_encoder`` on every
source the weights reader knows, the README's timm one-liner, and refusals when a model normalises its position bias
by other windows than the weights were trained at. The fixture encoder is trained at 64 px / W4 (windows 4/4/4/2),
far from the variant's default 192 px / W12, so a model built at the default cannot match it."""

import copy
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import PICO
from safetensors.torch import save_file
from test_finetune import pretrain_checkpoint
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

import simmim
from simmim.cli import main
from simmim.errors import UserError
from simmim.models import create_model, load_pretrained, to_official
from simmim.models.convert import geometry_from_buffers
from simmim.weights import Geometry, model_from_weights, read_run_checkpoint, read_weights

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINED = [(4, 4), (4, 4), (4, 4), (2, 2)]


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The official layout with the geometry buffers the official code saves, through timm's model (its buffer
    names are the official ones)."""
    ref = TimmSwinV2(img_size=model.img_size, window_size=model.window_size, num_classes=0,
                     pretrained_window_sizes=[w[0] for w in model.pretrained_window_sizes], **PICO)
    ref.load_state_dict(model.state_dict())
    sd = to_official(ref.state_dict(), rpe_mlp=True)
    sd.update({k: v.clone() for k, v in ref.named_buffers()
               if k.endswith(("relative_coords_table", "relative_position_index", "attn_mask"))})
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    ckpt = pretrain_checkpoint(tmp)  # a perturbed swinv2_pico at 64 px / W4
    assert main(["export", str(ckpt), "--out", str(tmp / "encoder.safetensors")]) == 0
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp / "timm.pth")]) == 0
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp / "hf")]) == 0
    (tmp / "header").mkdir()
    shutil.copy(tmp / "encoder.safetensors", tmp / "header" / "encoder.safetensors")  # without its card
    ref = model_from_weights(read_run_checkpoint(ckpt))
    torch.save({"model": official_state(ref), "epoch": 99}, tmp / "official.pth")
    save_file(ref.state_dict(), str(tmp / "bare.safetensors"))  # no metadata at all
    return {"run": ckpt, "export": tmp / "encoder.safetensors", "timm-export": tmp / "timm.pth",
            "hf": tmp / "hf", "header": tmp / "header" / "encoder.safetensors", "official": tmp / "official.pth",
            "bare": tmp / "bare.safetensors", "ref": ref, "dir": tmp}


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["run", "export", "timm-export", "hf", "header", "official", "bare"])
def test_load_encoder_builds_the_trained_geometry_from_every_source(files, kind):
    geometry = dict(img_size=64, window_size=4) if kind == "bare" else {}  # a bare state dict records none
    encoder = simmim.load_encoder(files[kind], **geometry)
    assert encoder.img_size == (64, 64) and encoder.window_size == (4, 4) and encoder.num_classes == 0
    assert encoder.trained_window_sizes == TRAINED and not encoder.training
    with torch.no_grad():
        torch.testing.assert_close(encoder(X), files["ref"](X), rtol=0, atol=1e-5)


def test_load_encoder_moves_to_the_asked_geometry_keeping_the_trained_windows(files):
    encoder = simmim.load_encoder(files["export"], img_size=96, window_size=6)
    assert encoder.img_size == (96, 96) and encoder.effective_window_sizes == [(6, 6), (6, 6), (6, 6), (3, 3)]
    assert encoder.pretrained_window_sizes == TRAINED  # log-CPB normalised as trained
    expected = copy.deepcopy(files["ref"])
    expected.set_input_size(img_size=96, window_size=6)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), expected(x), rtol=0, atol=1e-5)


def test_load_encoder_asks_for_the_geometry_a_bare_file_does_not_record(files):
    with pytest.raises(UserError, match=r"does not record the geometry.*img_size=\.\.\., window_size="):
        simmim.load_encoder(files["bare"])


def test_official_geometry_comes_from_its_saved_buffers(files):
    assert read_weights(files["official"]).geometry == Geometry(None, (64, 64), (4, 4), TRAINED)
    moved = create_model("swinv2_pico", img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6),
                         num_classes=0)
    assert geometry_from_buffers(official_state(moved)) == ((256, 256), (16, 16), [(12, 12)] * 3 + [(6, 6)])


def readme_timm_block() -> str:
    section = README.read_text().split("**In timm.**")[1].split("\n**")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def test_readme_timm_one_liner_builds_the_trained_model(files, monkeypatch):
    code = readme_timm_block().replace("simmim_swinv2_tiny", "simmim_swinv2_pico")
    assert 'pretrained_cfg_overlay=dict(file="encoder.safetensors")' in code  # the call under test, as printed
    monkeypatch.chdir(files["dir"])
    scope: dict = {}
    exec(code, scope)
    encoder = scope["encoder"].eval()
    assert encoder.img_size == (64, 64) and encoder.trained_window_sizes == TRAINED
    assert encoder.pretrained_cfg["input_size"] == (3, 64, 64) and encoder.pretrained_cfg["pool_size"] == (2, 2)
    assert timm.data.resolve_data_config(model=encoder)["input_size"] == (3, 64, 64)
    assert "state_dict" not in encoder.pretrained_cfg  # no second reference to the file's tensors
    with torch.no_grad():
        torch.testing.assert_close(encoder(X), files["ref"](X), rtol=0, atol=0)


def test_timm_takes_a_move_and_refuses_a_mismatch_in_one_line(files):
    overlay = dict(file=str(files["export"]))
    moved = timm.create_model("simmim_swinv2_pico", pretrained=True, num_classes=0, img_size=96, window_size=6,
                              pretrained_cfg_overlay=overlay).eval()
    assert moved.pretrained_window_sizes == TRAINED and moved.pretrained_cfg["input_size"] == (3, 96, 96)
    with pytest.raises(UserError, match=r"trained with position-bias windows \[\[4, 4\], .*pretrained_window_sizes"):
        timm.create_model("simmim_swinv2_pico", pretrained=True, pretrained_window_sizes=(8, 8, 8, 8),
                          pretrained_cfg_overlay=overlay)
    with pytest.raises(UserError, match="holds swinv2_pico weights, not swinv2_nano: create simmim_swinv2_pico"):
        timm.create_model("simmim_swinv2_nano", pretrained=True, pretrained_cfg_overlay=overlay)
    # any file the reader knows: an HF directory too
    hf = timm.create_model("simmim_swinv2_pico", pretrained=True, num_classes=0,
                           pretrained_cfg_overlay=dict(file=str(files["hf"]))).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X), files["ref"](X), rtol=0, atol=1e-5)


def test_load_pretrained_refuses_weights_trained_at_other_windows(files):
    default = create_model("swinv2_pico", num_classes=0)  # 192 px / W12: windows 12/12/12/6
    before = {k: v.clone() for k, v in default.state_dict().items()}
    with pytest.raises(UserError, match=r"trained with position-bias windows 4/4/4/2, but the model normalises by "
                                        r"12/12/12/6 \(192 px, window 12\).*load_encoder"):
        load_pretrained(default, read_weights(files["export"]))
    with pytest.raises(UserError, match="4/4/4/2"):  # a raw official state dict says it through its buffers
        load_pretrained(default, torch.load(files["official"], weights_only=True))
    assert all(torch.equal(v, before[k]) for k, v in default.state_dict().items())  # nothing loaded
    with pytest.raises(TypeError, match=r"read_weights\(path\)"):  # paths are read by the one reader only
        load_pretrained(default, files["export"])
    # the trained geometry, or another size with the trained windows, loads
    load_pretrained(create_model("swinv2_pico", num_classes=0, img_size=64, window_size=4), read_weights(files["hf"]))
    load_pretrained(create_model("swinv2_pico", num_classes=0, img_size=128, window_size=8,
                                 pretrained_window_sizes=TRAINED), read_weights(files["export"]))
