"""`simmim reconstruct` (issue 19): panels from our pretraining checkpoints and official SimMIM releases, the
normalised target undone from the visible pixels, refusals that change nothing."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_convert import OfficialConfig, official_from_timm, timm_reference
from test_faults import one_line_error, snapshot
from test_pretrain import TINY

from simmim.cli import main
from simmim.data import MaskGenerator
from simmim.data.transforms import denormalize
from simmim.reconstruct import load_masked_model, reconstruct
from simmim.visualize import GRID_PADDING


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 4-step TINY pretraining run: swinv2_pico, 32 px / W4, mask cells 8 px, normalised target over 7x7."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "schedule.max_steps=4", "--output", str(out)]) == 0
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]


def images_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "gray.jpg")
    (root / "broken.png").write_bytes(b"not an image")  # skipped with a warning
    (root / "notes.txt").write_text("not an image either")  # not an image name: not listed
    return root


def tile_width(side):
    return 4 * (side + GRID_PADDING) + GRID_PADDING


def test_panels_of_our_checkpoint_skip_junk_and_never_overwrite(ckpt, tmp_path, capsys, caplog):
    folder = images_folder(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    assert main(["reconstruct", str(ckpt), str(folder), "--out", str(out)]) == 0
    assert ["broken.png" in r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [True]
    assert sorted(p.name for p in out.iterdir()) == ["gray.png", "mine.txt", "wide.png"]
    assert Image.open(out / "wide.png").size == (tile_width(32), 32 + 2 * GRID_PADDING)  # resized + cropped to 32

    before = snapshot(out)
    assert main(["reconstruct", str(ckpt), str(folder), "--out", str(out)]) == 2  # outputs exist: refused
    assert "--overwrite" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["reconstruct", str(ckpt), str(folder), "--out", str(out), "--overwrite", "--native-size"]) == 0
    # at its own size: 50x70 cropped to 32x64, the largest size that tiles into 32 px (the encoder stride)
    assert Image.open(out / "wide.png").size == (4 * (64 + 2) + 2, 32 + 2 * GRID_PADDING)
    assert (out / "mine.txt").read_text() == "the user's"

    (tmp_path / "a_file").write_text("x")
    assert main(["reconstruct", str(ckpt), str(folder), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file" in one_line_error(capsys)
    assert (tmp_path / "a_file").read_text() == "x"


def test_normalised_target_panel_equals_a_hand_computation_on_one_patch(ckpt):
    masked = load_masked_model(ckpt)
    assert masked.norm_target and masked.norm_target_window == 7 and masked.mask_patch_size == 8  # the run's config
    images = torch.randn(1, 3, 32, 32)
    mask = MaskGenerator(32, 8, 4, 0.6)(np.random.default_rng(1))[None]  # (1, 8, 8): 10 of 16 cells of 8 px
    result = reconstruct(masked, images, mask)
    with torch.no_grad():
        raw = masked.model(images, mask).pred  # (1, 3, 32, 32): the normalised target the model predicts

    cells = mask[0, ::2, ::2]  # (4, 4) mask cells
    pixel_mask = mask[0].repeat_interleave(4, 0).repeat_interleave(4, 1)  # (32, 32)
    checked = 0
    for i, j in cells.nonzero().tolist():
        top, left = i * 8, j * 8
        rows, cols = slice(max(top - 3, 0), top + 11), slice(max(left - 3, 0), left + 11)  # grown by 7 // 2
        visible = ~pixel_mask[rows, cols]
        if visible.sum() < 2:
            continue
        for c in range(3):
            values = images[0, c, rows, cols][visible]
            mean, std = values.mean(), (values.var(unbiased=True) + 1e-6).sqrt()
            expected = raw[0, c, top:top + 8, left:left + 8] * std + mean
            torch.testing.assert_close(result.pred[0, c, top:top + 8, left:left + 8], expected)
        # the panel shows it de-normalised in the reconstruction column and pasted into the input
        shown = denormalize(result.pred, masked.mean, masked.std)[0, :, top:top + 8, left:left + 8]
        y, x = GRID_PADDING + top, GRID_PADDING + left
        for col in (2, 3):
            x0 = x + col * (32 + GRID_PADDING)
            torch.testing.assert_close(result.panel[:, y:y + 8, x0:x0 + 8], shown)
        checked += 1
    assert checked > 0


def test_an_official_simmim_release_reconstructs_with_its_decoder(tmp_path, capsys):
    ref = timm_reference(num_classes=0)  # timm's SwinV2, swinv2_pico shapes, 64 px / W4
    sd = official_from_timm(ref, rpe_mlp=True, prefix="encoder.")
    sd["encoder.mask_token"] = torch.randn(1, 1, 16)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.randn(3072, 128, 1, 1) * 0.02, torch.randn(3072)
    path = tmp_path / "simmim_swinv2_official.pth"
    torch.save({"model": sd, "epoch": 799, "config": OfficialConfig()}, path)

    masked = load_masked_model(path)
    assert masked.img_size == (64, 64) and masked.norm_target and masked.mask_patch_size == 32  # the release recipe
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the official weights really are in the model: same features as timm's
        torch.testing.assert_close(masked.model.encoder.forward_features(x), ref.forward_features(x),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.model.decoder[0].weight, sd["decoder.0.weight"])

    folder = images_folder(tmp_path / "images")
    assert main(["reconstruct", str(path), str(folder / "wide.png"), "--out", str(tmp_path / "out"),
                 "--mask-ratio", "0.5", "--seed", "3"]) == 0
    assert Image.open(tmp_path / "out" / "wide.png").size == (tile_width(64), 64 + 2 * GRID_PADDING)


def test_a_checkpoint_without_a_decoder_is_refused_in_one_line(ckpt, tmp_path, capsys):
    exported = tmp_path / "encoder.safetensors"
    assert main(["export", str(ckpt), "--out", str(exported)]) == 0
    capsys.readouterr()
    folder = images_folder(tmp_path / "images")
    assert main(["reconstruct", str(exported), str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "no SimMIM decoder" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_the_embedded_photos_get_one_panel_each_named_after_them(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["reconstruct", str(ckpt), "embedded:photos", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 21 and "skimage_astronaut.png" in names and "sklearn_china.png" in names


def test_a_full_disk_stops_in_one_line_naming_the_file(ckpt, tmp_path, capsys, monkeypatch):
    import errno

    import simmim.reconstruct
    from simmim.visualize import save_png

    def full_after_one(grid, path):
        if path.parent.exists() and any(path.parent.iterdir()):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_png(grid, path)

    monkeypatch.setattr(simmim.reconstruct, "save_png", full_after_one)
    folder = images_folder(tmp_path / "images")
    assert main(["reconstruct", str(ckpt), str(folder), "--out", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys)
    assert "wide.png: no space left on the device; 1 file(s) were written" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gray.png"]


def test_a_negative_seed_is_a_usage_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # numpy refused it with a traceback before
        main(["reconstruct", str(ckpt), "embedded:photos", "--out", str(tmp_path / "out"), "--seed", "-1"])
    assert exit_info.value.code == 2 and "--seed: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
