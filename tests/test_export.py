"""Export: every format reproduces the run's model in its target library; cards; HF key conversion; errors."""

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort  # dev extra: the ONNX and HF checks run, never skip
import pytest
import timm
import torch
import transformers
from conftest import PICO, perturb_
from PIL import Image

from simmim.checkpoint import save_checkpoint
from simmim.export import FORMATS, export
from simmim.models import create_model
from simmim.models.convert import to_official
from simmim.models.hf import hf_config, hf_to_ours, ours_to_hf
from simmim.weights import WrongCheckpointError, geometry_metadata, model_from_weights, read_run_checkpoint

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.22]
RECIPE = {"model": {"name": "swinv2_pico"}, "optim": {"lr": 1e-4, "weight_decay": 0.05}, "data": {"img_size": 64}}
# pretrain: 64 px / W4 -> grids 16, 8, 4, 2 -> effective windows 4/4/4/2;
# finetune: 96 px / W6 from pretrained windows 4/4/4/2 -> grids 24, 12, 6, 3 -> effective windows 6/6/6/3
GEOMETRY = {
    "pretrain": dict(img_size=64, window_size=4, num_classes=0),
    "finetune": dict(img_size=96, window_size=6, pretrained_window_sizes=(4, 4, 4, 2), num_classes=5),
}
TOLERANCE = {"safetensors": 1e-5, "timm": 1e-5, "hf": 1e-4, "onnx": 1e-4}


def run_meta(kind: str, model) -> dict:
    """The metadata the engine writes into a run checkpoint."""
    meta = {"kind": kind, **geometry_metadata(model, "swinv2_pico"), "mean": MEAN, "std": STD, "config": RECIPE}
    if kind == "simmim-finetune":
        meta["num_classes"] = model.num_classes
        meta["classes"] = [f"class_{i}" for i in range(model.num_classes)]  # as fine-tuning records them
    return meta


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A SimMIM pretraining checkpoint (encoder.* + mask token + decoder) and a fine-tuned 5-class classifier, with
    every parameter perturbed so no block is the identity."""
    root = tmp_path_factory.mktemp("runs")
    enc = perturb_(create_model("swinv2_pico", **GEOMETRY["pretrain"]), seed=1)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["encoder.mask_token"] = torch.randn(1, 1, 16)
    state["decoder.0.weight"], state["decoder.0.bias"] = torch.randn(32 * 32 * 3, 128, 1, 1), torch.randn(3072)
    pretrain = save_checkpoint({"model": state, "meta": run_meta("simmim-pretrain", enc), "step": 7},
                               root / "pretrain.pt")
    clf = perturb_(create_model("swinv2_pico", **GEOMETRY["finetune"]), seed=2)
    finetune = save_checkpoint({"model": clf.state_dict(), "meta": run_meta("simmim-finetune", clf), "epoch": 3},
                               root / "finetune.pt")
    return {"pretrain": pretrain, "finetune": finetune}


@pytest.fixture(scope="module")
def exported(checkpoints):
    """``exported(kind, fmt) -> files`` with default outputs, each export done once per module (ONNX takes ~8 s)."""
    cache: dict[tuple[str, str], list[Path]] = {}

    def get(kind: str, fmt: str) -> list[Path]:
        if (kind, fmt) not in cache:
            cache[kind, fmt] = export(checkpoints[kind], fmt)
        return cache[kind, fmt]

    return get


@pytest.fixture(scope="module")
def reference(checkpoints):
    """``reference(kind, batch) -> (x, y)``: our model rebuilt from the run checkpoint, on a fixed random input."""
    cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(kind: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        if (kind, batch) not in cache:
            model = model_from_weights(read_run_checkpoint(checkpoints[kind]))
            x = torch.randn(batch, 3, *model.img_size, generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                y = model(x)
            assert y.std() > 0.1  # a non-trivial output, or the comparisons could not fail
            cache[kind, batch] = x, y
        return cache[kind, batch]

    return get


@contextlib.contextmanager
def working_directory(path: Path):
    """The card's calls name files relative to the card's folder: run them there, as a user would."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_exported(fmt: str, files: list[Path], x: torch.Tensor) -> torch.Tensor:
    """Run the export in its target library on ``x``."""
    card = json.loads(files[-1].read_text())
    with torch.no_grad(), working_directory(files[-1].parent):
        if fmt == "safetensors":
            scope: dict = {}
            exec(card["load"]["simmim"], scope)
            return scope["model"](x)
        if fmt == "timm":
            return eval(card["load"]["timm"], {"timm": timm}).eval()(x)
        if fmt == "hf":
            directory = files[0].parent
            if card["architecture"]["num_classes"]:
                return transformers.Swinv2ForImageClassification.from_pretrained(directory).eval()(x).logits
            return transformers.Swinv2Model.from_pretrained(directory).eval()(x).pooler_output
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_export_reproduces_the_model(exported, reference, kind, fmt):
    files = exported(kind, fmt)
    assert all(f.exists() for f in files)
    x, expected = reference(kind, batch=3 if fmt == "onnx" else 2)  # ONNX: batch 3 != export's 2
    got = load_exported(fmt, files, x)
    assert got.shape == expected.shape == (x.shape[0], 5 if kind == "finetune" else 128)
    torch.testing.assert_close(got, expected, atol=TOLERANCE[fmt], rtol=0)


def test_default_outputs_sit_beside_the_checkpoint(checkpoints, exported):
    stem = checkpoints["finetune"].parent / "finetune"
    assert exported("finetune", "safetensors") == [Path(f"{stem}.safetensors"), Path(f"{stem}.safetensors.json")]
    assert exported("finetune", "timm") == [Path(f"{stem}-timm.safetensors"), Path(f"{stem}-timm.safetensors.json")]
    assert exported("finetune", "onnx")[0] == Path(f"{stem}.onnx")
    hf_dir = Path(f"{stem}-hf")
    assert {f.name for f in exported("finetune", "hf")} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md", "simmim_card.json"}
    assert all(f.parent == hf_dir for f in exported("finetune", "hf"))


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_card_describes_geometry_source_and_recipe(checkpoints, exported, kind):
    card = json.loads(exported(kind, "safetensors")[-1].read_text())
    assert card["source"]["sha256"] == hashlib.sha256(checkpoints[kind].read_bytes()).hexdigest()
    assert card["source"]["kind"] == f"simmim-{kind}"
    arch = card["architecture"]
    assert (arch["variant"], arch["embed_dim"], arch["depths"], arch["num_heads"]) == (
        "swinv2_pico", PICO["embed_dim"], list(PICO["depths"]), list(PICO["num_heads"]))
    assert (arch["in_chans"], arch["patch_size"], arch["num_classes"]) == (3, 4, 5 if kind == "finetune" else 0)
    assert card["mean"] == MEAN and card["std"] == STD and card["recipe"] == RECIPE
    if kind == "pretrain":
        assert card["img_size"] == [64, 64] and card["window_size"] == [4, 4]
        assert card["effective_window_sizes"] == [[4, 4]] * 3 + [[2, 2]]
    else:
        assert card["img_size"] == [96, 96] and card["window_size"] == [6, 6]
        assert card["effective_window_sizes"] == [[6, 6]] * 3 + [[3, 3]]
    # the windows the log-CPB was trained at, resolved: an encoder pretrained from scratch trained at its own
    # effective windows (it is built with the placeholder (0, 0), which the card once showed as if untrained), a
    # fine-tuned model at the pretrained windows it was fine-tuned from. One field, no second "to fine-tune" copy.
    assert card["pretrained_window_sizes"] == [[4, 4]] * 3 + [[2, 2]]
    assert "finetune_pretrained_window_sizes" not in card
    assert "trained at" in card["windows"] and "effective_window_sizes" in card["windows"]


def test_safetensors_card_timm_call_builds_the_same_model(exported, reference):
    card = json.loads(exported("finetune", "safetensors")[-1].read_text())
    # pico has no timm architecture of its dimensions: the card names our registered one, and says so
    assert card["load"]["timm"].startswith("timm.create_model('simmim_swinv2_pico', pretrained=True")
    assert card["architecture"]["timm_architecture"] == "simmim_swinv2_pico"
    assert "import simmim.models" in card["load"]["requires"]
    assert "pool_size=(3, 3)" in card["load"]["timm"]  # 96 px / 32
    with working_directory(exported("finetune", "safetensors")[0].parent):
        model = eval(card["load"]["timm"], {"timm": timm}).eval()
    x, expected = reference("finetune")
    assert model.pretrained_cfg["mean"] == tuple(MEAN)  # data config comes from the overlay
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_timm_export_to_pth(checkpoints, reference, tmp_path):
    files = export(checkpoints["pretrain"], "timm", out=tmp_path / "enc.pth")
    assert files == [tmp_path / "enc.pth", tmp_path / "enc.pth.json"]
    x, expected = reference("pretrain")
    torch.testing.assert_close(load_exported("timm", files, x), expected, atol=1e-5, rtol=0)


def test_out_directory_receives_the_default_name(checkpoints, tmp_path):
    files = export(checkpoints["pretrain"], "safetensors", out=tmp_path)
    assert files[0] == tmp_path / "pretrain.safetensors"


def test_hf_directory_config_and_image_processor(exported):
    files = exported("finetune", "hf")
    directory = files[0].parent
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["Swinv2ForImageClassification"]
    assert config["pretrained_window_sizes"] == [4, 4, 4, 2] and config["window_size"] == 6
    assert config["id2label"] == {str(i): f"class_{i}" for i in range(5)}
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 80, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96)
    assert list(processor.image_mean) == MEAN and list(processor.image_std) == STD
    encoder = json.loads((exported("pretrain", "hf")[0]).read_text())
    assert encoder["architectures"] == ["Swinv2Model"] and "id2label" not in encoder


def test_onnx_card_records_the_check(exported):
    card = json.loads(exported("finetune", "onnx")[-1].read_text())
    assert card["onnx"]["max_abs_diff_vs_pytorch"] <= 1e-4
    assert card["onnx"]["output"].startswith("logits")


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_load_calls_name_files_relative_to_the_card(checkpoints, exported, fmt):
    """Cards travel with their files (a copied folder, a hub upload): no absolute path in the load calls."""
    files = exported("pretrain", fmt)
    load = json.dumps(json.loads(files[-1].read_text())["load"])
    assert str(checkpoints["pretrain"].parent) not in load
    name = "pretrain-hf" if fmt == "hf" else files[0].name
    assert f"'{name}'" in load


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_hf_folder_has_a_model_card_the_hub_reads(exported, kind):
    from huggingface_hub import ModelCard

    files = exported(kind, "hf")
    folder = files[0].parent
    card = ModelCard.load(folder / "README.md")  # the parser the hub and transformers use
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == ("image-classification" if kind == "finetune" else "image-feature-extraction")
    assert {"simmim", "swinv2"} <= set(card.data.tags)
    assert "swinv2_pico" in card.text and "[4, 4, 4, 2]" in card.text  # the variant and its trained windows
    assert ("class_4" in card.text) == (kind == "finetune")
    assert str(folder.parent) not in card.content  # no path of the machine that exported it
    # the card's snippet runs as written, from the folder holding the export
    code = card.text.split("```python\n")[1].split("```")[0]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8))
    scope = {"image": image}
    with torch.no_grad(), working_directory(folder.parent):
        exec(code, scope)
    outputs = scope["outputs"].logits if kind == "finetune" else scope["outputs"].pooler_output
    assert outputs.shape == ((1, 5) if kind == "finetune" else (1, 128))
    assert "README.md" in json.loads(files[-1].read_text())["files"]


# ----------------------------------------------------------------------------------------------------------------
# HF key conversion


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_hf_key_round_trip(kind):
    model = perturb_(create_model("swinv2_pico", **GEOMETRY[kind]))
    sd = model.state_dict()
    hf = ours_to_hf(sd)
    assert "swinv2.encoder.layers.0.downsample.reduction.weight" in hf  # end of stage 0, official layout
    assert "swinv2.encoder.layers.3.downsample.reduction.weight" not in hf
    assert "swinv2.encoder.layers.0.blocks.0.attention.self.key.bias" not in hf  # HF's key Linear has no bias
    assert hf["swinv2.encoder.layers.0.blocks.0.attention.self.query.weight"].shape == (16, 16)
    assert ("classifier.weight" in hf) == (kind == "finetune")
    back = hf_to_ours(hf)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_hf_checkpoint_imports_into_our_model():
    """An HF model's own state dict (with its saved geometry buffers) loads into ours and gives the same logits."""
    ours = perturb_(create_model("swinv2_pico", **GEOMETRY["finetune"])).eval()
    config = transformers.Swinv2Config(**hf_config(ours))
    theirs = transformers.Swinv2ForImageClassification(config).eval()
    theirs.load_state_dict(ours_to_hf(ours.state_dict()))
    hf_sd = {**theirs.state_dict(), "swinv2.encoder.layers.0.blocks.0.attention.self.relative_position_index":
             torch.zeros(16, 16, dtype=torch.long)}  # older transformers saved these buffers: they are dropped
    fresh = create_model("swinv2_pico", **GEOMETRY["finetune"]).eval()
    fresh.load_state_dict(hf_to_ours(hf_sd), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x).logits, atol=1e-4, rtol=0)


def test_hf_refuses_what_it_cannot_represent():
    with torch.device("meta"):
        huge = create_model("swinv2_pico", extra_norm_period=2, img_size=64, window_size=4)
    with pytest.raises(ValueError, match="extra_norm_period"):
        hf_config(huge)
    with pytest.raises(ValueError, match="no Hugging Face Swinv2 equivalent"):
        ours_to_hf({"layers.0.blocks.1.extra_norm.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="key bias"):
        hf_to_ours({"swinv2.encoder.layers.0.blocks.0.attention.self.key.bias": torch.ones(16)})


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_format_lists_the_formats(checkpoints):
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of: safetensors, timm, hf, onnx"):
        export(checkpoints["pretrain"], "tflite")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        export(tmp_path / "nope.pt")


def test_non_run_checkpoints_say_what_they_are(tmp_path):
    model = perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0))
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WrongCheckpointError, match=r"plain.pth \(timm-layout state dict\) is not a .*simmim finetune"):
        export(tmp_path / "plain.pth")
    torch.save({"model": to_official(model.state_dict()), "epoch": 1}, tmp_path / "official.pth")
    with pytest.raises(WrongCheckpointError, match=r"\(official Swin-Transformer checkpoint\) is not a checkpoint"):
        export(tmp_path / "official.pth", "onnx")
    export(_write(tmp_path), "safetensors", out=tmp_path / "w.safetensors")  # a safetensors file is not a run either
    with pytest.raises(WrongCheckpointError, match=r"w.safetensors \(simmim-pretrain exported weights\) is not a"):
        export(tmp_path / "w.safetensors", "onnx")


def _write(tmp_path: Path) -> Path:
    enc = create_model("swinv2_pico", **GEOMETRY["pretrain"])
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    return save_checkpoint({"model": state, "meta": run_meta("simmim-pretrain", enc)}, tmp_path / "run.pt")


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_giant_cannot_go_to_timm_or_hf(tmp_path, fmt):
    """Refused from the metadata alone, before the (here deliberately tiny) weights are read."""
    path = _write(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["model"] = "swinv2_giant"
    save_checkpoint(ckpt, path)
    with pytest.raises(ValueError, match="swinv2_giant cannot be exported .*extra_norm_period=6.*safetensors or onnx"):
        export(path, fmt)


def test_opset_only_for_onnx(checkpoints):
    with pytest.raises(ValueError, match="opset applies to the onnx format only"):
        export(checkpoints["pretrain"], "hf", opset=17)


def test_exports_loaded_at_another_window_keep_the_trained_windows(checkpoints, exported):
    """A user who loads the pretraining export with another img_size/window_size (the card's call with only those
    changed) gets what our model gives after set_input_size: the log-CPB keeps the trained windows 4/4/4/2."""
    ours = model_from_weights(read_run_checkpoint(checkpoints["pretrain"]))
    ours.set_input_size(img_size=96, window_size=6)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(9))
    card = json.loads(exported("pretrain", "timm")[-1].read_text())
    assert "pretrained_window_sizes=(4, 4, 4, 2)" in card["load"]["timm"] and "pool_size=(2, 2)" in card["load"]["timm"]
    assert "(4, 4, 4, 2)" in card["change_geometry"].replace("[4, 4, 4, 2]", "(4, 4, 4, 2)")
    call = card["load"]["timm"].replace("img_size=64", "img_size=96").replace("window_size=4,", "window_size=6,")
    with torch.no_grad(), working_directory(exported("pretrain", "timm")[0].parent):
        expected = ours(x)
        torch.testing.assert_close(eval(call, {"timm": timm}).eval()(x), expected, atol=1e-5, rtol=0)
        directory = exported("pretrain", "hf")[0].parent
        hf = transformers.Swinv2Model.from_pretrained(directory, image_size=96, window_size=6).eval()
        torch.testing.assert_close(hf(x).pooler_output, expected, atol=1e-4, rtol=0)


def test_timm_architecture_is_timms_own_where_the_dimensions_match():
    from simmim.export import timm_architecture

    assert timm_architecture("swinv2_tiny") == ("swinv2_tiny_window8_256", False)  # plain timm loads it
    assert timm_architecture("swinv2_large") == ("swinv2_large_window12_192", False)
    assert timm_architecture("swinv2_nano") == ("simmim_swinv2_nano", True)


def test_a_tiny_export_loads_in_plain_timm_by_timms_own_name(tmp_path):
    enc = perturb_(create_model("swinv2_tiny", img_size=64, window_size=4, num_classes=0), scale=0.05)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    meta = {**run_meta("simmim-pretrain", enc), "model": "swinv2_tiny"}
    ckpt = save_checkpoint({"model": state, "meta": meta, "step": 1}, tmp_path / "tiny.pt")
    card = json.loads(export(ckpt, "timm")[-1].read_text())
    assert card["load"]["timm"].startswith("timm.create_model('swinv2_tiny_window8_256'")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), working_directory(tmp_path):
        theirs = eval(card["load"]["timm"], {"timm": timm}).eval()
        assert type(theirs).__module__ == "timm.models.swin_transformer_v2"  # timm's class, not ours
        torch.testing.assert_close(theirs(x), enc.eval()(x), atol=1e-5, rtol=0)
