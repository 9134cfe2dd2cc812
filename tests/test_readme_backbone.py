"""The README's snippets for using the encoder in detection and segmentation run as written (on swinv2_pico, the
names and sizes swapped): the timm and transformers ones give the maps our own forward_intermediates gives (the
timm one at the geometry read from the file), the torchvision recipe trains a Faster R-CNN for one step."""

import re
from pathlib import Path

import pytest
import torch
from test_finetune import pretrain_checkpoint

from simmim.cli import main
from simmim.weights import model_from_weights, read_run_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
SWAP = {"simmim_swinv2_base": "simmim_swinv2_pico", "swinv2b": "encoder",
        "torch.randn(1, 3, 800, 1344)": "X"}  # X: a 96x128 image, see below
# the detection recipe on tiny images, a narrow FPN and few proposals: one step in about a second
DETECTION = {"num_classes=91)": "num_classes=3, min_size=64, max_size=96, rpn_pre_nms_top_n_train=100, "
                                "rpn_post_nms_top_n_train=20, box_batch_size_per_image=16)",
             "detection_backbone(encoder)": "detection_backbone(encoder, out_channels=32)",
             "torch.rand(3, 800, 1344)": "torch.rand(3, 72, 100)", "torch.rand(3, 600, 900)": "torch.rand(3, 64, 80)",
             "[[100.0, 120.0, 400.0, 500.0]]": "[[10.0, 12.0, 40.0, 50.0]]"}


def snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Using the encoder for detection and segmentation")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("which", [0, 1], ids=["timm", "transformers"])
def test_readme_dense_task_snippets_run(which, tmp_path, monkeypatch, capsys):
    code = snippets()[which]
    for old, new in SWAP.items():
        code = code.replace(old, new)
    ckpt = pretrain_checkpoint(tmp_path)  # perturbed swinv2_pico weights (64 px / W4): a fresh model cannot match
    assert main(["export", str(ckpt), "--out", str(tmp_path / "encoder.safetensors")]) == 0
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "encoder-hf")]) == 0
    monkeypatch.chdir(tmp_path)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))  # not a multiple of the windows
    scope: dict = {"X": x}
    exec(code, scope)
    assert [tuple(f.shape) for f in scope["features"]] == [(1, 16, 24, 32), (1, 32, 12, 16), (1, 64, 6, 8),
                                                            (1, 128, 3, 4)]
    with torch.no_grad():
        ours = model_from_weights(read_run_checkpoint(ckpt)).forward_intermediates(x, intermediates_only=True)
    for got, expected in zip(scope["features"], ours, strict=True):
        torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)


def test_readme_detection_recipe_trains_a_faster_rcnn_step(tmp_path, monkeypatch, capsys):
    code = snippets()[2]
    for old, new in {**SWAP, **DETECTION}.items():
        assert old in code or old not in DETECTION, f"the README recipe no longer has {old!r}"
        code = code.replace(old, new)
    ckpt = pretrain_checkpoint(tmp_path)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "encoder.safetensors")]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code, scope)
    losses, encoder = scope["losses"], scope["encoder"]
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert encoder.img_size == (64, 64) and encoder.trained_window_sizes == [(4, 4)] * 3 + [(2, 2)]
    assert scope["model"].backbone.body is encoder
    assert encoder.layers[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the loss reaches the encoder
    assert "loss_classifier" in capsys.readouterr().out
