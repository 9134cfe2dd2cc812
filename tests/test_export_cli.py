"""simmim export on the command line, and an official-format SimMIM checkpoint going through fine-tuning and
export (built from random weights in the official key layout, with rpe_mlp names and saved buffers)."""

from pathlib import Path

import pytest
import torch
from conftest import PICO, perturb_
from safetensors.torch import load_file
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from simmim.cli import main
from simmim.export import export
from simmim.models import create_model, to_official
from simmim.weights import model_from_weights, read_run_checkpoint, read_weights


class PickledConfig:
    """Stands in for the yacs CfgNode the official code pickles into its checkpoints."""

    def __init__(self):
        self.MODEL = {"TYPE": "swinv2"}


def official_simmim_checkpoint(path):
    ref = perturb_(TimmSwinV2(img_size=64, window_size=4, num_classes=0, **PICO))
    sd = {f"encoder.{k}": v for k, v in to_official(ref.state_dict(), rpe_mlp=True).items()}
    for name, buf in ref.named_buffers():  # the official code saves its geometry buffers
        if name.endswith(("relative_coords_table", "relative_position_index", "attn_mask")):
            sd[f"encoder.{name}"] = buf.clone()
    sd["encoder.mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.randn(3072, 128, 1, 1), torch.randn(3072)
    torch.save({"model": sd, "optimizer": {}, "lr_scheduler": {}, "epoch": 799}, path)
    return ref


def test_official_simmim_checkpoint_fine_tunes_and_exports(tmp_path, capsys):
    ref = official_simmim_checkpoint(tmp_path / "simmim_pretrain__swinv2_pico.pth")
    run = tmp_path / "ft"
    assert main(["finetune", "demo/finetune", "--pretrained", str(tmp_path / "simmim_pretrain__swinv2_pico.pth"),
                 "--output", str(run), "run.progress=false", "model.img_size=96", "model.window_size=6",
                 "schedule.max_steps=3", "data.batch_size=16"]) == 0
    log = (run / "train.log").read_text()
    assert "pretrained windows [4, 4, 4, 2] -> effective windows [6, 6, 6, 3]" in log  # read from the buffers
    ckpt = run / "checkpoints" / "ckpt-00000003.pt"
    weights = read_run_checkpoint(ckpt)
    model, meta = model_from_weights(weights), weights.meta
    assert meta["pretrained_window_sizes"] == [[4, 4], [4, 4], [4, 4], [2, 2]]
    # the first steps move the weights only a little from the official ones: same keys, close values
    torch.testing.assert_close(model.patch_embed.proj.weight, ref.patch_embed.proj.weight, atol=0.05, rtol=0)

    out = tmp_path / "export" / "digits.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    exported = load_file(str(out))
    again = create_model("swinv2_pico", img_size=96, window_size=6, num_classes=10,
                         pretrained_window_sizes=(4, 4, 4, 2)).eval()
    again.load_state_dict(exported)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "unknown format 'tflite'"),
    (["--format", "onnx"], "is not a checkpoint written by simmim"),
])
def test_export_errors_are_one_line_with_exit_2(tmp_path, capsys, args, message):
    official_simmim_checkpoint(tmp_path / "official.pth")
    assert main(["export", str(tmp_path / "official.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_export_of_a_missing_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.pt" in err and len(err.splitlines()) == 1


def test_eval_reads_official_classification_weights(tmp_path, capsys):
    from test_finetune import _write_class_tree

    ref = perturb_(TimmSwinV2(img_size=64, window_size=4, num_classes=3, **PICO)).eval()
    official = to_official(ref.state_dict())
    official.update({k: v for k, v in ref.named_buffers() if k.endswith("relative_coords_table")})
    torch.save({"model": official, "config": PickledConfig()}, tmp_path / "official_cls.pth")  # as the official code
    _write_class_tree(tmp_path / "data" / "val", ["a", "b", "c"], 4, 0)
    assert main(["eval", str(tmp_path / "official_cls.pth"), "--data", str(tmp_path / "data")]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "official_cls.pth"), "--data", str(tmp_path / "data"), "--model",
                 "swinv2_pico", "--img-size", "64", "--window-size", "4", "--sweep", "64:4,96:6"]) == 0
    out = capsys.readouterr().out
    rows = out[out.index("img_size"):].strip().splitlines()[1:]  # the table, after any log lines
    assert [r.split()[:2] for r in rows] == [["64", "W4"], ["96", "W6"]] and all(r.split()[-1] == "12" for r in rows)


def test_a_transformers_directory_is_a_pretrained_source(tmp_path):
    from test_finetune import finetune_cfg, pretrain_checkpoint

    from simmim.finetune import build_classifier

    ckpt = pretrain_checkpoint(tmp_path)  # 64 px / W4 encoder
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    weights = read_weights(tmp_path / "hf")
    assert weights.windows == [(4, 4), (4, 4), (4, 4), (2, 2)]
    encoder = model_from_weights(read_run_checkpoint(ckpt))
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(weights.encoder()[k], v, rtol=0, atol=0, msg=k)
    model, _ = build_classifier(finetune_cfg(f"pretrained={tmp_path / 'hf'}"), num_classes=10)
    assert model.pretrained_window_sizes == [(4, 4), (4, 4), (4, 4), (2, 2)]


def test_an_exported_safetensors_with_its_card_is_a_pretrained_source(tmp_path):
    from test_finetune import finetune_cfg, pretrain_checkpoint

    from simmim.finetune import build_classifier

    ckpt = pretrain_checkpoint(tmp_path)  # 64 px / W4 encoder: windows 4/4/4/2
    files = [Path(p) for p in export(ckpt, "safetensors", tmp_path / "enc.safetensors")]
    assert files[-1].name == "enc.safetensors.json"
    model, weights = build_classifier(finetune_cfg(f"pretrained={files[0]}"), num_classes=10)
    assert weights.windows == [(4, 4), (4, 4), (4, 4), (2, 2)] == model.pretrained_window_sizes
