"""Is the model being recorded rather than run? Caches and backend choices keyed on Python state must step aside
then: a traced graph would freeze a cached tensor, and tracers only know PyTorch's own ops."""

from __future__ import annotations

import torch

from simmim import compat


def is_symbolic_tracing() -> bool:
    """True inside ``torch.fx.symbolic_trace`` (shapes are proxies there, not ints)."""
    return compat.is_fx_symbolic_tracing()


def is_tracing() -> bool:
    """True while fx, TorchScript tracing, torch.compile or torch.export records the model."""
    return is_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
