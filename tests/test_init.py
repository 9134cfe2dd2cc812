"""Warm starts (`simmim pretrain --init`): continue SimMIM pretraining from our checkpoints, official SimMIM
releases or encoder-only files, at a new size and window, with a fresh optimizer and schedule."""

from pathlib import Path

import torch
from conftest import PICO, perturb_
from test_pretrain import TINY

from simmim.cli import main
from simmim.models import create_model, to_official
from simmim.weights import read_checkpoint, sha256

# a negligible lr (the config refuses 0): the weights a warm-started run ends with are the ones it started from,
# to far below the tolerance below, while any weight not loaded differs by O(0.02)
FROZEN = ["optim.base_lr=1e-12", "optim.warmup_lr=1e-12", "optim.min_lr=1e-12", "schedule.max_steps=2",
          "run.save_every=2"]
SAME = dict(rtol=0, atol=1e-7)


def last(out: Path) -> dict:
    return read_checkpoint(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1])


def source_run(tmp_path: Path) -> Path:
    out = tmp_path / "source"
    assert main(["pretrain", "demo/pretrain", *TINY, "--output", str(out), "schedule.max_steps=4"]) == 0
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]


def test_init_from_our_checkpoint_at_a_new_size_loads_encoder_decoder_and_records_the_source(tmp_path):
    ckpt = source_run(tmp_path)  # 32 px / W4: effective windows 4/4/4/2... at 32 px: 4/4/2/1
    source = read_checkpoint(ckpt)
    out = tmp_path / "warm"
    assert main(["pretrain", "demo/pretrain", *TINY, *FROZEN, "model.img_size=64", "data.mask_patch_size=16",
                 "--init", str(ckpt), "--output", str(out)]) == 0
    state = last(out)
    assert state["step"] == 2 and state["optimizer"]["state"][0]["step"] == 2  # a fresh optimizer, not resumed
    for k, v in source["model"].items():  # encoder, mask token and decoder all came from the source
        torch.testing.assert_close(state["model"][k], v, **SAME, msg=k)
    init = state["meta"]["init"]
    assert init["sha256"] == sha256(ckpt) and init["loaded"] == ["encoder", "mask token", "decoder"]
    assert init["source"] == "run" and init["kind"] == "simmim-pretrain"
    # the new geometry keeps the log-CPB normalised by the windows the source trained at
    assert state["meta"]["pretrained_window_sizes"] == source["meta"]["effective_window_sizes"]
    assert state["meta"]["effective_window_sizes"] == [[4, 4], [4, 4], [4, 4], [2, 2]]


def test_init_from_an_official_simmim_release_and_from_an_encoder_only_file(tmp_path):
    enc = perturb_(create_model("swinv2_pico", img_size=32, window_size=4, num_classes=0))
    official = {f"encoder.{k}": v for k, v in to_official(enc.state_dict(), rpe_mlp=True).items()}
    for name, buf in enc.named_buffers():
        if name.endswith("relative_coords_table"):
            official[f"encoder.{name}"] = buf  # the official code saves it; it tells the trained windows
    official["encoder.mask_token"] = torch.randn(1, 1, PICO["embed_dim"])
    official["decoder.0.weight"], official["decoder.0.bias"] = torch.randn(32 * 32 * 3, 128, 1, 1), torch.randn(3072)
    path = tmp_path / "simmim_swinv2_official.pth"
    torch.save({"model": official, "epoch": 799}, path)
    out = tmp_path / "from-official"
    assert main(["pretrain", "demo/pretrain", *TINY, *FROZEN, "--init", str(path), "--output", str(out)]) == 0
    state = last(out)
    assert state["meta"]["init"]["source"] == "official"
    assert state["meta"]["init"]["loaded"] == ["encoder", "mask token", "decoder"]
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(state["model"][f"encoder.{k}"], v, **SAME, msg=k)
    torch.testing.assert_close(state["model"]["decoder.0.weight"], official["decoder.0.weight"], **SAME)

    timm_file = tmp_path / "encoder_only.pth"  # a timm-layout encoder: no windows recorded, no decoder
    torch.save(enc.state_dict(), timm_file)
    out = tmp_path / "from-timm"
    assert main(["pretrain", "demo/pretrain", *TINY, *FROZEN, "--init", str(timm_file), "--output", str(out)]) == 2
    assert main(["pretrain", "demo/pretrain", *TINY, *FROZEN, "--init", str(timm_file), "--output", str(out),
                 "model.pretrained_window_sizes=[4,4,2,1]"]) == 0
    state = last(out)
    assert state["meta"]["init"]["loaded"] == ["encoder"]  # mask token and decoder start fresh
    torch.testing.assert_close(state["model"]["encoder.layers.1.blocks.0.attn.qkv.weight"],
                               enc.state_dict()["layers.1.blocks.0.attn.qkv.weight"], **SAME)


def test_resuming_a_warm_started_run_does_not_init_again(tmp_path, caplog):
    ckpt = source_run(tmp_path)
    out = tmp_path / "warm"
    args = ["pretrain", "demo/pretrain", *TINY, "--init", str(ckpt), "--output", str(out), "run.save_every=2"]
    assert main([*args, "schedule.max_steps=2"]) == 0
    with caplog.at_level("INFO", logger="simmim"):
        assert main([*args, "schedule.max_steps=4", "--resume", "auto"]) == 0
    assert "was applied when the run started" in caplog.text
    assert last(out)["meta"]["init"]["sha256"] == sha256(ckpt)


def test_a_bad_init_path_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "--init", str(tmp_path / "missing.pt"), "--output",
                 str(out)]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert not out.exists()
