"""`simmim inspect` (issue 19): the position bias of every stage and head as the model computes it, at the trained
window and extrapolated, the temperatures and metadata as text, refusals that change nothing. A ViT's relative
position tables (shared or per block) at the trained token grid and as a model moved to a larger image has them."""

import math

import numpy as np
import pytest
import torch
from conftest import perturb_
from PIL import Image
from test_faults import one_line_error, snapshot
from test_pretrain import TINY

from simmim.checkpoint import save_checkpoint
from simmim.cli import main
from simmim.inspection import (
    LABEL_H,
    MAX_PIXELS,
    PAD,
    BlockBias,
    bias_maps,
    block_biases,
    picture_layout,
    tile_pixels,
    vit_bias,
    vit_picture_size,
    vit_rows,
)
from simmim.models import create_encoder, create_model
from simmim.weights import geometry_metadata, load_encoder, read_weights


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


# ----------------------------------------------------------------------------------------------------------------
# ViT: one token grid (vit_pico: 64 px, patch 16 -> 4 x 4 tokens, 2 heads, 3 blocks)


@pytest.fixture(scope="module")
def vit_ckpts(tmp_path_factory):
    """Pretraining-style run checkpoints of vit_pico (one shared table) and vit_pico_ft (one per block), every
    parameter perturbed (timm starts the tables at zero, which would draw nothing)."""
    root = tmp_path_factory.mktemp("vit")
    ckpts = {}
    for seed, name in enumerate(("vit_pico", "vit_pico_ft")):
        enc = perturb_(create_encoder(name, num_classes=0), seed=seed)
        state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
        meta = {"kind": "simmim-pretrain", **geometry_metadata(enc, name)}
        ckpts[name] = save_checkpoint({"model": state, "meta": meta, "step": 3}, root / f"{name}.pt")
    return ckpts


def model_biases(encoder):
    """Per table the (nH, 1 + L, 1 + L) bias the ViT adds to its attention logits, in vit_bias's order."""
    if encoder.rel_pos_bias is not None:
        return [encoder.rel_pos_bias()]
    return [block.attn._get_rel_pos_bias()[0] for block in encoder.blocks]  # (1, nH, 1 + L, 1 + L) each


def gathered_vit(maps, index):
    """(nH, 2h-1, 2w-1) maps -> the (nH, L, L) token-pair bias through BEiT's index (1 + L, 1 + L)."""
    L = index.shape[0] - 1
    return maps.flatten(1)[:, index[1:, 1:].reshape(-1)].view(maps.shape[0], L, L)


@pytest.mark.parametrize("name", ["vit_pico", "vit_pico_ft"])
def test_vit_maps_are_the_bias_the_model_adds_at_its_grid_and_moved_to_twice_it(vit_ckpts, name):
    bias = vit_bias(read_weights(vit_ckpts[name]))
    assert bias.grid == (4, 4)
    assert [label for label, _ in bias.tables] == (["shared"] if name == "vit_pico" else ["block 0", "block 1",
                                                                                         "block 2"])
    rows = vit_rows(bias, 2)
    encoder = load_encoder(vit_ckpts[name])
    index = (encoder.rel_pos_bias or encoder.blocks[0].attn).relative_position_index
    with torch.no_grad():
        for (_, small, _), (_, table), added in zip(rows, bias.tables, model_biases(encoder), strict=True):
            assert small.shape == (2, 7, 7)
            torch.testing.assert_close(gathered_vit(small, index), added[:, 1:, 1:])
            # the 3 CLS entries the text lists: cls->token, token->cls, cls->cls
            torch.testing.assert_close(table[-3:].T, torch.stack([added[:, 0, 1], added[:, 1, 0], added[:, 0, 0]], 1))
        encoder.set_input_size(img_size=128)  # 8 x 8 tokens: every table resized as the toolkit moves a ViT
        index = (encoder.rel_pos_bias or encoder.blocks[0].attn).relative_position_index
        for (_, _, large), added in zip(rows, model_biases(encoder), strict=True):
            assert large.shape == (2, 15, 15)
            torch.testing.assert_close(gathered_vit(large, index), added[:, 1:, 1:])


@pytest.mark.parametrize("name", ["vit_pico", "vit_pico_ft"])
def test_inspect_draws_a_vit_and_says_how_its_bias_is_shared(vit_ckpts, name, tmp_path):
    out = tmp_path / "out"
    assert main(["inspect", str(vit_ckpts[name]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["inspect.txt", "position_bias_vit.png"]
    bias = vit_bias(read_weights(vit_ckpts[name]))
    rows = vit_rows(bias, 2)
    low = min(float(m.min()) for _, s, big in rows for m in (s, big))
    high = max(float(m.max()) for _, s, big in rows for m in (s, big))
    image = np.asarray(Image.open(out / "position_bias_vit.png"))  # (H, W, 3)
    (a, c), (b, d) = rows[0][1].shape[-2:], rows[0][2].shape[-2:]
    px, left = picture_layout((a, c), (b, d), 2)
    assert image.shape[0] == 2 * LABEL_H + len(rows) * (b * px + LABEL_H + PAD) + LABEL_H  # a row per table
    y = 2 * LABEL_H + PAD
    for _, small, large in rows:  # every head's tile, at the trained grid and at twice it, is the table's colours
        y += LABEL_H
        top = y + (b - a) * px // 2
        for h, tile in enumerate(tile_pixels(small, low, high, px)):
            x = PAD + h * (c * px + PAD)
            np.testing.assert_array_equal(image[top:top + a * px, x:x + c * px], tile)
        for h, tile in enumerate(tile_pixels(large, low, high, px)):
            x = left + h * (d * px + PAD)
            np.testing.assert_array_equal(image[y:y + b * px, x:x + d * px], tile)
        y += b * px + PAD

    text = (out / "inspect.txt").read_text()
    sharing = "shared by all blocks" if name == "vit_pico" else "one per block"
    assert f"position bias: ViT relative position bias ({sharing})" in text
    assert "geometry: 64 px, patch 16, token grid 4x4" in text and f'"model": "{name}"' in text
    assert "window" not in text.split("metadata:")[0] and "temperature" not in text
    for label, table in bias.tables:
        for i, entry in enumerate(("cls->token", "token->cls", "cls->cls")):
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{label} {entry}:"))
            shown = [float(v) for v in line.split(":")[1].split()]
            assert shown == pytest.approx(table[-3 + i].tolist(), abs=6e-4)


def test_vit_refusals_are_one_line_and_write_nothing(vit_ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(vit_ckpts["vit_pico"]), "--out", str(out), "--scale", "49"]) == 2
    assert "token grid of 196 from the trained 4" in (err := one_line_error(capsys)) and "--scale 48 or less" in err

    # ViT-B fine-tuned (14 x 14 tokens, 12 blocks x 12 heads): the picture, not the grid, bounds the scale
    vit_b = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}
    for i in range(12):
        vit_b.update({f"blocks.{i}.attn.qkv.weight": torch.zeros(24, 8), f"blocks.{i}.attn.q_bias": torch.zeros(8),
                      f"blocks.{i}.attn.relative_position_bias_table": torch.zeros(27 * 27 + 3, 12)})
    torch.save(vit_b, tmp_path / "vit_b.pth")
    assert main(["inspect", str(tmp_path / "vit_b.pth"), "--out", str(out), "--scale", "13"]) == 2
    limit = int(one_line_error(capsys).split("use --scale ")[1].split()[0])
    bias = vit_bias(read_weights(tmp_path / "vit_b.pth"))
    assert (bias.grid, len(bias.tables)) == ((14, 14), 12)
    pixels = [math.prod(vit_picture_size(bias, s)) for s in (limit, limit + 1)]
    assert 2 <= limit < 13 and pixels[0] <= MAX_PIXELS < pixels[1]
    absolute = create_encoder("vit_pico", use_shared_rel_pos_bias=False, use_abs_pos_emb=True, num_classes=0)
    torch.save(absolute.state_dict(), tmp_path / "abs.pth")  # a BEiT without relative position bias
    assert main(["inspect", str(tmp_path / "abs.pth"), "--out", str(out)]) == 2
    assert "without a relative position bias" in one_line_error(capsys)
    assert not out.exists()
