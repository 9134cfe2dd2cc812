"""Tests for the SimMIM wrapper (simmim.masked_modeling): the masked L1 loss, the normalised target, the state-dict
layout, that masked pixels cannot leak into the encoder, and that a few optimizer steps learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import perturb_

from simmim.data import MaskGenerator
from simmim.masked_modeling import SimMIM, SimMIMOutput, masked_l1_loss, normalize_target
from simmim.models import create_model

IMG, PATCH, GRID, STRIDE, FEATURES = 64, 4, 16, 32, 128  # swinv2_pico at 64 px: 16x16 tokens, 128 final channels


def pico(num_classes: int = 0, **kw) -> torch.nn.Module:
    return create_model("swinv2_pico", img_size=IMG, window_size=4, num_classes=num_classes, **kw)


def random_masks(batch: int, seed: int = 0) -> torch.Tensor:
    """(B, 16, 16) bool token masks from the real mask generator: 10 of 16 cells of 16 px masked."""
    gen = MaskGenerator(input_size=IMG, mask_patch_size=16, model_patch_size=PATCH, mask_ratio=0.6)
    rng = np.random.default_rng(seed)
    return torch.stack([gen(rng) for _ in range(batch)])


def pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, h, w) token mask -> (B, 1, H, W) pixel mask (each token covers PATCH x PATCH pixels)."""
    return mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# masked_l1_loss


def test_loss_is_zero_when_masked_pixels_match_even_if_visible_ones_differ():
    target = torch.randn(2, 3, 8, 8)
    m = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    m[:, :, :4] = True
    pred = torch.where(m, target, target + 1000 * torch.randn_like(target))  # wildly wrong where visible
    assert masked_l1_loss(pred, target, m).item() == 0.0
    # the same error on a masked pixel is counted
    pred[0, 0, 0, 0] += 1.0
    assert masked_l1_loss(pred, target, m).item() > 0.0


def test_loss_matches_hand_computed_2x2_example():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                          [[0.0, 5.0], [5.0, 1.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[[0.0, 0.0], [0.0, 10.0]],
                            [[0.0, 0.0], [0.0, 0.0]]]])
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2): top-left and bottom-right masked
    # masked errors: channel 0: |1-0| + |4-10| = 7; channel 1: |0-0| + |1-0| = 1 -> 8 over 2 pixels x 2 channels
    expected = 8.0 / (2.0 + 1e-5) / 2.0
    assert masked_l1_loss(pred, target, m).item() == pytest.approx(expected, rel=1e-6)
    assert masked_l1_loss(pred, target, m.bool()).item() == pytest.approx(expected, rel=1e-6)


def test_visible_pixels_have_no_effect_on_loss_or_gradient():
    target = torch.randn(2, 3, 8, 8)
    m = torch.rand(2, 1, 8, 8) < 0.5
    base = torch.randn(2, 3, 8, 8)
    other = torch.where(m, base, torch.randn(2, 3, 8, 8) * 50)  # same on masked pixels only
    pred = base.clone().requires_grad_(True)
    loss = masked_l1_loss(pred, target, m)
    loss.backward()
    assert loss.item() == pytest.approx(masked_l1_loss(other, target, m).item(), rel=1e-6)
    visible = (~m).expand_as(pred)
    assert torch.equal(pred.grad[visible], torch.zeros(int(visible.sum())))
    assert (pred.grad[m.expand_as(pred)] != 0).all()  # d|p - t| / dp = +-1 / (count * C) on masked pixels


# ----------------------------------------------------------------------------------------------------------------
# normalize_target


def _normalize_by_loops(t: torch.Tensor, window: int) -> torch.Tensor:
    """Direct per-pixel definition: cropped neighbourhood, mean, Bessel-corrected variance, float64."""
    t = t.double()
    out = torch.empty_like(t)
    B, C, H, W = t.shape
    r = window // 2
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    patch = t[b, c, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
                    n = patch.numel()
                    mean = patch.sum() / n
                    var = ((patch - mean) ** 2).sum() / (n - 1)
                    out[b, c, i, j] = (t[b, c, i, j] - mean) / math.sqrt(var + 1e-6)
    return out


def test_normalize_target_equals_per_pixel_definition():
    t = torch.randn(1, 2, 9, 9) * 2 + 1
    got = normalize_target(t, 5)
    assert got.shape == t.shape and got.dtype == t.dtype
    torch.testing.assert_close(got.double(), _normalize_by_loops(t, 5), rtol=1e-4, atol=1e-4)


def test_normalize_target_window_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        normalize_target(torch.randn(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="odd"):
        SimMIM(pico(), norm_target=True, norm_target_window=46)


# ----------------------------------------------------------------------------------------------------------------
# SimMIM: layout and forward


def test_state_dict_has_official_layout():
    sd = SimMIM(pico()).state_dict()
    assert all(k.startswith("encoder.") or k.startswith("decoder.0.") for k in sd)
    assert {k for k in sd if k.startswith("decoder.")} == {"decoder.0.weight", "decoder.0.bias"}
    assert sd["encoder.mask_token"].shape == (1, 1, 16)
    assert sd["decoder.0.weight"].shape == (STRIDE * STRIDE * 3, FEATURES, 1, 1)
    assert sd["decoder.0.bias"].shape == (STRIDE * STRIDE * 3,)
    assert "encoder.patch_embed.proj.weight" in sd and "encoder.layers.3.blocks.1.attn.qkv.weight" in sd


def test_forward_returns_scalar_loss_and_full_size_prediction():
    model = SimMIM(pico(drop_path_rate=0.0))
    images, mask = torch.randn(2, 3, IMG, IMG), random_masks(2)
    out = model(images, mask)
    assert isinstance(out, SimMIMOutput) and isinstance(out, tuple)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.pred.shape == (2, 3, IMG, IMG)
    # the loss is the masked L1 against the raw images when norm_target is off
    torch.testing.assert_close(out.loss, masked_l1_loss(out.pred, images, pixel_mask(mask)))


def test_classifier_head_is_removed():
    encoder = pico(num_classes=10)
    assert any(k.startswith("head.") for k in encoder.state_dict())
    model = SimMIM(encoder)
    assert model.encoder.num_classes == 0
    assert not any(k.startswith("encoder.head.") for k in model.state_dict())
    assert model.encoder(torch.randn(1, 3, IMG, IMG)).shape == (1, FEATURES)  # pooled features, no logits


# ----------------------------------------------------------------------------------------------------------------
# SimMIM: no leak from masked pixels


def test_pixels_inside_masked_patches_cannot_leak_into_the_encoder():
    model = perturb_(SimMIM(pico(drop_path_rate=0.0))).eval()  # non-identity blocks, so a leak would show
    mask = random_masks(2, seed=3)
    assert (mask.flatten(1).sum(1) == 10 * 16).all()  # 10 of 16 cells, 16 tokens each: both kinds present
    pm = pixel_mask(mask)  # (B, 1, H, W)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model.encoder.forward_features(x, mask)
        hidden = model.encoder.forward_features(x + 10 * torch.randn_like(x) * pm, mask)
        torch.testing.assert_close(hidden, ref, rtol=0, atol=1e-6)

        # a single visible pixel changes the output, so the check above can fail
        i, j = (~pm[0, 0]).nonzero()[0].tolist()
        poked = x.clone()
        poked[0, :, i, j] += 1.0
        changed = model.encoder.forward_features(poked, mask)
    assert not torch.allclose(changed[0], ref[0], atol=1e-4)
    torch.testing.assert_close(changed[1], ref[1], rtol=0, atol=1e-6)  # other images are untouched


# ----------------------------------------------------------------------------------------------------------------
# SimMIM: normalised target


def test_norm_target_loss_uses_normalized_images():
    window = 7
    model = SimMIM(pico(drop_path_rate=0.0), norm_target=True, norm_target_window=window)
    images, mask = torch.randn(2, 3, IMG, IMG) * 0.5 + 0.3, random_masks(2, seed=1)
    out = model(images, mask)
    expected = masked_l1_loss(out.pred, normalize_target(images, window), pixel_mask(mask))
    torch.testing.assert_close(out.loss, expected)
    raw = masked_l1_loss(out.pred, images, pixel_mask(mask))
    assert not torch.isclose(out.loss, raw, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# SimMIM: gradients and learning


def test_gradients_reach_mask_token_and_decoder():
    model = SimMIM(pico(drop_path_rate=0.0))
    out = model(torch.randn(2, 3, IMG, IMG), random_masks(2))
    out.loss.backward()
    for p in (model.encoder.mask_token, model.decoder[0].weight, model.decoder[0].bias,
              model.encoder.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_mask_token_gets_no_gradient_when_nothing_is_masked():
    model = SimMIM(pico(drop_path_rate=0.0))
    out = model(torch.randn(2, 3, IMG, IMG), torch.zeros(2, GRID, GRID, dtype=torch.bool))
    assert out.loss.item() == 0.0  # no masked pixel, nothing to reconstruct
    out.loss.backward()
    assert model.encoder.mask_token.grad is None or not model.encoder.mask_token.grad.any()


def test_adamw_steps_lower_the_loss_on_a_fixed_batch():
    model = SimMIM(pico(drop_path_rate=0.0)).train()
    images, mask = torch.randn(4, 3, IMG, IMG), random_masks(4, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    losses = []
    for _ in range(20):
        loss = model(images, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
