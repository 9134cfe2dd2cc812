"""Swin V1 and ViT through the whole pipeline on embedded images: pretrain -> reconstruct / inspect -> fine-tune at
another size (and window) -> eval (and, for ViT, k-NN / linear probe) -> export (timm, loaded back by plain timm
with the card's call; hf refused), plus an official SimMIM Swin file fine-tuned through ``build_classifier``; the
SwinV2-only switches refused for the other families; ViT's mask grid and pretrain -> fine-tune weight transfer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import transformers
from test_encoders import official_swin_state, timm_oracle

from simmim.cli import main
from simmim.config import ConfigError, FinetuneConfig, load_config
from simmim.configs import resolve
from simmim.finetune import build_classifier
from simmim.weights import model_from_weights, read_weights

QUICK = ["run.progress=false", "run.log_every=1", "schedule.warmup_epochs=0.1"]
SWIN = ["model.name=swin_pico", "model.window_size=4"]
VIT = ["model.img_size=64", "data.mask_patch_size=32"]  # vit_pico: patch 16, a 4 x 4 grid, 2 x 2 mask cells


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
    # hf: transformers' Swin has one window (and table size) for every stage; 4/4/4/2 is refused in one line
    assert main(["export", str(fck), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "stage 3 of this Swin attends in 2x2 windows" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------------------------
# ViT


@pytest.fixture(scope="module")
def vit_pretrained(tmp_path_factory):
    """A vit_pico pretraining run of 2 steps (64 px, 32 px mask cells over 16 px patches) on embedded images."""
    pre = tmp_path_factory.mktemp("vit") / "pre"
    assert main(["pretrain", "demo/pretrain", "--output", str(pre), *QUICK, "model.name=vit_pico", *VIT,
                 "schedule.max_steps=2", "data.path=embedded:all", "run.image_every=0",
                 "monitor.data=embedded:digits"]) == 0  # the monitor probes the paper's block too
    assert "knn_top1" in (pre / "train.log").read_text()
    return pre / "checkpoints" / "ckpt-00000002.pt"


def test_vit_pretrain_finetune_eval_export_end_to_end(vit_pretrained, tmp_path, capsys, monkeypatch):
    ckpt = vit_pretrained
    geometry = read_weights(ckpt).meta["encoder"]
    assert (geometry["family"], geometry["patch_size"], geometry["encoder_stride"]) == ("vit", 16, 16)

    from simmim.data.samples import sample_photos

    sample_photos()[0].save(tmp_path / "photo.png")
    assert main(["reconstruct", str(ckpt), str(tmp_path / "photo.png"), "--out", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "photo.png").is_file()  # the decoder's stride-16 pixel shuffle
    assert main(["inspect", str(ckpt), "--out", str(tmp_path / "insp")]) == 0  # the shared table, trained grid 4x4
    assert (tmp_path / "insp" / "position_bias_vit.png").is_file()
    text = (tmp_path / "insp" / "inspect.txt").read_text()
    assert "ViT relative position bias (shared by all blocks)" in text and "token grid 4x4" in text
    assert "shared cls->token:" in text
    capsys.readouterr()  # what reconstruct and inspect printed, before the eval's scores

    # k-NN and linear probe on the paper's block (block 1 of vit_pico's 3: depth * 2 // 3 - 1)
    assert main(["eval", str(ckpt), "--data", "embedded:digits", "--knn", "--linear-probe"]) == 0
    scores = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(scores) == {"knn_top1", "linear_probe_top1"}
    assert all(0 <= float(v) <= 100 for v in scores.values())

    # fine-tune the pretraining variant's weights as vit_pico_ft at 96 px (6 x 6 tokens: every block's table resized)
    ft = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", "--pretrained", str(ckpt), "--output", str(ft), *QUICK,
                 "model.name=vit_pico_ft", "model.img_size=96", "schedule.max_steps=4", "data.batch_size=32",
                 "run.eval_every=4"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("fine-tuned 4 steps: val top-1 ")[1].split()[0])
    fck = ft / "checkpoints" / "ckpt-00000004.pt"
    assert main(["eval", str(fck), "--data", "embedded:digits"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split()
    assert row[:3] == ["96", "-", "-"] and float(row[3]) == pytest.approx(top1, abs=0.01)
    assert main(["eval", str(fck), "--data", "embedded:digits", "--img-size", "64"]) == 0  # no window to give
    assert capsys.readouterr().out.strip().splitlines()[1].split()[:3] == ["64", "-", "-"]

    # timm export: plain timm's BEiT from the card's call gives our logits
    model = model_from_weights(read_weights(fck))
    target = tmp_path / "exp" / "vit-timm.safetensors"
    assert main(["export", str(fck), "--format", "timm", "--out", str(target)]) == 0
    call = json.loads(target.with_name(target.name + ".json").read_text())["load"]["timm"]
    assert call.startswith("timm.create_model('beit_base_patch16_224'")
    monkeypatch.chdir(target.parent)  # the card names files relative to itself
    theirs = eval(call, {"timm": timm}).eval()  # noqa: S307  (the call the card gives users)
    assert type(theirs) is timm.models.beit.Beit
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-6)
    # hf: transformers' BeitForImageClassification from the folder gives our logits
    assert main(["export", str(fck), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.BeitForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("img_size", [64, 96])
def test_vit_fine_tuning_copies_the_shared_bias_into_every_block(vit_pretrained, img_size):
    """build_classifier (simmim finetune's model) from the pretraining run: each block's table is the shared one,
    resized to the new grid as the official code does (unchanged at the pretraining size), the head new."""
    from simmim.models.vit import resize_rel_pos_table

    cfg = load_config(FinetuneConfig, resolve("demo/finetune"),
                      ["model.name=vit_pico_ft", f"model.img_size={img_size}"])
    model, _ = build_classifier(dataclasses.replace(cfg, pretrained=str(vit_pretrained)), num_classes=10)
    shared = read_weights(vit_pretrained).state_dict["encoder.rel_pos_bias.relative_position_bias_table"]
    want = resize_rel_pos_table(shared, (4, 4), (img_size // 16,) * 2)
    for block in model.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table, want, rtol=0, atol=0)
    assert img_size == 96 or torch.equal(want, shared)
    assert model.head.weight.shape == (10, 32)


def test_vit_masks_hide_whole_mask_cells_of_16_px_patches():
    """The mask path takes the encoder's patch size: 32 px cells over 16 px patches hide 2 x 2 tokens each."""
    from simmim.config import PretrainConfig
    from simmim.pretrain import build_dataset, build_encoder

    cfg = load_config(PretrainConfig, resolve("demo/pretrain"), ["model.name=vit_pico", *VIT,
                                                                 "data.path=embedded:photos"])
    encoder = build_encoder(cfg, None)
    mask = build_dataset(cfg, encoder.patch_size)[0]["mask"]
    assert mask.shape == (4, 4) and mask.sum() == 3 * 4  # ceil(4 cells * 0.6) = 3 cells of 2 x 2 tokens
    cells = mask.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).flatten(2)  # (cell row, cell col, 4 tokens)
    assert bool((cells.all(-1) | ~cells.any(-1)).all())


def test_vit_weights_into_another_vit_size_name_the_variant(vit_pretrained):
    from simmim.errors import UserError
    from simmim.weights import check_variant

    with pytest.raises(UserError, match="holds a vit_pico encoder.*vit_pico or vit_pico_ft"):
        check_variant(read_weights(vit_pretrained), "vit_base_patch16_ft")
    check_variant(read_weights(vit_pretrained), "vit_pico_ft")  # the pretrain -> fine-tune pair


@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_base_patch16_ft"])
def test_models_lists_the_vit_variants(capsys, name):
    assert main(["models", name, "--img-size", "224"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == [name, "vit", f"{86.4 if name == 'vit_base_patch16' else 86.5}M"] and row[-1] == "-"


# ----------------------------------------------------------------------------------------------------------------
# probes: what --stage / monitor.stage mean per family


def test_probe_stage_defaults_to_the_papers_vit_block_and_the_last_swin_stage():
    from simmim.evaluate import probe_stage
    from simmim.models import create_encoder

    with torch.device("meta"):
        base = create_encoder("vit_base_patch16")
    assert probe_stage("vit_base_patch16", base, None) == 7  # 0-based: the 8th of 12 blocks (SimMIM §4.3)
    pico = create_encoder("vit_pico")
    assert probe_stage("vit_pico", pico, None) == 1 and probe_stage("vit_pico", pico, -3) == -3
    swin = create_encoder("swin_pico", img_size=64, window_size=4)
    assert probe_stage("swin_pico", swin, None) == -1 and probe_stage("swin_pico", swin, 2) == 2
    from simmim.errors import UserError

    with pytest.raises(UserError, match="--stage 3 is not a block of vit_pico, which has 3: use 0..2"):
        probe_stage("vit_pico", pico, 3)
    with pytest.raises(UserError, match="monitor.stage -5 is not a stage of swin_pico, which has 4"):
        probe_stage("swin_pico", swin, -5, key="monitor.stage")


@pytest.mark.parametrize("block", [0, 1, -1])
def test_vit_probe_features_are_the_mean_patch_token_after_the_block(block):
    """pooled_features (what k-NN / linear probes read) = the patch tokens leaving that block, averaged, caught
    by a forward hook (no final norm: the SimMIM paper's probe)."""
    from conftest import perturb_

    from simmim.models import create_encoder
    from simmim.monitor import pooled_features

    enc = perturb_(create_encoder("vit_pico")).eval()
    caught = []
    enc.blocks[block].register_forward_hook(lambda m, i, o: caught.append(o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = pooled_features(enc, x, block)
        if block == -1:  # the last block is reached by a plain forward too
            caught.clear()
            enc(x)
    torch.testing.assert_close(feats, caught[0][:, 1:].mean(dim=1), rtol=0, atol=1e-6)  # CLS token dropped


def test_monitor_stage_counts_vit_blocks():
    from simmim.config import PretrainConfig

    pre = resolve("demo/pretrain")
    assert load_config(PretrainConfig, pre, ["model.name=vit_pico", *VIT]).monitor.stage is None
    assert load_config(PretrainConfig, pre, ["model.name=vit_pico", *VIT, "monitor.stage=2"]).monitor.stage == 2
    with pytest.raises(ConfigError, match="monitor.stage=3 must be a block of vit_pico: 0..2"):
        load_config(PretrainConfig, pre, ["model.name=vit_pico", *VIT, "monitor.stage=3"])


def test_official_finetuned_vit_file_evaluates_through_the_reader(tmp_path):
    """`simmim eval official.pth --model vit_pico_ft --img-size 96`'s model (no window for a ViT): the official
    fine-tuned layout (``head.weight``, saved index buffers) read by read_weights, built at another grid, equal to
    convert_official_vit into the same encoder (checked against timm's BEiT in test_vit)."""
    from test_vit import official_checkpoint

    from simmim.evaluate import load_for_eval
    from simmim.models.vit import convert_official_vit, create_vit

    ckpt = official_checkpoint(depth=3, pretrained=False, num_classes=5)
    torch.save(ckpt, tmp_path / "simmim_finetune__vit_pico.pth")
    model, meta = load_for_eval(tmp_path / "simmim_finetune__vit_pico.pth", "vit_pico_ft", 96)
    assert meta["kind"] == "simmim-finetune" and model.num_classes == 5
    ref = create_vit("vit_pico_ft", num_classes=5, img_size=96).eval()
    ref.load_state_dict(convert_official_vit(ckpt["model"], ref))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
