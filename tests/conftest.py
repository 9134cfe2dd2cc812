import pytest
import torch

# A SwinV2 small enough for CPU tests: 4 stages, one shifted block per stage, head dim 16.
PICO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def perturb_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised post-norms would otherwise make every block the
    identity, and a parity test on identity blocks could not fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
