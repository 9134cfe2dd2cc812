"""Linear layers whose float32 CPU matrix products run in oneDNN instead of the BLAS behind ``F.linear``.

Why: the backbone's training step is ~70% Linear GEMMs on a CPU. PyTorch runs float32 ``addmm``/``mm`` in its BLAS
(MKL in the official wheels). On this project's AMD EPYC (AVX-512), oneDNN's float32 matmul, which PyTorch already
ships (``torch.ops.mkldnn._linear_pointwise``, the op inductor uses), measured about 2x faster than MKL on the
forward and input-gradient products of every SwinV2-T shape, and on the weight gradient except where the input
has few channels (there the BLAS keeps it; see ``_backward``). The result is the same float32 product
with another summation order (differences ~1e-6 relative), not a reduced-precision mode. The op is private to
PyTorch: :mod:`simmim.compat` checks it once with a tiny call, and without it every product here is ``F.linear``.

Where it does not apply, :func:`linear` is ``F.linear``: other devices and dtypes, autocast (PyTorch already
sends bf16 products to oneDNN, and routing them through this op measured slower in the training step), and whenever
the model is traced or exported for another runtime (those graphs hold plain aten ops). torch.compile keeps the
op (a registered custom op with its autograd formula) and compiles the rest around it.

``torch.utils.flop_counter.FlopCounterMode`` counts the op like ``aten.mm`` (2 x M x N x K): its FLOP formula is
registered here, so a model counts the same FLOPs on either backend (without it, the counter saw 0.64 of the
~6 GFLOP of a SwinV2-T forward at 192 px: only the products small enough to stay in ``F.linear``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from simmim import compat

from .tracing import is_symbolic_tracing

Backend = Literal["auto", "aten"]
SMALL_K = 128  # input channels up to which the weight gradient stays in the BLAS (see _backward)
# tokens x in x out features below which F.linear is faster: the custom op's dispatch costs ~25 us forward and
# ~90 us forward + backward, more than oneDNN saves on products this small (measured crossover 2e6-6e6)
MIN_WORK = 4_000_000


def onednn_available() -> bool:
    """Whether oneDNN's linear op passed its check at import (:mod:`simmim.compat`: a tiny call against
    ``F.linear``); if not, a warning named the torch version and every product here is ``F.linear``."""
    return compat.MKLDNN_LINEAR


_AVAILABLE = onednn_available()


if _AVAILABLE:
    # A registered custom op rather than an autograd.Function or direct calls of the mkldnn op: torch.compile keeps
    # it as one opaque call in forward and backward graphs (inductor's own lowering of the mkldnn op expects a
    # constant, prepacked weight) and fuses the elementwise work around it, while the products stay in oneDNN.
    @torch.library.custom_op("simmim::onednn_matmul_nt", mutates_args=())
    def _matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``a @ b.T (+ bias)`` in oneDNN: a (M, K), b (N, K) -> (M, N)."""
        return compat.mkldnn_linear(a, b, bias)

    @_matmul_nt.register_fake
    def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return a.new_empty(a.shape[0], b.shape[0])

    def _setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad: torch.Tensor):
        """For out = x @ weight.T + bias: x (M, K), weight (N, K), grad (M, N)."""
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul_nt(grad, weight.t().contiguous(), None)  # (M, N) @ (N, K) -> (M, K)
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K) -> (N, K), a reduction over the M tokens: oneDNN needs both operands transposed into
            # copies, which costs more than it saves when the input has few channels (measured: stage 1 of
            # SwinV2-T/B, K = 96/128, where the BLAS, which reads transposed operands in place, is faster)
            grad_w = grad.t() @ x if x.shape[1] <= SMALL_K else _matmul_nt(grad.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b

    _matmul_nt.register_autograd(_backward, setup_context=_setup_context)

    @register_flop_formula(torch.ops.simmim.onednn_matmul_nt)
    def _matmul_nt_flops(a_shape: torch.Size, b_shape: torch.Size, bias_shape: torch.Size | None, *args,
                         out_shape: torch.Size | None = None, **kwargs) -> int:
        """FLOPs of ``a @ b.T`` for FlopCounterMode, as ``aten.mm`` counts them: a (M, K), b (N, K) -> 2 M N K."""
        (m, k), (n, _) = a_shape, b_shape
        return 2 * m * n * k


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: Backend = "auto") -> torch.Tensor:
    """``F.linear`` (x (..., K) -> (..., N)), through oneDNN for float32 CPU tensors outside autocast.

    torch.compile keeps the oneDNN op; fx, TorchScript tracing and torch.export get ``F.linear``, so their graphs
    hold standard aten ops only (ONNX, other runtimes).
    """
    if (backend == "aten" or not _AVAILABLE or _exporting()  # first: fx proxies have no device or dtype
            or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or not (x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32))
            or x.numel() * weight.shape[0] < MIN_WORK):
        return F.linear(x, weight, bias)
    out = _matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias)  # (M, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def _exporting() -> bool:
    """Recorded for another runtime (fx, TorchScript tracing, torch.export), where only aten ops belong; plain
    torch.compile is not (its graphs run here and keep the custom op)."""
    return is_symbolic_tracing() or torch.jit.is_tracing() or compat.is_exporting()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and init) computed by :func:`linear`; ``backend='aten'`` always uses
    ``F.linear``."""

    backend: Backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend)
