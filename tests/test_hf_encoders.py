"""The hf export of SimMIM's other encoders: Swin V1 -> transformers' ``Swin*``, ViT -> ``Beit*``.

Each export is loaded by transformers itself (``from_pretrained``, the call the card gives) with no missing or
unexpected key and must give our outputs; the folder reads back through ``read_weights`` to the same model; what
transformers cannot represent is refused in one line before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import perturb_

from simmim.checkpoint import save_checkpoint
from simmim.cli import main
from simmim.export import export
from simmim.models import create_encoder
from simmim.models.hf import HF_LAYOUTS, hf_to_vit, vit_to_hf
from simmim.weights import geometry_metadata, model_from_weights, read_run_checkpoint, read_weights

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.22]
# Swin V1 at 64 px / W2: maps 16/8/4/2, every stage attends in the configured window (what transformers' Swin needs)
CASES = {
    "swin-pretrain": ("swin_pico", dict(img_size=64, window_size=2, num_classes=0), "simmim-pretrain"),
    "swin-finetune": ("swin_pico", dict(img_size=64, window_size=2, num_classes=5), "simmim-finetune"),
    "vit-pretrain": ("vit_pico", dict(num_classes=0), "simmim-pretrain"),  # one shared bias, norm on the tokens
    "vit-finetune": ("vit_pico_ft", dict(num_classes=5), "simmim-finetune"),  # a bias per block, mean pool + norm
}


def run_checkpoint(root: Path, case: str) -> Path:
    """A run checkpoint as the engine writes it: pretraining = encoder.* + mask token + decoder; fine-tuning = the
    classifier; every parameter perturbed (zero-initialised tables and layer scales would hide a wrong mapping)."""
    name, kwargs, kind = CASES[case]
    model = perturb_(create_encoder(name, **kwargs), seed=len(case)).eval()
    meta = {"kind": kind, **geometry_metadata(model, name), "mean": MEAN, "std": STD,
            "config": {"model": {"name": name}}}
    if kind == "simmim-pretrain":
        state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
        state["encoder.mask_token"] = torch.randn(1, 1, model.embed_dim)
        out = model.encoder_stride ** 2 * 3
        state["decoder.0.weight"] = torch.randn(out, model.num_features, 1, 1)
        state["decoder.0.bias"] = torch.randn(out)
    else:
        state = model.state_dict()
        meta["num_classes"], meta["classes"] = model.num_classes, [f"class_{i}" for i in range(model.num_classes)]
    return save_checkpoint({"model": state, "meta": meta, "step": 3}, root / f"{case}.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {case: run_checkpoint(root, case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_export_and_gives_our_outputs(checkpoints, tmp_path, monkeypatch, case):
    ckpt = checkpoints[case]
    ours = model_from_weights(read_run_checkpoint(ckpt))
    files = export(ckpt, "hf", out=tmp_path / "hf")
    folder = tmp_path / "hf"
    assert {f.name for f in files} == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                                       "simmim_card.json"}
    config = json.loads((folder / "config.json").read_text())
    family = "vit" if case.startswith("vit") else "swin"
    assert config["model_type"] == HF_LAYOUTS[family].model_type
    card = json.loads((folder / "simmim_card.json").read_text())
    classifier = case.endswith("finetune")

    # the card's own call, run where the card says, with transformers reporting every key it did not use
    call = card["load"]["transformers"].replace(")", ", output_loading_info=True)")
    monkeypatch.chdir(tmp_path)  # the card names the folder relative to where it lies
    theirs, info = eval(call, {"transformers": transformers})  # noqa: S307  (the card's call)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected_cls = {"swin": ("SwinModel", "SwinForImageClassification"),
                    "vit": ("BeitModel", "BeitForImageClassification")}[family][classifier]
    assert type(theirs).__name__ == expected_cls
    if classifier:
        assert theirs.config.id2label[4] == "class_4"

    x = torch.randn(3, 3, *ours.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x)
        out = theirs.eval()(pixel_values=x)
    assert expected.std() > 0.1  # a non-trivial output, or the comparison could not fail
    # the card names the output that holds what ours returns (for the ViT pretraining variant: the patch-token mean)
    got = out.logits if classifier else eval("out." + card["outputs"].split(" (")[0], {"out": out})  # noqa: S307
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # the folder reads back through the one weights reader to the same model
    again = model_from_weights(read_weights(folder))
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=0)


def test_the_readme_names_the_family_and_its_output(checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    export(checkpoints["vit-pretrain"], "hf", out=tmp_path / "vit")
    card = ModelCard.load(tmp_path / "vit" / "README.md")
    assert {"simmim", "beit"} <= set(card.data.tags)
    assert "ViT (BEiT-style" in card.text and "vit_pico" in card.text
    assert "transformers.BeitModel.from_pretrained" in card.text
    assert "last_hidden_state[:, 1:].mean(1)" in card.text  # BEiT pools the CLS token; SimMIM's ViT the mean


def test_a_swin_whose_last_stage_shrinks_the_window_is_refused_in_one_line(tmp_path, capsys):
    """192 px / W12 (the Swin-L recipe): the last stage's 6x6 map shrinks the window and its table, which
    transformers' Swin (one window and table size for every stage) cannot hold; nothing is written."""
    model = create_encoder("swin_pico", img_size=64, window_size=4, num_classes=0)  # maps 16/8/4/2: last is 2 < 4
    meta = {"kind": "simmim-finetune", **geometry_metadata(model, "swin_pico"), "num_classes": 0}
    ckpt = save_checkpoint({"model": model.state_dict(), "meta": meta, "step": 1}, tmp_path / "ft.pt")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage 3 of this Swin attends in 2x2 windows" in err[0]
    assert "export it as timm, safetensors or onnx" in err[0] and "img_size >= 128" in err[0]
    assert not (tmp_path / "hf").exists()


def test_a_vit_classifier_without_mean_pooling_is_refused(tmp_path, capsys):
    """The pretraining variant with a head: HF's BeitForImageClassification would pool the CLS token instead."""
    model = create_encoder("vit_pico", num_classes=3)
    meta = {"kind": "simmim-finetune", **geometry_metadata(model, "vit_pico"), "num_classes": 3}
    ckpt = save_checkpoint({"model": model.state_dict(), "meta": meta, "step": 1}, tmp_path / "ft.pt")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fine-tune as vit_base_patch16_ft" in err[0]
    assert not (tmp_path / "hf").exists()


def test_vit_keys_round_trip_and_unknown_keys_are_named():
    sd = perturb_(create_encoder("vit_pico_ft", num_classes=4)).state_dict()
    hf = vit_to_hf(sd)
    assert "beit.encoder.layer.0.attention.attention.key.weight" in hf
    assert "beit.encoder.layer.0.attention.attention.key.bias" not in hf  # BEiT's key has no bias
    assert "beit.pooler.layernorm.weight" in hf and "classifier.weight" in hf
    back = hf_to_vit(hf)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="lm_head.weight"):  # BEiT's own MIM head (visual tokens) is not SimMIM's
        hf_to_vit({**hf, "lm_head.weight": torch.zeros(2, 2)})


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises the position tables at zero: noise everywhere, so a wrong mapping shows."""
    return perturb_(model, scale=0.1, seed=3).eval()


def test_transformers_simmim_swin_reads_as_our_simmim_with_its_loss(tmp_path):
    """A SimMIM Swin saved by transformers itself (``SwinForMaskedImageModeling``, the layout of the hub's
    SimMIM Swin checkpoints): read through ``read_weights``, our SimMIM gives transformers' loss and reconstruction
    on the same images and mask, an oracle that shares no code with ours."""
    from simmim.masked_modeling import SimMIM

    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                     num_heads=[1, 2, 4, 8], window_size=2, encoder_stride=32)
    theirs = _perturbed(transformers.SwinForMaskedImageModeling(config))
    theirs.save_pretrained(tmp_path / "hf")
    weights = read_weights(tmp_path / "hf")
    assert weights.source == "hf" and "decoder.0.weight" in weights.state_dict
    ours = SimMIM(create_encoder("swin_pico", img_size=64, window_size=2, num_classes=0)).eval()
    state = {k if k.startswith("decoder.") else f"encoder.{k}": v for k, v in weights.state_dict.items()}
    ours.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.rand(2, 16, 16, generator=g) < 0.6  # (B, h, w) over 4 px patches
    with torch.no_grad():
        out = theirs(pixel_values=images, bool_masked_pos=mask.flatten(1))
        loss, pred = ours(images, mask)
    torch.testing.assert_close(pred, out.reconstruction, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)


def test_transformers_beit_reads_as_our_fine_tuning_vit(tmp_path):
    """A BEiT saved by transformers (per-block relative position bias, layer scale, mean pooling: SimMIM's
    fine-tuning ViT) reads through ``read_weights`` into ``vit_pico_ft`` with transformers' logits."""
    config = transformers.BeitConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=128, use_relative_position_bias=True,
                                     use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
                                     use_mean_pooling=True, layer_norm_eps=1e-6, num_labels=4)
    theirs = _perturbed(transformers.BeitForImageClassification(config))
    theirs.save_pretrained(tmp_path / "hf")
    ours = create_encoder("vit_pico_ft", num_classes=4).eval()
    ours.load_state_dict(read_weights(tmp_path / "hf").state_dict, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, atol=1e-4, rtol=0)
