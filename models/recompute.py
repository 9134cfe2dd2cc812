"""Activation recomputation: what a training step keeps for backward and what it computes again.

* ``none``: autograd keeps every activation its backward needs.
* ``attention`` (selective recomputation, as in Korthikanti et al. 2022): a block keeps what its large matrix
  products need and recomputes the cheap parts whose outputs are large. The attention core (q/k normalisation,
  q k^T, bias, softmax) runs again in backward from the kept qkv projection, so the attention maps (nH x N values
  per token, the largest activations of window attention) are never kept; and fc2 keeps a recipe for its input,
  GELU(fc1 output), instead of the 4C-wide input itself (fc1's output is kept anyway for GELU's backward). The
  projections (qkv, proj, fc1, fc2), LayerNorms and windowing are not recomputed.
* ``full``: activation checkpointing: only each block's input is kept and the whole block runs again.

Outputs and gradients are the same in every mode (the recomputed ops are deterministic, and checkpointing restores
the RNG state for dropout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from simmim import compat
from simmim.errors import UserError

from .tracing import is_symbolic_tracing

Recompute = Literal["none", "attention", "full"]
MODES: tuple[str, ...] = ("none", "attention", "full")


def check_mode(mode: str) -> None:
    """Raise a ValueError naming the choices (and the config key) for an unknown mode."""
    if mode not in MODES:
        raise UserError(f"recompute must be one of {', '.join(MODES)}, got {mode!r} (model.recompute)")


def run_block(block: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``block(x)``, checkpointed for ``mode='full'`` when gradients are recorded."""
    if mode == "full" and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def recompute_in_backward(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, keeping only ``args`` for backward and running ``fn`` again there. PyTorch's non-reentrant
    checkpoint stops the rerun as soon as the tensors backward needs exist again, so ``fn``'s last op (probs @ v
    in the attention core) is not repeated."""
    if not torch.is_grad_enabled() or is_symbolic_tracing() or torch.jit.is_tracing():  # torch.compile keeps it
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


class _RecomputedAttention(torch.autograd.Function):
    """``out = softmax(q k^T + bias) v`` keeping only ``qkv`` and ``bias``. Backward recomputes q, k, v and the
    probabilities under the forward's autocast state (the same ops on the same inputs: the same numbers) and
    applies the product's backward by hand, so unlike a checkpoint it never reruns ``probs @ v``."""

    @staticmethod
    def forward(ctx, attn: nn.Module, qkv: torch.Tensor, bias: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.attn = attn
        device_type = qkv.device.type
        ctx.amp = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(qkv, bias, *params)
        return attn._core(qkv, bias)  # (B_, nH, N, d); the autograd graph inside is not recorded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, bias, *params = ctx.saved_tensors
        attn = ctx.attn
        device_type, amp, amp_dtype = ctx.amp
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
            with torch.enable_grad():
                qkv_ = qkv.detach().requires_grad_()
                q, k, v = attn._heads(qkv_)  # graph to qkv_ and the module's own parameters (logit_scale)
            with torch.no_grad():
                probs = attn._probs(q.detach(), k.detach(), bias)  # exactly the forward's ops: the same values
                # each product's backward as autograd computes it: bmm on the 3-D views that matmul makes, in
                # the dtypes autocast gave the forward; the maps are overwritten or dropped as soon as possible
                B_, nH, N, d = q.shape
                G = bias.shape[0]
                g3 = grad.reshape(B_ * nH, N, d)
                grad_v = torch.bmm(probs.view(B_ * nH, N, N).transpose(1, 2), g3).view(B_, nH, N, d).to(v.dtype)
                v3 = v.detach().reshape(B_ * nH, N, d)
                grad_logits = torch.bmm(g3, v3.transpose(1, 2)).view(B_, nH, N, N).to(probs.dtype)
                del g3, v3
                compat.softmax_backward_(grad_logits, probs)  # row by row, in place
                del probs
                grad_bias = grad_logits.view(B_ // G, G, nH, N, N).sum(0) if ctx.needs_input_grad[2] else None
                gl3 = grad_logits.view(B_ * nH, N, N).to(q.dtype)
                q3, kt3 = q.detach().reshape(B_ * nH, N, d), k.detach().transpose(-2, -1).reshape(B_ * nH, d, N)
                grad_q = torch.bmm(gl3, kt3.transpose(1, 2)).view(B_, nH, N, d)
                grad_k = torch.bmm(q3.transpose(1, 2), gl3).view(B_, nH, d, N).transpose(-2, -1)
                del gl3, grad_logits
        own = [attn.logit_scale] if params else []  # the parameter _heads used (passed to apply for its gradient)
        grads = torch.autograd.grad([q, k, v], [qkv_, *own], [grad_q, grad_k, grad_v], allow_unused=True)
        return (None, grads[0], grad_bias, *grads[1:])


def recompute_attention(attn: nn.Module, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``attn._core(qkv, bias)`` (explicit attention path, no attention dropout) keeping only ``qkv`` and ``bias``
    for backward; the module's parameters used by the core (``logit_scale``) get their gradients too."""
    if not torch.is_grad_enabled():
        return attn._core(qkv, bias)
    params = [attn.logit_scale] if getattr(attn, "logit_scale", None) is not None else []
    return _RecomputedAttention.apply(attn, qkv, bias, *params)


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, a tensor that autograd saves and that is ``out = fn(inp)`` (or a view of it) is kept as
    ``(inp, fn)`` and recomputed when backward unpacks it. For ``fc2(GELU(h))``: fc2 keeps ``h`` (already kept for
    GELU's own backward) instead of its 4C-wide input. Tensors other than ``out`` are saved as usual."""

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        active = torch.is_grad_enabled() and out.requires_grad
        storage = out.untyped_storage().data_ptr() if active else None
        base = out.storage_offset() if active else 0

        def pack(t: torch.Tensor):
            if storage is None or t.device != out.device or t.untyped_storage().data_ptr() != storage:
                return t
            return (inp, fn, t.size(), t.stride(), t.storage_offset() - base)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            inp_, fn_, size, stride, offset = packed
            return fn_(inp_).as_strided(size, stride, offset)

        super().__init__(pack, unpack)
