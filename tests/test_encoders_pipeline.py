"""Swin V1 through the whole pipeline on embedded images: pretrain -> reconstruct / inspect -> fine-tune at another
size and window -> eval -> export (timm, loaded back by plain timm with the card's call; hf refused), plus an official
SimMIM Swin file fine-tuned through ``build_classifier``; and the SwinV2-only switches refused for Swin V1."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
from test_encoders import official_swin_state, timm_oracle

from simmim.cli import main
from simmim.config import ConfigError, FinetuneConfig, load_config
from simmim.configs import resolve
from simmim.finetune import build_classifier
from simmim.weights import model_from_weights, read_weights

QUICK = ["run.progress=false", "run.log_every=1", "schedule.warmup_epochs=0.1"]
SWIN = ["model.name=swin_pico", "model.window_size=4"]


def test_swin_v1_pretrain_finetune_eval_export_end_to_end(tmp_path, capsys, monkeypatch):
    pre = tmp_path / "pre"
    assert main(["pretrain", "demo/pretrain", "--output", str(pre), *QUICK, *SWIN, "schedule.max_steps=2",
                 "model.img_size=32", "data.mask_patch_size=8", "data.path=embedded:all", "run.image_every=0"]) == 0
    ckpt = pre / "checkpoints" / "ckpt-00000002.pt"
    assert read_weights(ckpt).meta["encoder"]["family"] == "swin"

    from simmim.data.samples import sample_photos

    sample_photos()[0].save(tmp_path / "photo.png")
    assert main(["reconstruct", str(ckpt), str(tmp_path / "photo.png"), "--out", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "photo.png").is_file()
    assert main(["inspect", str(ckpt), "--out", str(tmp_path / "insp")]) == 0  # the V1 relative position tables
    assert "position bias: V1 table" in (tmp_path / "insp" / "inspect.txt").read_text()

    # fine-tune at 64 px: stage windows 4/4/2/1 at 32 px become 4/4/4/2, the tables resized on load
    ft = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", "--pretrained", str(ckpt), "--output", str(ft), *QUICK, *SWIN,
                 "model.img_size=64", "schedule.max_steps=4", "data.batch_size=32", "run.eval_every=4"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("fine-tuned 4 steps: val top-1 ")[1].split()[0])
    fck = ft / "checkpoints" / "ckpt-00000004.pt"
    assert main(["eval", str(fck), "--data", "embedded:digits"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split()
    assert row[:3] == ["64", "W4", "4/4/4/2"] and float(row[3]) == pytest.approx(top1, abs=0.01)

    # timm export: plain timm builds its own Swin from the card's call and gives our outputs
    model = model_from_weights(read_weights(fck))
    target = tmp_path / "exp" / "swin-timm.safetensors"
    assert main(["export", str(fck), "--format", "timm", "--out", str(target)]) == 0
    card = json.loads(target.with_name(target.name + ".json").read_text())
    call = card["load"]["timm"]
    assert call.startswith("timm.create_model('swin_tiny_patch4_window7_224'")
    monkeypatch.chdir(target.parent)  # the card names files relative to itself
    theirs = eval(call, {"timm": timm}).eval()  # noqa: S307  (the call the card gives users)
    assert type(theirs) is timm.models.swin_transformer.SwinTransformer
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x))
    assert main(["export", str(fck), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "timm, safetensors or onnx" in capsys.readouterr().err


def test_official_simmim_swin_file_fine_tunes_at_another_window(tmp_path):
    """`simmim finetune --pretrained official.pth`'s model: pretrained 64 px / W4 (official layout, encoder.
    prefix, decoder), built at 96 px / W6: equal to timm's checkpoint_filter_fn of the same file."""
    official = official_swin_state(64, 4)
    path = tmp_path / "simmim_pretrain__swin_pico.pth"
    torch.save({"model": official}, path)
    cfg = load_config(FinetuneConfig, resolve("demo/finetune"), [*SWIN, "model.img_size=96", "model.window_size=6"])
    cfg = dataclasses.replace(cfg, pretrained=str(path))
    model, weights = build_classifier(cfg, num_classes=10)
    assert weights.source == "official"
    ref, converted = timm_oracle(official, 96, 6)
    for k, v in converted.items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("override", ["model.pretrained_window_sizes=[4,4,4,2]", "model.recompute=attention",
                                      "model.sequential_attention=4"])
def test_swinv2_only_switches_are_refused_for_swin_v1(override):
    with pytest.raises(ConfigError, match="SwinV2 only"):
        load_config(FinetuneConfig, resolve("demo/finetune"), [*SWIN, "model.img_size=64", override])


def test_models_lists_the_swin_v1_variants(capsys):
    assert main(["models", "swin_base", "--img-size", "224", "--window-size", "7"]) == 0
    out = capsys.readouterr().out
    assert "swin_base" in out and " swin " in out and "87.8M" in out and "7/7/7/7" in out


def test_official_finetuned_swin_file_evaluates_at_another_window(tmp_path):
    """`simmim eval official.pth --model swin_pico --img-size 96 --window-size 6`'s model: the fine-tuned official
    file (head.weight, 64 px / W4) equals timm's checkpoint_filter_fn of it at 96 px / W6."""
    from simmim.evaluate import load_for_eval

    official = official_swin_state(64, 4, prefix="", num_classes=7)
    path = tmp_path / "simmim_finetune__swin_pico.pth"
    torch.save({"model": official}, path)
    model, meta = load_for_eval(path, "swin_pico", 96, 6)
    assert meta["kind"] == "simmim-finetune" and model.num_classes == 7
    ref, _ = timm_oracle(official, 96, 6, num_classes=7)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
