import pytest
import torch
from PIL import Image

from simmim.visualize import reconstruction_grid, save_png

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
B, H, W, h, w = 3, 32, 32, 8, 8
PAD = 2


def make_batch():
    images = torch.randn(B, 3, H, W)
    pred = torch.randn(B, 3, H, W)
    mask = torch.rand(B, h, w) < 0.6  # (B, h, w), True = masked
    mask[:, 0, 0] = True  # at least one masked and one visible cell per sample
    mask[:, 0, 1] = False
    return images, mask, pred


def denorm(x):
    return (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)


def tile(grid, row, col):
    """The (3, H, W) image at (row, col) of a make_grid grid with padding 2."""
    y, x = PAD + row * (H + PAD), PAD + col * (W + PAD)
    return grid[:, y : y + H, x : x + W]


def pixel_mask(mask):
    return mask.repeat_interleave(H // h, 1).repeat_interleave(W // w, 2).unsqueeze(1).expand(-1, 3, -1, -1)


def test_grid_shape_and_range():
    images, mask, pred = make_batch()
    grid = reconstruction_grid(images, mask, pred, MEAN, STD)
    assert grid.shape == (3, B * (H + PAD) + PAD, 4 * (W + PAD) + PAD)  # (3, 104, 138)
    assert grid.dtype == torch.float32
    assert grid.min() >= 0 and grid.max() <= 1


def test_columns_hold_input_masked_prediction_pasted():
    images, mask, pred = make_batch()
    grid = reconstruction_grid(images, mask, pred, MEAN, STD)
    x, p, m = denorm(images), denorm(pred), pixel_mask(mask)
    for i in range(B):
        inp, masked, prd, pasted = (tile(grid, i, c) for c in range(4))
        torch.testing.assert_close(inp, x[i])
        torch.testing.assert_close(prd, p[i])
        # pasted: exactly the input on visible pixels, exactly the prediction on masked ones
        assert torch.equal(pasted[~m[i]], inp[~m[i]])
        assert torch.equal(pasted[m[i]], prd[m[i]])
        # masked input: gray on masked pixels, the input elsewhere
        assert torch.all(masked[m[i]] == 0.5)
        assert torch.equal(masked[~m[i]], inp[~m[i]])


def test_mask_upsampled_by_nearest_per_cell():
    images, _, pred = make_batch()
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[:, 2, 5] = True  # one masked cell covers pixels [8:12, 20:24]
    masked = tile(reconstruction_grid(images, mask, pred, MEAN, STD), 0, 1)
    gray = (masked == 0.5).all(dim=0)  # (H, W)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[8:12, 20:24] = True
    assert torch.equal(gray, expected)


def test_max_images_caps_rows_and_int_mask_accepted():
    images, mask, pred = make_batch()
    grid = reconstruction_grid(images, mask.int(), pred, MEAN, STD, max_images=2)
    assert grid.shape == (3, 2 * (H + PAD) + PAD, 4 * (W + PAD) + PAD)
    assert reconstruction_grid(images, mask, pred, MEAN, STD, max_images=1).shape[1] == H + 2 * PAD


def test_bad_shapes_raise():
    images, mask, pred = make_batch()
    with pytest.raises(ValueError, match="not a multiple"):
        reconstruction_grid(images, torch.zeros(B, 5, 5, dtype=torch.bool), pred, MEAN, STD)
    with pytest.raises(ValueError, match="channels"):
        reconstruction_grid(images, mask, pred, (0.5,) * 2, (0.5,) * 2)
    with pytest.raises(ValueError, match="pred"):
        reconstruction_grid(images, mask, pred[:, :, :16], MEAN, STD)


def test_save_png_round_trip(tmp_path):
    images, mask, pred = make_batch()
    grid = reconstruction_grid(images, mask, pred, MEAN, STD)
    path = save_png(grid, tmp_path / "recon" / "step_00000010.png")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["step_00000010.png"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (grid.shape[2], grid.shape[1])  # PIL reports (width, height)
        px = torch.tensor(list(im.getpixel((PAD, PAD))))
    expected = (grid[:, PAD, PAD] * 255).round().to(torch.uint8)
    assert torch.equal(px.to(torch.uint8), expected)
