"""CUDA checks of the fused attention path and bf16; they run only where a GPU is present (skipped on CPU CI)."""

import pytest
import torch
from conftest import perturb_

from simmim.models import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("img_size,window", [(192, 12), (224, 14)])
def test_fused_equals_explicit_on_cuda_fp32(img_size, window):
    model = perturb_(create_model("swinv2_pico", img_size=img_size, window_size=window, num_classes=10,
                                  drop_path_rate=0.0)).cuda().train()
    x = torch.randn(4, 3, img_size, img_size, device="cuda")
    results = {}
    for fused in (True, False):
        model.set_fused_attn(fused)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        results[fused] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-4, rtol=1e-4)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_fused_matches_fp32():
    model = perturb_(create_model("swinv2_pico", img_size=192, window_size=12, num_classes=10)).cuda().eval()
    x = torch.randn(4, 3, 192, 192, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.set_fused_attn(True)
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
