"""Fine-tuning and evaluation: window transfer from checkpoint metadata, official/timm inputs, labelled data
layouts, distributed evaluation, EMA, the eval sweep and probes."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_ENV, PICO, perturb_, torchrun
from PIL import Image
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from simmim.checkpoint import save_checkpoint
from simmim.cli import main
from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.configs import resolve
from simmim.data.labeled import open_labeled
from simmim.finetune import build_classifier
from simmim.models import create_model, to_official
from simmim.models.convert import CheckpointMismatchError, windows_from_coords_tables
from simmim.pretrain import checkpoint_metadata
from simmim.weights import read_checkpoint, read_weights

QUICK = ["run.progress=false", "run.log_every=5", "data.batch_size=16", "schedule.warmup_epochs=0.1"]


def pretrain_checkpoint(tmp_path: Path, name: str = "swinv2_pico", img_size: int = 64, window: int = 4) -> Path:
    """A SimMIM run checkpoint (our format) for a perturbed encoder at (img_size, window)."""
    cfg = load_config(PretrainConfig, None, [f"model.name={name}", f"model.img_size={img_size}",
                                             f"model.window_size={window}"])
    encoder = perturb_(create_model(name, img_size=img_size, window_size=window, num_classes=0))
    sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    sd["encoder.mask_token"] = torch.zeros(1, 1, encoder.embed_dim)
    sd["decoder.0.weight"] = torch.zeros(32 * 32 * 3, encoder.num_features, 1, 1)
    sd["decoder.0.bias"] = torch.zeros(32 * 32 * 3)
    path = tmp_path / f"pretrain-{name}-{img_size}.pt"
    save_checkpoint({"model": sd, "meta": checkpoint_metadata(cfg, encoder), "step": 1}, path)
    return path


def finetune_cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, resolve("demo/finetune"), [*QUICK, *overrides])


def test_transfer_derives_pretrained_windows_from_the_checkpoint(tmp_path):
    ckpt = pretrain_checkpoint(tmp_path)  # 64 px / W4: effective windows 4/4/4/2
    model, weights = build_classifier(finetune_cfg(f"pretrained={ckpt}", "model.img_size=96", "model.window_size=6"),
                                      num_classes=10)
    assert weights.windows == [(4, 4), (4, 4), (4, 4), (2, 2)]
    assert model.pretrained_window_sizes == weights.windows
    assert model.effective_window_sizes == [(6, 6), (6, 6), (6, 6), (3, 3)]
    direct = create_model("swinv2_pico", img_size=96, window_size=6, num_classes=10,
                          pretrained_window_sizes=(4, 4, 4, 2))
    for a, b in zip(model.blocks(), direct.blocks(), strict=True):
        torch.testing.assert_close(a.attn.relative_coords_table, b.attn.relative_coords_table, rtol=0, atol=0)
    # encoder weights came from the checkpoint, the head is new
    enc = read_weights(ckpt).encoder()
    torch.testing.assert_close(model.layers[2].blocks[1].attn.cpb_mlp[0].weight,
                               enc["layers.2.blocks.1.attn.cpb_mlp.0.weight"])
    # an explicit override wins
    model, _ = build_classifier(finetune_cfg(f"pretrained={ckpt}", "model.pretrained_window_sizes=[8,8,8,8]"), 10)
    assert model.pretrained_window_sizes == [(8, 8)] * 4


def test_official_checkpoints_carry_their_windows_in_the_coords_tables():
    ref = TimmSwinV2(img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6), num_classes=0, **PICO)
    official = to_official(ref.state_dict())
    official.update({k: v for k, v in ref.named_buffers() if k.endswith("relative_coords_table")})
    assert windows_from_coords_tables(official) == [(12, 12), (12, 12), (12, 12), (6, 6)]
    plain = TimmSwinV2(img_size=192, window_size=12, num_classes=0, **PICO)  # no pretrained windows: its own
    tables = {"encoder." + k: v for k, v in plain.named_buffers() if k.endswith("relative_coords_table")}
    assert windows_from_coords_tables(tables) == [(12, 12), (12, 12), (12, 12), (6, 6)]


def test_timm_file_without_metadata_needs_explicit_windows(tmp_path):
    ref = TimmSwinV2(img_size=64, window_size=4, num_classes=0, **PICO)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(ValueError, match="model.pretrained_window_sizes"):
        build_classifier(finetune_cfg(f"pretrained={tmp_path / 'timm.pth'}"), 10)
    model, _ = build_classifier(finetune_cfg(f"pretrained={tmp_path / 'timm.pth'}",
                                             "model.pretrained_window_sizes=[4,4,4,2]"), 10)
    torch.testing.assert_close(model.patch_embed.proj.weight, ref.patch_embed.proj.weight)


def test_mismatched_pretrained_checkpoint_is_refused(tmp_path, capsys):
    ckpt = pretrain_checkpoint(tmp_path, name="swinv2_nano")
    with pytest.raises(CheckpointMismatchError, match="holds a swinv2_nano encoder, but model.name is swinv2_pico"):
        build_classifier(finetune_cfg(f"pretrained={ckpt}"), 10)
    assert main(["finetune", "demo/finetune", "--pretrained", str(ckpt), "--output", str(tmp_path / "run"),
                 *QUICK]) == 2
    assert "set model.name=swinv2_nano" in capsys.readouterr().err


def _write_class_tree(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c_i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((40, 40, 3), np.uint8)
            base[..., c_i % 3] = 200  # a colour per class: learnable in a few steps
            noise = rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / c / f"img_{i}.JPEG")


def test_imagenet_folder_layout_fine_tunes_and_evaluates(tmp_path, capsys):
    classes = ["n01440764", "n01443537", "n01484850"]
    _write_class_tree(tmp_path / "imagenet" / "train", classes, 12, 0)
    _write_class_tree(tmp_path / "imagenet" / "val", classes, 4, 1)
    train = open_labeled(str(tmp_path / "imagenet"), "train")
    assert train.classes == classes and len(train) == 36
    assert len(open_labeled(str(tmp_path / "imagenet"), "validation")) == 12  # "val" is found for "validation"
    out = tmp_path / "run"
    code = main(["finetune", "demo/finetune", "--data", str(tmp_path / "imagenet"), "--output", str(out), *QUICK,
                 "model.img_size=64", "model.window_size=4", "schedule.max_steps=6", "data.batch_size=12",
                 "run.eval_every=3", "ema.enabled=true", "ema.decay=0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val top-1" in printed
    ckpt = read_checkpoint(out / "checkpoints" / "ckpt-00000006.pt")
    assert ckpt["meta"]["kind"] == "simmim-finetune" and ckpt["meta"]["classes"] == classes
    assert "ema" in ckpt["extra"] and ckpt["extra"]["ema"].keys() == ckpt["model"].keys()
    assert (out / "checkpoints" / "best.pt").is_file()
    log = (out / "train.log").read_text()
    assert "(12 images)" in log and "EMA top-1" in log

    assert main(["eval", str(out / "checkpoints" / "ckpt-00000006.pt"), "--data", str(tmp_path / "imagenet"),
                 "--sweep", "64:4,96:6,128:8"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:2] == ["img_size", "window"]
    assert [row.split()[:2] for row in table[1:]] == [["64", "W4"], ["96", "W6"], ["128", "W8"]]
    assert all(0 <= float(row.split()[3]) <= 100 for row in table[1:])


def test_datasets_image_label_layout_loads(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    split = {"image": [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(6)],
             "label": [0, 1, 0, 1, 1, 0]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(split, features=features),
                               "validation": datasets.Dataset.from_dict(split, features=features)})
    dd.save_to_disk(str(tmp_path / "hf"))
    src = open_labeled(str(tmp_path / "hf"), "train")
    assert src.classes == ["cat", "dog"] and len(src) == 6
    image, label = src[1]
    assert image.mode == "RGB" and image.size == (24, 24) and label == 1
    assert len(open_labeled(str(tmp_path / "hf"), "validation")) == 6


def test_digits_pretrain_finetune_eval_end_to_end(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", "demo/pretrain", "--output", str(pre), "run.progress=false", "schedule.max_steps=10",
                 "model.img_size=32", "data.mask_patch_size=8", "data.path=embedded:all"]) == 0
    ckpt = pre / "checkpoints" / "ckpt-00000010.pt"
    ft = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", "--pretrained", str(ckpt), "--output", str(ft), *QUICK,
                 "model.img_size=64", "model.window_size=4", "schedule.max_steps=40", "data.batch_size=32",
                 "run.eval_every=20"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("fine-tuned 40 steps: val top-1 ")[1].split()[0])
    assert top1 > 30  # 10 classes: chance is 10%
    assert "pretrained windows [4, 4, 2, 1] -> effective windows [4, 4, 4, 2]" in (ft / "train.log").read_text()
    assert main(["eval", str(ft / "checkpoints" / "ckpt-00000040.pt"), "--data", "embedded:digits"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split()
    assert row[:2] == ["64", "W4"] and float(row[3]) == pytest.approx(top1, abs=0.01) and row[-1] == "360"
    assert main(["eval", str(ckpt), "--data", "embedded:digits", "--knn", "--linear-probe"]) == 0
    probes = capsys.readouterr().out
    assert "knn_top1" in probes and "linear_probe_top1" in probes
    assert main(["eval", str(ckpt), "--data", "embedded:digits"]) == 2  # a pretraining checkpoint has no head
    assert "--knn" in capsys.readouterr().err


def test_two_process_evaluation_counts_every_sample_once(tmp_path):
    cmd = torchrun(2, "-m", "simmim", "finetune", "demo/finetune", *QUICK, "model.img_size=32", "model.window_size=4",
           "schedule.max_steps=2", "data.batch_size=25", f"run.output={tmp_path / 'run'}")
    result = subprocess.run(cmd, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "(360 images)" in log  # 360 = 2 x 7 batches of 25 + 10: uneven shards, no duplicates counted
