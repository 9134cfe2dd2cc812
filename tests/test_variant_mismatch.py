"""Weights of another SwinV2 variant (issue 17.7): one line naming the weights' variant and the setting to change,
not hundreds of mismatched keys and a Python-only ``exclude=[...]``; nothing is written."""

import pytest
from test_faults import PRETRAIN, one_line_error, snapshot
from test_pretrain import TINY

from simmim.cli import main
from simmim.models import create_model, load_pretrained
from simmim.models.convert import CheckpointMismatchError


@pytest.fixture(scope="module")
def pico_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pico") / "run"
    assert main([*PRETRAIN, "schedule.max_steps=1", "--output", str(out)]) == 0
    return out / "checkpoints" / "ckpt-00000001.pt"


FINETUNE = ["finetune", "demo/finetune", "model.img_size=32", "model.window_size=4", "data.batch_size=8",
            "schedule.max_steps=1", "run.progress=false"]


@pytest.mark.parametrize("command", ["finetune", "pretrain --init", "eval --model"])
def test_weights_of_another_variant_name_it_and_the_key_in_one_line(pico_checkpoint, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    if command == "finetune":
        args = [*FINETUNE, "model.name=swinv2_nano", "--pretrained", str(pico_checkpoint), "--output", str(out)]
        key = "model.name"
    elif command == "pretrain --init":
        args = ["pretrain", "demo/pretrain", *TINY, "schedule.max_steps=1", "model.name=swinv2_nano",
                "--init", str(pico_checkpoint), "--output", str(out)]
        key = "model.name"
    else:  # a file without our metadata is built as --model says
        from safetensors.torch import save_file

        from simmim.weights import read_weights
        bare = tmp_path / "bare.safetensors"
        save_file(read_weights(pico_checkpoint).encoder(), bare)
        args = ["eval", str(bare), "--data", "embedded:digits", "--model", "swinv2_nano", "--img-size", "32",
                "--window-size", "4"]
        key = "--model"
    assert main(args) == 2
    line = one_line_error(capsys)
    assert "holds a swinv2_pico encoder" in line and f"set {key}=swinv2_pico" in line, line
    assert len(line) < 300 and "exclude" not in line and "layers." not in line, line
    assert snapshot(out) == before


def test_load_pretrained_names_both_variants():
    pico = create_model("swinv2_pico", img_size=32, window_size=4)
    nano = create_model("swinv2_nano", img_size=32, window_size=4)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(nano, pico.state_dict())
    message = str(err.value)
    assert "holds a swinv2_pico encoder, the model is a swinv2_nano" in message
    assert "create_model('swinv2_pico'" in message and "layers." not in message
