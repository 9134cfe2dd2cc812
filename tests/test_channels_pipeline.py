"""Any channel count end to end (issue 11 item 5): grayscale data -> pretrain -> fine-tune -> eval -> export, a
multi-band .npy folder through pretraining, and every mismatch between data, config and checkpoint refused before
anything is written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain import TINY

from simmim.cli import main
from simmim.weights import read_checkpoint

GRAY = ["model.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]"]
GRAY_FT = ["model.img_size=32", "model.window_size=4", "data.batch_size=24", "schedule.max_steps=6",
           "run.progress=false", "run.log_every=3", *GRAY]


def test_grayscale_pretrain_finetune_eval_export(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", "demo/pretrain", *TINY, *GRAY, "--data", "embedded:digits", "--output", str(pre),
                 "schedule.max_steps=6", "run.image_every=3"]) == 0
    ckpt = sorted((pre / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = read_checkpoint(ckpt)
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == 1
    assert state["model"]["decoder.0.weight"].shape[0] == 32 * 32 * 1  # the decoder predicts one channel
    assert state["meta"]["in_chans"] == 1 and state["meta"]["mean"] == [0.5]
    grid = Image.open(sorted((pre / "images").glob("*.png"))[-1])
    assert grid.mode == "RGB" and grid.size[0] > 4 * 32  # the reconstruction picture shows gray digits

    ft = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", *GRAY_FT, "--pretrained", str(ckpt), "--output", str(ft)]) == 0
    best = ft / "checkpoints" / "best.pt"
    assert read_checkpoint(best)["meta"]["in_chans"] == 1
    capsys.readouterr()
    assert main(["eval", str(best), "--data", "embedded:digits"]) == 0
    assert "top-1" in capsys.readouterr().out

    for fmt, out in (("safetensors", "gray.safetensors"), ("timm", "gray-timm.safetensors"), ("hf", "gray-hf"),
                     ("onnx", "gray.onnx")):
        assert main(["export", str(best), "--format", fmt, "--out", str(tmp_path / out)]) == 0, fmt
    card = json.loads((tmp_path / "gray.safetensors.json").read_text())
    assert card["architecture"]["in_chans"] == 1 and card["mean"] == [0.5]
    assert json.loads((tmp_path / "gray-hf" / "config.json").read_text())["num_channels"] == 1
    assert json.loads((tmp_path / "gray-hf" / "preprocessor_config.json").read_text())["image_mean"] == [0.5]


def test_multiband_npy_folder_pretrains(tmp_path):
    data = tmp_path / "bands"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # 4-band 16-bit rasters, as remote sensing tiles come
        np.save(data / f"tile_{i}.npy", rng.integers(0, 65535, (40, 48, 4), dtype=np.uint16))
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "model.in_chans=4", "data.mean=[0.5,0.5,0.5,0.5]",
                 "data.std=[0.29,0.29,0.29,0.29]", "--data", str(data), "--output", str(out),
                 "schedule.max_steps=3", "data.batch_size=4", "run.image_every=3"]) == 0
    state = read_checkpoint(out / "checkpoints" / "ckpt-00000003.pt")
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == 4
    assert state["model"]["decoder.0.weight"].shape[0] == 32 * 32 * 4
    assert list((out / "images").glob("*.png"))  # the first three bands are shown


@pytest.mark.parametrize("args,message", [
    (["model.in_chans=1"], "data.mean=[0.485, 0.456, 0.406] has 3 values but model.in_chans is 1"),
    (["model.in_chans=4", "data.mean=[0.5,0.5,0.5,0.5]", "data.std=[0.3,0.3,0.3,0.3]"], "model.in_chans"),
])
def test_channel_mismatches_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "--data", "embedded:photos", "--output", str(out),
                 *args]) == 2  # RGB photos are not 4-band images
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_checkpoint_of_another_channel_count_is_refused(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", "demo/pretrain", *TINY, *GRAY, "--data", "embedded:digits", "--output", str(pre),
                 "schedule.max_steps=2"]) == 0
    ckpt = sorted((pre / "checkpoints").glob("ckpt-*.pt"))[-1]
    capsys.readouterr()
    for command in (["finetune", "demo/finetune", "--pretrained", str(ckpt)],
                    ["pretrain", "demo/pretrain", *TINY, "--init", str(ckpt)]):
        assert main([*command, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "trained on 1-channel images but model.in_chans is 3; set model.in_chans=1" in err
    assert not (tmp_path / "x").exists()
    assert main(["finetune", "demo/finetune", *GRAY_FT, "data.auto_augment=rand-m9-mstd0.5-inc1",
                 "--pretrained", str(ckpt), "--output", str(tmp_path / "x")]) == 2
    assert "RGB images only" in capsys.readouterr().err


def test_rgb_is_unchanged_by_the_channel_plumbing():
    from simmim.data import pretrain_transform

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    a = pretrain_transform(32)(img, torch.Generator().manual_seed(3))
    b = pretrain_transform(32, channels=3)(img, torch.Generator().manual_seed(3))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
