"""CUDA checks of the fused attention path and bf16, against an outside oracle: timm's SwinTransformerV2 on the same
weights (and our explicit path beside it). The CUDA tests run only where a GPU is present (skipped on CPU CI); the
same comparison code runs on the CPU in ``test_the_timm_oracle_runs_on_cpu``, so it is known to work before a GPU
ever runs it."""

import pytest
import torch
from conftest import PICO, perturb_
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from simmim.models import SwinTransformerV2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def full_fp32():
    """Float32 products in float32 (no TF32) on CUDA, so that two implementations can agree to 1e-4."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def timm_pair(device: str, img_size: int, window: int, num_classes: int = 10):
    """timm's model and ours with the same (perturbed) weights, on ``device``, no stochastic depth."""
    geometry = dict(img_size=img_size, window_size=window, num_classes=num_classes, drop_path_rate=0.0, **PICO)
    ref = perturb_(TimmSwinV2(**geometry))
    ours = SwinTransformerV2(**geometry)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device), ours.to(device)


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_against_timm(device: str, img_size: int, window: int, batch: int) -> None:
    """Outputs and every parameter's gradient of our fused (SDPA) and explicit paths against timm's, in train mode."""
    ref, ours = timm_pair(device, img_size, window)
    ref.train(), ours.train()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    expected, expected_grads = forward_backward(ref, x)
    assert expected.std() > 0.1  # non-trivial outputs: the comparison could fail
    for fused in (True, False):
        ours.set_fused_attn(fused)
        out, grads = forward_backward(ours, x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=f"output, fused={fused}")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-3, msg=f"{name}, fused={fused}")


def check_bf16_against_timm(device: str, img_size: int, window: int, batch: int) -> None:
    """Under bf16 autocast, our fused path stays near timm's float32 output and near timm's own bf16 output."""
    ref, ours = timm_pair(device, img_size, window)
    ref.eval(), ours.eval()
    ours.set_fused_attn(True)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            out, timm_bf16 = ours(x), ref(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - exact).abs().max() < 0.1 * exact.abs().max()
    torch.testing.assert_close(out.float(), timm_bf16.float(), atol=0.05 * exact.abs().max().item(), rtol=0.05)


def test_the_timm_oracle_runs_on_cpu():
    check_against_timm("cpu", img_size=64, window=4, batch=2)
    check_bf16_against_timm("cpu", img_size=64, window=4, batch=2)


@needs_cuda
@pytest.mark.parametrize("img_size,window", [(192, 12), (224, 14)])
def test_fused_and_explicit_equal_timm_on_cuda_fp32(img_size, window, full_fp32):
    check_against_timm("cuda", img_size, window, batch=4)


@needs_cuda
def test_bf16_autocast_fused_matches_timm_on_cuda():
    check_bf16_against_timm("cuda", img_size=192, window=12, batch=4)
