import os
import socket
import sys

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per op make them up to
# 100x slower; one thread also keeps results independent of the machine's core count.
torch.set_num_threads(1)

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


def free_port() -> int:
    """A TCP port nobody listens on now: test runs side by side (worktrees, CI) never share a rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on CPU processes at a free port, followed by ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]


CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def hf(monkeypatch, tmp_path):
    """The ``datasets`` module with its cache redirected into tmp_path and no network."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets
