"""`simmim inspect` (issue 19): the position bias of every stage and head as the model computes it, at the trained
window and extrapolated, the temperatures and metadata as text, refusals that change nothing."""

import pytest
import torch
from PIL import Image
from test_faults import one_line_error, snapshot
from test_pretrain import TINY

from simmim.cli import main
from simmim.inspection import BlockBias, bias_maps, block_biases
from simmim.models import create_model
from simmim.weights import load_encoder, read_weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "schedule.max_steps=4", "--output", str(out)]) == 0
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]


def gathered(maps, window):
    """(nH, 2W-1, 2W-1) maps -> the (nH, N, N) bias of every token pair, as attention adds it."""
    attn = create_model("swinv2_pico", img_size=32, window_size=4).layers[0].blocks[0].attn
    attn.set_window((window, window), (0, 0))
    return maps.flatten(1)[:, attn.relative_position_index.view(-1)].view(maps.shape[0], window**2, window**2)


def test_maps_are_the_bias_the_model_adds_at_the_trained_and_at_a_larger_window(ckpt):
    weights = read_weights(ckpt)
    blocks = block_biases(weights)
    assert [(b.stage, b.block) for b in blocks] == [(s, k) for s in range(4) for k in range(2)]
    encoder = load_encoder(ckpt)  # 32 px / W4: stage 0 is 8x8 tokens in windows of 4
    attn = encoder.layers[0].blocks[1].attn
    with torch.no_grad():
        torch.testing.assert_close(gathered(bias_maps(blocks[1], 4, 4), 4), attn._compute_bias())
        encoder.set_input_size(window_size=8)  # stage 0 -> one 8x8 window; the log-CPB keeps its trained 4
        torch.testing.assert_close(gathered(bias_maps(blocks[1], 8, 4), 8), attn._compute_bias())


def test_a_v1_table_is_shown_resized_as_swin_v1_transfers():
    model = create_model("swinv2_pico", img_size=32, window_size=4, position_bias="table", num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    attn = model.layers[0].blocks[0].attn
    bias = BlockBias(0, 0, {"relative_position_bias_table": attn.relative_position_bias_table.detach().clone()})
    model.set_input_size(window_size=8)
    with torch.no_grad():
        torch.testing.assert_close(gathered(bias_maps(bias, 8, 4), 8), attn._compute_bias())


def test_inspect_writes_pictures_and_text_and_refuses_what_it_cannot_show(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(b"the user's")
    assert main(["inspect", str(ckpt), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["inspect.txt", "mine.png"] + [f"position_bias_stage{i}.png" for i in range(4)]
    assert Image.open(out / "position_bias_stage0.png").mode == "RGB"
    text = (out / "inspect.txt").read_text()
    assert "32 px, window 4, position-bias windows 4/4/2/1" in text and "swinv2_pico" in text
    assert "stage 3 block 1:" in text and '"norm_target": true' in text  # temperatures and the run's config

    before = snapshot(out)
    assert main(["inspect", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["inspect", str(ckpt), "--out", str(out), "--overwrite", "--scale", "3"]) == 0
    assert (out / "mine.png").read_bytes() == b"the user's"

    no_bias = tmp_path / "no_bias.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(16, 3, 4, 4)}, no_bias)
    assert main(["inspect", str(no_bias), "--out", str(tmp_path / "fresh")]) == 2
    assert "has no position bias" in one_line_error(capsys)
    assert not (tmp_path / "fresh").exists()

    assert main(["inspect", str(ckpt), "--out", str(out / "mine.png")]) == 2
    assert "is a file" in one_line_error(capsys)


def test_a_scale_too_large_to_draw_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    # --scale 1000 at the trained window 4 asked the CPB MLP for (2 x 4000 - 1)^2 offsets: 131 GB, then a traceback
    assert main(["inspect", str(ckpt), "--out", str(tmp_path / "out"), "--scale", "1000"]) == 2
    assert "use --scale 48 or less" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
