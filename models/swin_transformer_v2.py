"""Swin Transformer V2 (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", arXiv 2111.09883).

The file tells the paper's story bottom-up: window helpers -> position bias -> attention -> block -> patch merging
-> stage -> model. Parameter names and shapes equal timm's ``SwinTransformerV2`` so weights move between the two
with ``strict=True``; all buffers are derived from the geometry and are non-persistent.

The traced path uses plain view/permute rather than einops, and keeps size-dependent branches in small leaf
functions, so torch.fx, ``torch.jit.trace``, ``torch.export`` and ``torch.compile(fullgraph=True)`` all record it.
Speed and memory choices live beside: :mod:`.onednn_linear` (CPU products), :mod:`.recompute` (what backward
recomputes), :mod:`.tracing` (when caches step aside).

Letters used in shape comments:
    B batch, C channels, H W pixels, h w token grid of a stage, wh ww window, N = wh*ww tokens per window,
    nW windows per image, nH heads, d head dim.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.layers import register_notrace_function as _timm_notrace
from torch import nn

from simmim import compat
from simmim.errors import UserError

from .onednn_linear import Backend, Linear, linear
from .recompute import (
    Recompute,
    check_mode,
    recompute_attention,
    recompute_in_backward,
    recompute_saved,
    run_block,
)
from .tracing import is_symbolic_tracing, is_tracing

Pair = tuple[int, int]
NormPlacement = Literal["res_post", "pre"]
AttentionKind = Literal["cosine", "dot"]
PositionBias = Literal["log_cpb", "linear_cpb", "table"]

# the paper clamps the learned temperature at 1/0.01; a Python float (not a CPU tensor) works on any device
LOGIT_SCALE_MAX = math.log(100.0)


def to_pair(v: int | Sequence[int]) -> Pair:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v}")
    return v  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# window helpers


@_timm_notrace  # also a leaf for timm's fx feature wrappers
@torch.fx.wrap  # one opaque call under fx: it branches on sizes, which fx proxies do not have
def pad_to_multiple(x: torch.Tensor, multiple: Pair, channels_last: bool = True) -> torch.Tensor:
    """Zero-pad the spatial dims at the bottom/right up to a multiple: (B, h, w, C) or, with ``channels_last=False``,
    (B, C, H, W). Returns ``x`` itself (no copy) when nothing is missing, so the built size costs nothing."""
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    pad_h, pad_w = -h % multiple[0], -w % multiple[1]
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h) if channels_last else (0, pad_w, 0, pad_h))


def window_partition(x: torch.Tensor, window: Pair) -> torch.Tensor:
    """(B, h, w, C) -> (B*nW, N, C), windows in row-major order."""
    B, h, w, C = x.shape
    x = x.view(B, h // window[0], window[0], w // window[1], window[1], C)  # (B, nh, wh, nw, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], C)


def window_reverse(windows: torch.Tensor, window: Pair, grid: tuple[Any, Any]) -> torch.Tensor:
    """(B*nW, N, C) -> (B, h, w, C) for the token grid ``grid = (h, w)``; the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, grid[0] // window[0], grid[1] // window[1], window[0], window[1], C)  # (B, nh, nw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, grid[0], grid[1], C)


def effective_window(resolution: Pair, window: Pair, shift: bool) -> tuple[Pair, Pair]:
    """Clamp a window to the stage resolution, as the official code and timm do.

    Where a stage is not larger than the window (``resolution <= window``, note the ``<=``), the window becomes the
    whole map and that axis is not shifted. Returns ``(window, shift)``; the shift is ``window // 2`` for shifted
    blocks.
    """
    win = tuple(r if r <= w else w for r, w in zip(resolution, window, strict=True))
    shift_size = tuple(0 if (r <= w or not shift) else w // 2 for r, w in zip(resolution, win, strict=True))
    return win, shift_size  # type: ignore[return-value]


def shifted_window_mask(grid: Pair, window: Pair, shift: Pair) -> torch.Tensor | None:
    """Additive mask for shifted windows: 0 inside a region, -100 across regions. (nW, N, N) or None."""
    if not any(shift):
        return None
    region = torch.zeros(grid)
    label = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0] or None), slice(-shift[0] or None, None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1] or None), slice(-shift[1] or None, None)):
            region[hs, ws] = label
            label += 1
    regions = window_partition(region[None, :, :, None], window).squeeze(-1)  # (nW, N)
    diff = regions[:, None, :] - regions[:, :, None]  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


@functools.lru_cache(maxsize=64)
def _cached_shift_mask(grid: Pair, window: Pair, shift: Pair, device: torch.device) -> torch.Tensor:
    return shifted_window_mask(grid, window, shift).to(device)


@_timm_notrace  # also a leaf for timm's fx feature wrappers
@torch.fx.wrap  # one opaque call under fx: it branches on sizes, which fx proxies do not have
def shift_mask_for(x: torch.Tensor, built: torch.Tensor | None, built_grid: Pair, window: Pair, shift: Pair
                   ) -> torch.Tensor:
    """The shifted-window mask (nW, N, N) for the padded map ``x`` (B, h, w, C): the block's precomputed buffer at
    its built resolution, else one made for this grid and cached per (grid, window, shift, device)."""
    grid = (x.shape[1], x.shape[2])
    if built is not None and grid == tuple(built_grid):
        return built
    return _cached_shift_mask((int(grid[0]), int(grid[1])), window, shift, x.device)


def shifted_window_order(grid: Pair, window: Pair, shift: Pair) -> torch.Tensor | None:
    """Token indices (h*w,) that gather a (B, h*w, C) map into the windows of its cyclically shifted version: the
    same order as ``window_partition(torch.roll(x, -shift))``. None when there is no shift."""
    if not any(shift):
        return None
    index = torch.arange(grid[0] * grid[1]).view(1, *grid, 1)
    return window_partition(torch.roll(index, (-shift[0], -shift[1]), dims=(1, 2)), window).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# position bias


def relative_position_index(window: Pair) -> torch.Tensor:
    """Index into the (2wh-1)*(2ww-1) table of relative offsets for every token pair: (N, N) int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), offsets in [-(w-1), w-1]
    rel = rel + torch.tensor([window[0] - 1, window[1] - 1])
    return rel[..., 0] * (2 * window[1] - 1) + rel[..., 1]


def relative_coords_table(window: Pair, pretrained_window: Pair, log_spaced: bool = True) -> torch.Tensor:
    """Continuous relative coordinates fed to the CPB MLP: (1, 2wh-1, 2ww-1, 2) float32.

    Offsets are divided by ``pretrained_window - 1`` (or ``window - 1`` when no pretrained window is given) so the
    MLP sees the coordinates it was trained on after a window change. Log-CPB then scales to [-8, 8] and maps
    ``sign(x) * log2(1 + |x|) / log2(8)``; linear CPB keeps the normalised [-1, 1] offsets.
    """
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) for w in window]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]  # (1, 2wh-1, 2ww-1, 2)
    ref = [p if p > 0 else w for p, w in zip(pretrained_window, window, strict=True)]
    table = table / torch.tensor([max(r - 1, 1) for r in ref], dtype=torch.float32)  # window 1: avoid 0/0
    if not log_spaced:
        return table
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


# ----------------------------------------------------------------------------------------------------------------
# attention


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with SwinV2's scaled cosine attention and log-CPB.

    Parameters: ``qkv`` (no bias) plus ``q_bias``/``v_bias`` (k bias fixed at 0), ``logit_scale`` (nH, 1, 1) for
    cosine attention, ``cpb_mlp`` for CPB or ``relative_position_bias_table`` for the V1 table, ``proj``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Pair,
        pretrained_window: Pair = (0, 0),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attention: AttentionKind = "cosine",
        position_bias: PositionBias = "log_cpb",
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if attention not in ("cosine", "dot"):
            raise UserError(f"attention must be 'cosine' or 'dot', got {attention!r}")
        if position_bias not in ("log_cpb", "linear_cpb", "table"):
            raise UserError(f"position_bias must be 'log_cpb', 'linear_cpb' or 'table', got {position_bias!r}")
        self.dim, self.num_heads = dim, num_heads
        self.attention, self.position_bias = attention, position_bias
        self.fused = fused
        self.chunk_windows: int | None = None  # sequential self-attention: windows per chunk (None = all at once)
        self.cache_bias = True  # reuse the position bias at inference (it depends on parameters only)
        self.recompute_core = False  # recompute the attention core in backward (set_recompute('attention'))
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

        if attention == "cosine":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        if position_bias == "table":
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
        self.qkv = Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.set_window(window, pretrained_window)

    def set_window(self, window: Pair, pretrained_window: Pair) -> None:
        """Rebuild the geometry buffers for a new window; learned parameters stay as they are."""
        if self.position_bias == "table" and hasattr(self, "window") and window != self.window:
            self._resize_bias_table(window)
        self.window, self.pretrained_window = window, pretrained_window
        device = self.qkv.weight.device if self.qkv.weight.device.type != "meta" else None
        self.register_buffer("relative_position_index", relative_position_index(window).to(device), persistent=False)
        if self.position_bias != "table":
            table = relative_coords_table(window, pretrained_window, log_spaced=self.position_bias == "log_cpb")
            self.register_buffer("relative_coords_table", table.to(device), persistent=False)
        self._bias_cache = None

    def _resize_bias_table(self, window: Pair) -> None:
        """V1 baseline: bicubic resize of the parameter table to a new window (how Swin V1 transfers)."""
        old = (2 * self.window[0] - 1, 2 * self.window[1] - 1)
        table = self.relative_position_bias_table.data.T.reshape(1, self.num_heads, *old)
        table = F.interpolate(table, size=(2 * window[0] - 1, 2 * window[1] - 1), mode="bicubic", align_corners=False)
        self.relative_position_bias_table = nn.Parameter(table.reshape(self.num_heads, -1).T.contiguous())

    def _compute_bias(self) -> torch.Tensor:
        """Relative position bias added to the attention logits: (nH, N, N)."""
        N = self.window[0] * self.window[1]
        if self.position_bias == "table":
            table = self.relative_position_bias_table  # ((2wh-1)*(2ww-1), nH)
        else:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)  # ((2wh-1)*(2ww-1), nH)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (nH, N, N)
        if self.position_bias != "table":
            bias = 16 * torch.sigmoid(bias)  # bounded in (0, 16) as in the official code
        return bias.contiguous()

    def position_bias_tensor(self) -> torch.Tensor:
        """The bias, cached at inference: it depends on parameters only, so it is recomputed when any of them
        changes in place (optimizer step, EMA update, ``load_state_dict``), is swapped or moves device/dtype."""
        if (self.training or torch.is_grad_enabled() or not self.cache_bias or is_tracing()
                or not compat.VERSION_COUNTER):  # no counter: in-place updates could not be noticed
            self._bias_cache = None
            return self._compute_bias()
        params = [p for n, p in self.named_parameters() if n.startswith(("cpb_mlp", "relative_position"))]
        key = tuple((p.data_ptr(), compat.version_of(p), p.dtype, p.device) for p in params)
        key += ((self.relative_position_index.data_ptr(),),)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._compute_bias())
        return self._bias_cache[1]

    def _use_fused(self, q: torch.Tensor) -> bool:
        """None = auto: the fused kernel on GPUs (it never stores the (N, N) attention maps), the explicit path on
        CPUs, where it measured faster (docs/benchmarks.md); fx proxies carry no device, so fx graphs get the
        explicit path."""
        if self.fused is not None:
            return self.fused
        return False if is_symbolic_tracing() else q.is_cuda

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (B_, N, 3C) -> q, k, v (B_, nH, N, d), q and k normalised and scaled for the logits."""
        B_, N, _ = qkv.shape
        q, k, v = qkv.view(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B_, nH, N, d)
        if self.attention == "cosine":
            # cosine similarity with a learned per-head temperature, folded into q's normalisation (one pass over
            # q instead of two; it also keeps SDPA usable)
            scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (nH, 1, 1)
            q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
            k = F.normalize(k, dim=-1)
        else:
            q = q * q.shape[-1] ** -0.5
        return q, k, v

    def _probs(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T + bias) (B_, nH, N, N), bias (G, nH, N, N) broadcast as window i -> bias[i % G]."""
        B_, nH, N, _ = q.shape
        G = bias.shape[0]
        attn = (q @ k.transpose(-2, -1)).view(B_ // G, G, nH, N, N)  # scaled logits
        # in place where the dtypes agree (the product's backward does not need it): one buffer fewer; under bf16
        # autocast the float32 bias promotes the logits to float32 for the softmax, as before
        in_place = not is_symbolic_tracing() and attn.dtype == bias.dtype  # fx proxies carry no dtype
        attn = attn.add_(bias) if in_place else attn + bias
        drop = self.attn_drop if self.training else 0.0
        return F.dropout(attn.softmax(dim=-1), p=drop, training=self.training).view(B_, nH, N, N)

    def _core(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The attention core: qkv (B_, N, 3C), bias (G, nH, N, N) with window i using bias[i % G] (G divides B_)
        -> softmax(q k^T * temperature + bias) v as (B_, nH, N, d). Parameter-light and cheap next to the
        projections, so ``recompute='attention'`` runs it again in backward instead of keeping its maps.

        Windows are grouped as (B_/G, G*nH) "heads" so the bias broadcasts over the batch instead of being copied
        per image: the fused kernel then sees one (G*nH, N, N) float mask.
        """
        q, k, v = self._heads(qkv)  # (B_, nH, N, d)
        if self._use_fused(q):
            B_, nH, N, d = q.shape
            G = bias.shape[0]
            q, k, v = (t.reshape(B_ // G, G * nH, N, d) for t in (q, k, v))
            mask = bias.reshape(G * nH, N, N).to(q.dtype)
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)
            return out.view(B_, nH, N, d)
        return self._probs(q, k, bias) @ v  # (B_, nH, N, d)

    def _attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B_, N, C); bias (G, nH, N, N) as in :meth:`_core`. Returns (B_, N, C)."""
        B_, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = linear(x, self.qkv.weight, qkv_bias, self.qkv.backend)  # (B_, N, 3C)
        if not self.recompute_core:
            out = self._core(qkv, bias)
        elif (self.training and self.attn_drop > 0) or self._use_fused(qkv) or is_tracing():
            out = recompute_in_backward(self._core, qkv, bias)  # checkpoint: replays dropout, works compiled
        else:
            out = recompute_attention(self, qkv, bias)  # the same without rerunning probs @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))  # (B_, N, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B*nW, N, C); mask (nW, N, N) shifted-window mask or None. Returns (B*nW, N, C)."""
        bias = self.position_bias_tensor()[None]  # (1, nH, N, N)
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # (nW, nH, N, N)
        chunk = self.chunk_windows
        if not chunk:  # checked first: the windows count is a proxy under fx tracing
            return self._attend(x, bias)
        B_ = x.shape[0]
        if chunk >= B_:
            return self._attend(x, bias)
        # sequential self-attention (paper §3.6): windows in chunks, so only one chunk's logits are alive at a time
        outs = []
        for start in range(0, B_, chunk):
            stop = min(start + chunk, B_)
            chunk_bias = bias if mask is None else bias[torch.arange(start, stop, device=x.device) % bias.shape[0]]
            outs.append(self._attend(x[start:stop], chunk_bias))
        return torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------------
# block


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, named ``fc1``/``fc2`` as in timm."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)
        self.recompute_act = False  # keep fc1's output, not GELU's, for backward (set_recompute('attention'))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        h = self.fc1(x)  # (..., hidden)
        a = self.act(h)
        if not self.recompute_act or is_tracing():  # compiled graphs choose their own recomputation
            return self.drop2(self.fc2(self.drop1(a)))
        with recompute_saved(a, h, self.act):  # fc2 keeps a recipe for its input, not the input
            return self.drop2(self.fc2(self.drop1(a)))


def _residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``. Added in place into ``branch`` (a post-norm's fresh output that no backward needs) where the
    result keeps its dtype: one buffer fewer per branch, and ``x + y == y + x`` exactly. Under autocast the branch
    is bf16 and the residual stream float32: then out of place, so the sum stays float32 as in timm."""
    if not is_symbolic_tracing() and branch.dtype == torch.promote_types(branch.dtype, x.dtype):
        return branch.add_(x)
    return x + branch


class SwinTransformerV2Block(nn.Module):
    """(Shifted) window attention + MLP with res-post-norm: ``x = x + drop_path(norm(f(x)))``.

    ``norm_placement='pre'`` gives the V1 layout ``x = x + drop_path(f(norm(x)))`` for ablations. ``extra_norm``
    adds a LayerNorm on the main branch after the block (SwinV2-H/G, every 6 blocks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: Pair,
        window: Pair,
        shifted: bool,
        pretrained_window: Pair = (0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_placement: NormPlacement = "res_post",
        attention: AttentionKind = "cosine",
        position_bias: PositionBias = "log_cpb",
        extra_norm: bool = False,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        if norm_placement not in ("res_post", "pre"):
            raise UserError(f"norm_placement must be 'res_post' or 'pre', got {norm_placement!r}")
        self.norm_placement = norm_placement
        self.shifted = shifted
        win, _ = effective_window(resolution, window, shifted)
        self.attn = WindowAttention(dim, num_heads, win, pretrained_window, qkv_bias, attn_drop, proj_drop,
                                    attention, position_bias, fused_attn)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.extra_norm = nn.LayerNorm(dim) if extra_norm else None
        self.set_geometry(resolution, window, pretrained_window)

    def set_geometry(self, resolution: Pair, window: Pair, pretrained_window: Pair) -> None:
        """Clamp the window to ``resolution`` and rebuild the attention buffers and the shift mask."""
        self.resolution = resolution
        self.window, self.shift = effective_window(resolution, window, self.shifted)
        self.attn.set_window(self.window, pretrained_window)
        mask = shifted_window_mask(resolution, self.window, self.shift)
        device = self.norm1.weight.device if self.norm1.weight.device.type != "meta" else None
        self.register_buffer("attn_mask", None if mask is None else mask.to(device), persistent=False)
        order = shifted_window_order(resolution, self.window, self.shift)
        self.register_buffer("token_order", None if order is None else order.to(device), persistent=False)
        self.register_buffer("token_restore", None if order is None else order.argsort().to(device),
                             persistent=False)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C), any h, w.

        A map that the window does not tile is zero-padded at the bottom/right first and cropped after, and the
        shift mask is the one for the padded grid: the order of the official detection code and HF's Swinv2 (pad,
        then shift). At the built resolution nothing is padded and the precomputed mask is used.
        """
        h, w = x.shape[1], x.shape[2]
        if self.token_order is not None and not is_symbolic_tracing() and (h, w) == self.resolution:
            # shifted windows at the built size: one gather replaces roll + partition (and one the way back),
            # measured 2-3x faster than the copies it replaces, forward and backward
            B, C, N = x.shape[0], x.shape[3], self.window[0] * self.window[1]
            windows = x.reshape(B, h * w, C).index_select(1, self.token_order).view(-1, N, C)  # (B*nW, N, C)
            windows = self.attn(windows, self.attn_mask)  # (B*nW, N, C)
            return windows.view(B, h * w, C).index_select(1, self.token_restore).view(B, h, w, C)
        x = pad_to_multiple(x, self.window)  # (B, hp, wp, C)
        grid = (x.shape[1], x.shape[2])
        mask = None
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
            mask = shift_mask_for(x, self.attn_mask, self.resolution, self.window, self.shift)  # (nW, N, N)
        windows = self.attn(window_partition(x, self.window), mask)  # (B*nW, N, C)
        x = window_reverse(windows, self.window, grid)  # (B, hp, wp, C)
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x[:, :h, :w].contiguous()  # a no-op view when nothing was padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C)."""
        if self.norm_placement == "res_post":
            x = _residual(x, self.drop_path1(self.norm1(self._window_attention(x))))
            x = _residual(x, self.drop_path2(self.norm2(self.mlp(x))))
        else:
            x = x + self.drop_path1(self._window_attention(self.norm1(x)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if self.extra_norm is not None:
            x = self.extra_norm(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# patch merging and stage


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbours concatenated -> Linear(4C -> 2C, no bias) -> LayerNorm(2C).

    The concat order is x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (official weights rely on it),
    and the norm comes after the reduction (V1 normed first).
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.reduction = Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, ceil(h/2), ceil(w/2), 2C); an odd side is zero-padded first, as timm and HF do."""
        x = pad_to_multiple(x, (2, 2))
        B, h, w, C = x.shape
        x = x.view(B, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # (B, h/2, w/2, sw, sh, C): sh fastest
        return self.norm(self.reduction(x.flatten(3)))  # concat order (0,0),(1,0),(0,1),(1,1)


class SwinTransformerV2Stage(nn.Module):
    """Optional patch merging (timm's layout: the stage starts with the merge), then ``depth`` blocks alternating
    regular and shifted windows."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        resolution: Pair,
        depth: int,
        num_heads: int,
        window: Pair,
        pretrained_window: Pair = (0, 0),
        downsample: bool = False,
        drop_path: Sequence[float] = (),
        extra_norm_period: int = 0,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.recompute: Recompute = "none"  # models/recompute.py; set through SwinTransformerV2.set_recompute
        self.blocks = nn.ModuleList([
            SwinTransformerV2Block(
                out_dim, num_heads, resolution, window, shifted=i % 2 == 1, pretrained_window=pretrained_window,
                drop_path=drop_path[i] if drop_path else 0.0,
                extra_norm=extra_norm_period > 0 and (i + 1) % extra_norm_period == 0, **block_kwargs)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h_in, w_in, C_in) -> (B, h, w, C)."""
        x = self.downsample(x)
        for blk in self.blocks:
            x = run_block(blk, x, self.recompute)
        return x

    def set_recompute(self, mode: Recompute) -> None:
        """See :meth:`SwinTransformerV2.set_recompute`."""
        check_mode(mode)
        self.recompute = mode
        for blk in self.blocks:
            blk.attn.recompute_core = blk.mlp.recompute_act = mode == "attention"

    @property
    def grad_checkpointing(self) -> bool:
        """timm's per-stage switch: True is ``recompute='full'``."""
        return self.recompute == "full"

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.set_recompute("full" if enable else "none")


class PatchEmbed(nn.Module):
    """Conv patch x patch, stride patch, then LayerNorm: (B, C_in, H, W) -> (B, h, w, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/patch), ceil(W/patch), C); a partial patch is zero-padded (bottom/right)."""
        x = pad_to_multiple(x, (self.patch_size, self.patch_size), channels_last=False)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, h, w, C)


# ----------------------------------------------------------------------------------------------------------------
# model


def stage_geometry(
    img_size: Pair, patch_size: int, num_stages: int, window: Pair
) -> list[tuple[Pair, Pair]]:
    """Per-stage ``(token resolution, effective window)``; raises a ValueError that names the fix when the image
    cannot be tiled (not a multiple of the patch size, of the total downsampling, or of a stage's window)."""
    for side in img_size:
        if side % patch_size:
            raise UserError(f"img_size {side} is not a multiple of patch_size {patch_size}; "
                             f"use a multiple of {patch_size} (e.g. {side - side % patch_size or patch_size})")
    grid = (img_size[0] // patch_size, img_size[1] // patch_size)
    stride = patch_size * 2 ** (num_stages - 1)
    if grid[0] % 2 ** (num_stages - 1) or grid[1] % 2 ** (num_stages - 1):
        shown = img_size[0] if img_size[0] == img_size[1] else f"{img_size[0]}x{img_size[1]}"
        raise UserError(f"img_size {shown} is not a multiple of {stride} (patch_size {patch_size} x "
                         f"2^{num_stages - 1} patch merges); use e.g. {max(stride, img_size[0] // stride * stride)}")
    out = []
    for i in range(num_stages):
        res = (grid[0] // 2 ** i, grid[1] // 2 ** i)
        win, _ = effective_window(res, window, shift=False)
        if res[0] % win[0] or res[1] % win[1]:
            raise UserError(
                f"stage {i} token grid {res[0]}x{res[1]} (img_size {img_size[0]}x{img_size[1]}) is not a multiple "
                f"of window_size {win[0]}x{win[1]}; choose window_size so that img_size / {patch_size * 2 ** i} "
                f"is a multiple of it (e.g. img_size 192 with window 12, 224 with 14, 256 with 8 or 16)")
        out.append((res, win))
    return out


def check_mask(mask_token: torch.Tensor | None, mask: torch.Tensor, tokens: torch.Tensor) -> None:
    """A masked forward needs SimMIM's ``mask_token`` and a (B, h, w) mask on the token grid of ``tokens``
    (B, h, w, C); a bug otherwise (ValueError)."""
    if mask_token is None:
        raise ValueError("a mask was given but the encoder has no mask_token; call init_mask_token() "
                         "(SimMIM does this) before masked forwards")
    if mask.shape != tokens.shape[:3]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, h, w) = {tuple(tokens.shape[:3])}")


_LAYER_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_LAYER_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id for layer-wise lr decay of a Swin (V1 or V2) parameter in timm's layout, as the official SimMIM
    fine-tuning code numbers them (``get_swin_layer``): patch embedding / mask token 0; global block k -> k + 1; a
    stage's downsample (timm: at the start of stage i) shares the id of the last block of stage i - 1; the final
    norm and head ``sum(depths) + 1``."""
    name = name.removeprefix("encoder.")
    if name.startswith(("patch_embed.", "mask_token")):
        return 0
    if m := _LAYER_BLOCK.match(name):
        return sum(depths[: int(m[1])]) + int(m[2]) + 1
    if m := _LAYER_DOWNSAMPLE.match(name):
        return sum(depths[: int(m[1])])
    return sum(depths) + 1


def trained_windows(pretrained: Sequence[Sequence[int]], effective: Sequence[Sequence[int]]) -> list[Pair]:
    """The windows a model's log-CPB MLP was trained at, per stage: its pretrained window where set (> 0), else the
    window it runs at (192 px / W12 pretraining -> 12/12/12/6). Fine-tuning and ``set_input_size`` normalise the
    coordinates by these, so a window change keeps the MLP's inputs in the range it learned."""
    return [to_pair(p) if p[0] > 0 else to_pair(e) for p, e in zip(pretrained, effective, strict=True)]


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 image encoder / classifier, with timm's model API.

    Input (B, in_chans, H, W), any H, W: the model is built for ``img_size`` (which fixes each stage's window and
    shift), and other sizes are zero-padded to the patch size and to each stage's window, as timm's
    ``strict_img_size=False`` and HF's Swinv2 do; at the built size nothing is padded. ``forward`` returns logits
    (B, num_classes), or pooled features (B, num_features) when ``num_classes=0``. Feature maps are channels-last
    (B, h, w, C) inside (``output_fmt = 'NHWC'``); :meth:`forward_intermediates` gives per-stage maps for dense tasks.

    Defaults are SwinV2 (res-post-norm, scaled cosine attention, log-CPB); ``norm_placement``, ``attention`` and
    ``position_bias`` switch to the V1 choices for the paper's ablations. ``pretrained_window_sizes`` (one per stage,
    0 = none) is the window each stage's CPB MLP was trained at; coordinates are normalised by it.
    """

    output_fmt = "NHWC"  # of forward_features and the stage outputs

    def __init__(
        self,
        img_size: int | Sequence[int] = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 12,
        pretrained_window_sizes: Sequence[int | Sequence[int]] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_placement: NormPlacement = "res_post",
        attention: AttentionKind = "cosine",
        position_bias: PositionBias = "log_cpb",
        extra_norm_period: int = 0,
        fused_attn: bool | None = None,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        from timm.layers import ClassifierHead  # the head's keys (head.fc.*) match timm's

        if len(depths) != len(num_heads):
            raise UserError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        num_stages = len(depths)
        self.img_size, self.window_size, self.patch_size = to_pair(img_size), to_pair(window_size), patch_size
        pretrained = [to_pair(p) for p in (pretrained_window_sizes or [0] * num_stages)]
        if len(pretrained) != num_stages:
            raise UserError(f"pretrained_window_sizes needs one entry per stage ({num_stages}), got {len(pretrained)}")
        self.pretrained_window_sizes: list[Pair] = pretrained
        geometry = stage_geometry(self.img_size, patch_size, num_stages, self.window_size)
        self.num_classes, self.in_chans, self.norm_placement = num_classes, in_chans, norm_placement
        self.global_pool = global_pool
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = dims[-1]
        self.encoder_stride = patch_size * 2 ** (num_stages - 1)  # pixels per token of the last stage

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.register_parameter("mask_token", None)  # SimMIM adds it (init_mask_token); absent in a plain encoder
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # rises linearly per block
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                            attn_drop=attn_drop_rate, norm_placement=norm_placement, attention=attention,
                            position_bias=position_bias, fused_attn=fused_attn)
        self.layers = nn.Sequential(*[
            SwinTransformerV2Stage(
                dims[max(i - 1, 0)], dims[i], geometry[i][0], depths[i], num_heads[i], self.window_size,
                pretrained[i], downsample=i > 0, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                extra_norm_period=extra_norm_period, **block_kwargs)
            for i in range(num_stages)
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f"layers.{i}")
                             for i in range(num_stages)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)
        if norm_placement == "res_post":  # every block starts as the identity
            for blk in self.blocks():
                for norm in (blk.norm1, blk.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)
        # timm's builder replaces this with the registry entry's config (models/timm_registry.py)
        self.pretrained_cfg = self.default_cfg = self._describe()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _describe(self) -> dict[str, Any]:
        """A timm ``pretrained_cfg`` for this model as built (no weights to download)."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        h, w = self.img_size
        return dict(url="", num_classes=self.num_classes, input_size=(self.in_chans, h, w),
                    pool_size=(h // self.encoder_stride, w // self.encoder_stride), crop_pct=0.9,
                    interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head.fc", license="mit")

    # -- geometry --------------------------------------------------------------------------------------------

    def blocks(self) -> list[SwinTransformerV2Block]:
        """All blocks in order (global block index = list index)."""
        return [blk for stage in self.layers for blk in stage.blocks]

    @property
    def grid_size(self) -> Pair:
        """Token grid after the patch embedding (h, w) at the built size."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def effective_window_sizes(self) -> list[Pair]:
        """The window each stage really uses after clamping to its resolution, e.g. 12/12/12/6 at 192 px, W12."""
        return [stage.blocks[0].window if len(stage.blocks) else (0, 0) for stage in self.layers]

    @property
    def trained_window_sizes(self) -> list[Pair]:
        """The windows each stage's log-CPB MLP was trained at (see :func:`trained_windows`)."""
        return trained_windows(self.pretrained_window_sizes, self.effective_window_sizes)

    def set_input_size(
        self,
        img_size: int | Sequence[int] | None = None,
        window_size: int | Sequence[int] | None = None,
        pretrained_window_sizes: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        """Change image size and/or window size in place: buffers are rebuilt, parameters are untouched (except the
        V1 ``table`` position bias, which is bicubically resized as Swin V1 does).

        ``pretrained_window_sizes`` defaults to the windows the CPB MLP was trained at: the model's current
        ``pretrained_window_sizes`` where set, else each stage's current effective window. So a model pretrained at
        192/W12 and moved to 256/W16 normalises its log-CPB coordinates by 12/12/12/6, as the paper transfers.
        """
        img = to_pair(img_size) if img_size is not None else self.img_size
        win = to_pair(window_size) if window_size is not None else self.window_size
        if pretrained_window_sizes is None:
            pretrained = self.trained_window_sizes
        else:
            pretrained = [to_pair(p) for p in pretrained_window_sizes]
            if len(pretrained) != len(self.layers):
                raise UserError(f"pretrained_window_sizes needs {len(self.layers)} entries, got {len(pretrained)}")
        geometry = stage_geometry(img, self.patch_size, len(self.layers), win)  # validates before changing anything
        self.img_size, self.window_size, self.pretrained_window_sizes = img, win, pretrained
        for stage, (res, _), pre in zip(self.layers, geometry, pretrained, strict=True):
            for blk in stage.blocks:
                blk.set_geometry(res, win, pre)
        compat.record_input_size(self, img, win)  # timm keeps it apart from the source's pretrained_cfg

    def init_non_persistent_buffers(self) -> None:
        """Recompute every derived buffer (after ``to_empty`` from the meta device, for example)."""
        for stage, (res, _) in zip(self.layers, stage_geometry(self.img_size, self.patch_size, len(self.layers),
                                                               self.window_size), strict=True):
            for blk in stage.blocks:
                blk.set_geometry(res, self.window_size, blk.attn.pretrained_window)
                if blk.attn.k_bias is not None:
                    blk.attn.k_bias.zero_()

    # -- memory / speed switches -----------------------------------------------------------------------------

    def set_recompute(self, mode: Recompute = "none") -> None:
        """What the blocks keep for backward (models/recompute.py): ``'none'`` everything; ``'attention'`` not the
        attention maps nor the GELU output (the attention core and GELU run again in backward: about half the
        activation memory for a few percent of step time); ``'full'`` only each block's input (activation
        checkpointing: the whole block runs again). Outputs and gradients are the same in every mode."""
        check_mode(mode)
        for stage in self.layers:
            stage.set_recompute(mode)

    @property
    def recompute(self) -> str:
        return self.layers[0].recompute if len(self.layers) else "none"

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: activation checkpointing per block, i.e. ``set_recompute('full')`` (False: ``'none'``)."""
        self.set_recompute("full" if enable else "none")

    def set_sequential_attention(self, chunk_windows: int | None) -> None:
        """Sequential self-attention: compute attention over at most ``chunk_windows`` windows at a time (None =
        all windows in one batch). Caps the peak memory of the attention logits; outputs are unchanged."""
        if chunk_windows is not None and chunk_windows < 1:
            raise ValueError(f"chunk_windows must be a positive int or None, got {chunk_windows}")
        for blk in self.blocks():
            blk.attn.chunk_windows = chunk_windows

    def set_fused_attn(self, enable: bool | None = True) -> None:
        """Use ``F.scaled_dot_product_attention`` (True), the explicit softmax(QK^T + B)V path (False), or pick
        per device (None, the default: fused on CUDA, explicit on CPU)."""
        for blk in self.blocks():
            blk.attn.fused = enable

    def set_linear_backend(self, backend: Backend = "auto") -> None:
        """Where the blocks' Linear layers compute (config ``model.linear_backend``): ``'auto'`` (oneDNN for float32
        on CPU outside autocast and tracing where its op passed its check, ``F.linear`` otherwise; see
        :mod:`.onednn_linear`) or ``'aten'`` (always ``F.linear``)."""
        if backend not in ("auto", "aten"):
            raise UserError(f"linear backend must be 'auto' or 'aten', got {backend!r} (model.linear_backend)")
        for m in self.modules():
            if isinstance(m, Linear):
                m.backend = backend

    # -- timm's model API ------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay beyond biases/1-D (the CPB MLP, temperatures, tables)."""
        keys = ("cpb_mlp", "logit_scale", "relative_position_bias_table", "q_bias", "v_bias", "mask_token")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @property
    def num_layer_ids(self) -> int:
        """Layer ids for layer-wise lr decay: the embeddings, one per block, the final norm and head."""
        return sum(self.depths) + 2

    def layer_id(self, param_name: str) -> int:
        """The layer-wise lr decay id of ``param_name`` (see :func:`swin_layer_id`)."""
        return swin_layer_id(param_name, self.depths)

    def geometry(self) -> dict[str, Any]:
        """JSON-able facts of the encoder contract (family, size, window, strides, channels)."""
        return {"family": "swinv2", "variant": self.pretrained_cfg.get("architecture", "").removeprefix("simmim_"),
                "img_size": list(self.img_size), "window_size": list(self.window_size),
                "patch_size": self.patch_size, "encoder_stride": self.encoder_stride,
                "num_features": self.num_features, "in_chans": self.in_chans}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise tools: the stem (patch embedding, mask token), then one group per
        stage (``coarse``) or per block, a stage's patch merging going with its first block, the final norm last."""
        return dict(
            stem=r"^patch_embed|^mask_token",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one (0 = pooled features); ``global_pool='avg'`` pools,
        ``''`` returns the unpooled (B, h, w, C) map."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool
        if num_classes > 0:
            self._init_weights(self.head.fc)

    # -- forward ---------------------------------------------------------------------------------------------

    def init_mask_token(self) -> None:
        """Add SimMIM's learned ``mask_token`` (1, 1, C), trunc_normal(.02)."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=self.norm.weight.device))
        trunc_normal_(self.mask_token, std=0.02)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, h, w, C); masked tokens (mask (B, h, w), 1 = masked) become ``mask_token``
        after the patch-embedding norm (SimMIM)."""
        x = self.patch_embed(x)  # (B, h, w, C)
        if mask is not None:
            check_mask(self.mask_token, mask, x)
            x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)  # (B, h, w, C)
        return x

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_chans, H, W) -> final normed map (B, ceil(H/stride), ceil(W/stride), num_features), channels-last.
        ``mask`` (B, h, w) on the patch grid (SimMIM) replaces masked tokens by ``mask_token``."""
        return self.norm(self.layers(self._embed(x, mask)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage feature maps for dense tasks, with timm's semantics.

        ``indices``: None = every stage, an int n = the last n stages, a sequence = those stages (negative from the
        end). ``norm`` applies the final norm to the last stage's map (the only one it is sized for). ``stop_early``
        skips the stages after the last one taken. Returns ``(final, intermediates)``, ``final`` as
        :meth:`forward_features` gives it (B, h, w, C) (unnormed when stopped early), and ``intermediates`` one
        (B, C_i, h_i, w_i) map per index (``output_fmt='NHWC'``: (B, h_i, w_i, C_i)); or only the list with
        ``intermediates_only``. Any input size: maps are ceil(H / reduction) x ceil(W / reduction).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = compat.feature_take_indices(len(self.layers), indices)
        stages = self.layers if not stop_early or torch.jit.is_scripting() else self.layers[:max_index + 1]
        last = len(self.layers) - 1
        intermediates = []
        x = self._embed(x, None)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)  # the final norm is sized for the last stage only
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm / head as timm does); returns the
        absolute indices kept, for :meth:`forward_intermediates`."""
        take, max_index = compat.feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[:max_index + 1]
        self.pretrained_window_sizes = self.pretrained_window_sizes[:max_index + 1]
        if prune_end:  # features now end at the last stage kept; the head was sized for the final one
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.encoder_stride = self.feature_info[max_index]["reduction"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> logits (B, num_classes) or pooled (B, C) when ``pre_logits``/``num_classes=0``."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_classes), or (B, num_features) for ``num_classes=0``."""
        return self.forward_head(self.forward_features(x))
