"""SimMIM's ViT-B/16 encoder (Xie et al., "SimMIM", arXiv 2111.09886, §4.1 and the official ``vision_transformer.py``),
built on timm's BEiT model, from which the official ViT derives.

The official recipe: 224 px, patch 16 (a 14 x 14 token grid), no absolute position embedding, ONE relative position
bias shared by all blocks during pretraining, layer scale 0.1, drop path 0.1, LayerNorm eps 1e-6, q/v biases.
Fine-tuning switches to a relative position bias per block (each starting as a copy of the pretrained shared one)
and to mean pooling with a norm after the pool (``fc_norm``); layer decay 0.65. Hence two variants:
``vit_base_patch16`` (pretraining) and ``vit_base_patch16_ft`` (fine-tuning); :func:`convert_official_vit` turns
either checkpoint into either encoder's keys (shared -> per-block copy, bias tables resized to its grid).

The official state-dict keys equal timm's ``Beit`` keys (``blocks.i.gamma_1``, ``attn.q_bias``,
``rel_pos_bias.relative_position_bias_table`` ...); the official code also saves the ``relative_position_index``
buffers, which are dropped and rebuilt. A relative position table covers offsets (2h-1) x (2w-1) on the token grid
plus 3 entries (cls->token, token->cls, cls->cls); for a new grid it is resized as BEiT/SimMIM's ``utils.py`` does:
bicubic spline through the old entries placed on geometrically spaced offsets (:func:`resize_rel_pos_table`).

Letters: B batch, C channels, H W pixels, h w token grid (H / 16), L = h * w tokens, nH heads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torch.utils.checkpoint import checkpoint

from simmim.errors import UserError

log = logging.getLogger(__name__)

CLS_ENTRIES = ("cls->token", "token->cls", "cls->cls")  # the table rows after the grid offsets, in order
_EXTRA = len(CLS_ENTRIES)
_TABLE = "relative_position_bias_table"
_SHARED = f"rel_pos_bias.{_TABLE}"
_BLOCK_TABLE = re.compile(rf"^blocks\.(\d+)\.attn\.{_TABLE}$")


def _trunc(t: torch.Tensor, std: float = 0.02) -> None:
    """The official SimMIM ViT's init: normal(0, std) truncated at +-std (it overrides BEiT's +-2)."""
    trunc_normal_(t, std=std, a=-std, b=std)


def _check_size(img_size: int | tuple[int, int], patch_size: int | tuple[int, int]) -> None:
    """Whole patches only: a ViT would silently drop the last pixels of a size that is not a multiple."""
    img, patch = to_2tuple(img_size), to_2tuple(patch_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        size = img[0] if img[0] == img[1] else list(img)
        fix = [max(patch[i], round(img[i] / patch[i]) * patch[i]) for i in (0, 1)]
        raise UserError(f"image size {size} is not a multiple of the ViT patch size {patch[0]} (model.img_size); "
                        f"use e.g. {fix[0] if fix[0] == fix[1] else fix}")


class SimMIMViT(Beit):
    """timm's ``Beit`` with SimMIM's mask token and the encoder contract (``forward_features`` -> channels-last grid).

    ``forward_features(x (B, C, H, W), mask (B, h, w) | None) -> (B, h, w, C)``: patch tokens after the final norm,
    the CLS token dropped. ``forward(x) -> (B, num_classes)`` (mean of the patch tokens, ``fc_norm``, head), or the
    pooled (B, C) with ``num_classes=0``.
    """

    def __init__(self, variant: str | None = None, global_pool: str = "avg", **kwargs: Any) -> None:
        if global_pool != "avg":  # forward_features drops the CLS token, so only mean pooling is available
            raise UserError(f"global_pool={global_pool!r}: the SimMIM ViT pools the mean of its patch tokens "
                            "(global_pool='avg')")
        _check_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 16))
        super().__init__(global_pool=global_pool, **kwargs)
        self.variant = variant
        self.register_parameter("mask_token", None)  # SimMIM adds it (init_mask_token)
        h, w = self.img_size  # a timm pretrained_cfg for the model as built (timm's data config reads it)
        self.pretrained_cfg = self.default_cfg = dict(
            url="", num_classes=self.num_classes, input_size=(self.in_chans, h, w), pool_size=None, crop_pct=0.875,
            interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
            first_conv="patch_embed.proj", classifier="head", license="mit")

    # -- init as the official SimMIM ViT -----------------------------------------------------------------------

    def init_weights(self, needs_reset: bool = True) -> None:
        """Linear and conv weights, CLS token and position embedding ~ N(0, .02) truncated at +-.02, biases 0, norms
        1/0, then the per-block rescale of ``attn.proj`` and ``mlp.fc2`` and the 0.001 head scale (BEiT's)."""
        super().init_weights(needs_reset=needs_reset)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token):
            if p is not None:
                _trunc(p)
        self.fix_init_weight()
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def init_mask_token(self) -> None:
        """Add SimMIM's learned ``mask_token`` (1, 1, C) ~ N(0, .02) truncated at +-.02, as the official ViT does."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=self.cls_token.device))
        _trunc(self.mask_token)

    # -- the encoder contract: sizes -------------------------------------------------------------------------

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.img_size)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def encoder_stride(self) -> int:
        """Pixels per token of ``forward_features``: the patch size (no downsampling in a ViT)."""
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def geometry(self) -> dict[str, Any]:
        """JSON-able facts for checkpoint and export headers."""
        return dict(family="vit", variant=self.variant, img_size=list(self.img_size), window_size=None,
                    patch_size=self.patch_size, encoder_stride=self.encoder_stride,
                    num_features=self.num_features, in_chans=self.in_chans)

    def timm_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)`` for ``timm.create_model`` building this architecture in plain timm (exports): timm's
        ``beit_base_patch16_224`` (the fine-tuning variant's architecture), with the sizes of this model and, where
        they differ from it, its width, depth and heads, and the pretraining variant's shared bias and token norm."""
        h, w = self.img_size
        spec: dict[str, Any] = {"img_size": h if h == w else [h, w], "num_classes": self.num_classes,
                                "in_chans": self.in_chans}
        shape = dict(embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=self.blocks[0].attn.num_heads,
                     patch_size=self.patch_size)
        spec.update({k: v for k, v in shape.items() if v != _BASE[k]})
        if self.rel_pos_bias is not None:  # the pretraining variant: one shared bias, norm on the tokens
            spec.update(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_fc_norm=False)
        return "beit_base_patch16_224", spec

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, window_size: int | None = None,
                       **_: Any) -> None:
        """Run at another image size: the token grid, the position index buffers and the relative position tables
        (resized with :func:`resize_rel_pos_table`, as the official fine-tuning code does) follow it.
        ``window_size`` has no meaning for a ViT and is ignored."""
        if img_size is None:
            return
        _check_size(img_size, self.patch_size)
        old = self.grid_size
        tables = {n: p.detach().clone() for n, p in self.named_parameters() if n.endswith(_TABLE)}
        super().set_input_size(img_size=to_2tuple(img_size))  # timm rebuilds grid, index buffers, table shapes
        new = self.grid_size
        if new != old:
            with torch.no_grad():
                for name, param in self.named_parameters():
                    if name in tables:  # timm resizes linearly; the official resize is the cubic one
                        param.copy_(resize_rel_pos_table(tables[name], old, new))

    # -- optimisation ----------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official SimMIM ViT's set: the CLS token and the absolute position embedding where present (its mask
        token and relative position tables do take weight decay; 1-D params and biases never do)."""
        return {"cls_token"} | ({"pos_embed"} if self.pos_embed is not None else set())

    @property
    def num_layer_ids(self) -> int:
        """Patch embedding and tokens, one id per block, then the rest: depth + 2."""
        return len(self.blocks) + 2

    def layer_id(self, param_name: str) -> int:
        """Layer-wise lr decay id of the official ``get_vit_layer`` (SimMIM optimizer.py, as BEiT): CLS/mask tokens,
        position embedding and patch embedding 0; ``blocks.i`` i + 1; everything else num_layer_ids - 1, the
        shared relative position bias (``rel_pos_bias.*``) included, as the official function places it."""
        name = param_name.removeprefix("encoder.")
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return self.num_layer_ids - 1

    # -- forward ---------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, h, w, C) patch tokens after the final norm. ``mask`` (B, h, w), True = masked: those
        tokens become ``mask_token`` right after the patch embedding, before the CLS token and position terms."""
        x = self.patch_embed(x)  # (B, L, C)
        B, L, C = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the encoder has no mask_token; call init_mask_token() "
                                 "(SimMIM does this) before masked forwards")
            if tuple(mask.shape) != (B, *self.grid_size):
                raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, h, w) = {(B, *self.grid_size)}")
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)  # (B, 1 + L, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (nH, 1 + L, 1 + L)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, shared_rel_pos_bias=shared, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=shared)
        x = self.norm(x)
        return x[:, 1:].reshape(B, *self.grid_size, C)  # (B, h, w, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> logits (B, num_classes), or the pooled (B, C) with ``pre_logits``/``num_classes=0``:
        mean over the patch tokens, then ``fc_norm`` (the fine-tuning recipe; identity in pretraining)."""
        x = self.fc_norm(x.mean(dim=(1, 2)))  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes), or (B, num_features) for ``num_classes=0``."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise UserError(f"global_pool={global_pool!r}: the SimMIM ViT pools the mean of its patch tokens "
                            "(global_pool='avg')")
        super().reset_classifier(num_classes)


# --------------------------------------------------------------------------------------------------------------
# variants

_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, init_values=0.1,
             drop_path_rate=0.1, use_abs_pos_emb=False)
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    # SimMIM pretraining (configs/vit_base__800ep/simmim_pretrain): one shared bias, token-wise final norm
    "vit_base_patch16": dict(_BASE, img_size=224, use_shared_rel_pos_bias=True, use_rel_pos_bias=False,
                             use_fc_norm=False),
    # SimMIM fine-tuning (simmim_finetune): a bias per block, mean pooling with a norm after the pool
    "vit_base_patch16_ft": dict(_BASE, img_size=224, use_shared_rel_pos_bias=False, use_rel_pos_bias=True,
                                use_fc_norm=True),
}
# the same pair at test/CPU size: 64 px (a 4 x 4 grid), embed 32, 3 blocks, 2 heads
_PICO = dict(embed_dim=32, depth=3, num_heads=2, img_size=64, drop_path_rate=0.0)
VIT_VARIANTS.update({f"vit_pico{end}": dict(VIT_VARIANTS[f"vit_base_patch16{end}"], **_PICO) for end in ("", "_ft")})
_IGNORED = ("window_size", "pretrained_window_sizes")  # Swin geometry, meaningless for a ViT


def create_vit(name: str, **overrides: Any) -> SimMIMViT:
    """Build a ViT variant; keyword overrides (img_size, drop_path_rate, num_classes, in_chans, embed_dim, depth,
    num_heads, ...) replace the variant's defaults; ``window_size``/``pretrained_window_sizes`` are ignored.

    Example: ``create_vit("vit_base_patch16", num_classes=0)`` -> the SimMIM pretraining encoder at 224 px.
    """
    if name not in VIT_VARIANTS:
        raise UserError(f"unknown ViT variant {name!r}; choose one of: {', '.join(VIT_VARIANTS)}")
    kwargs = {**VIT_VARIANTS[name], **{k: v for k, v in overrides.items() if k not in _IGNORED}}
    return SimMIMViT(variant=name, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# weights: official SimMIM / BEiT layout -> ours


def is_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a SimMIM ViT state dict: official pretrained (``encoder.*`` + ``decoder.0.*``), official fine-tuned
    (bare keys, ``head.*``), ours, or timm/BEiT's Beit (same layout): a CLS token, ``blocks.0.attn.qkv.weight``
    without a fused qkv bias, and BEiT's q/v biases, layer scale ``gamma_1`` or a relative position table."""
    keys = {k.removeprefix("module.").removeprefix("encoder.") for k in state_dict}
    if "cls_token" not in keys or "blocks.0.attn.qkv.weight" not in keys or "blocks.0.attn.qkv.bias" in keys:
        return False
    return bool(keys & {"blocks.0.attn.q_bias", "blocks.0.gamma_1", _SHARED, f"blocks.0.attn.{_TABLE}"})


def vit_variant_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The variant whose architecture a bare ViT state dict (our/timm keys) has, from its shapes: width and patch of
    the stem, blocks, heads of the relative position tables, and a shared bias (pretraining) or one per block
    (fine-tuning); None when none matches (e.g. a custom depth)."""
    stem = state_dict.get("patch_embed.proj.weight")
    tables = [v for k, v in state_dict.items() if k == _SHARED or _BLOCK_TABLE.match(k)]
    if stem is None or not tables:
        return None
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    shared = _SHARED in state_dict
    found = (stem.shape[0], stem.shape[-1], depth, tables[0].shape[1], shared)
    return next((name for name, v in VIT_VARIANTS.items()
                 if (v["embed_dim"], v["patch_size"], v["depth"], v["num_heads"], v["use_shared_rel_pos_bias"])
                 == found), None)


def _geometric_offsets(src: int, dst: int) -> torch.Tensor:
    """Where BEiT/SimMIM place the ``src`` old offsets (src odd, centred on 0) when resizing to ``dst`` offsets:
    0, then steps 1, q, q^2, ... outwards, q chosen by bisection so the outermost lands near dst // 2."""
    half = src // 2

    def reach(q: float) -> float:  # 1 + q + ... + q^(half-1)
        return (1 - q**half) / (1 - q)

    lo, hi, q = 1.01, 1.5, 1.01
    while hi - lo > 1e-6:  # q is the last midpoint tried, as the official code leaves it
        q = (lo + hi) / 2
        lo, hi = (lo, q) if reach(q) > dst // 2 else (q, hi)
    steps = torch.tensor([q**i for i in range(half)], dtype=torch.float64)
    right = torch.cumsum(steps, 0)  # 1, 1 + q, 1 + q + q^2, ...
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def resize_rel_pos_table(table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a BEiT relative position table ((2h-1)(2w-1) + 3, nH) from token grid ``src_grid`` to ``dst_grid``
    as the official SimMIM ``utils.py`` does: per head, a bicubic spline (SciPy's ``RectBivariateSpline``, s=0: what
    the official ``interp2d(kind='cubic')`` computes) through the old offsets placed geometrically
    (:func:`_geometric_offsets`), read at the new integer offsets; the 3 CLS entries are kept."""
    src = (2 * src_grid[0] - 1, 2 * src_grid[1] - 1)
    dst = (2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1)
    if table.shape[0] != src[0] * src[1] + _EXTRA:
        raise ValueError(f"table of {table.shape[0]} rows is not the one of a {src_grid} grid")
    if src == dst:
        return table
    num_heads = table.shape[1]
    if table.is_meta:
        return table.new_empty(dst[0] * dst[1] + _EXTRA, num_heads)
    from scipy.interpolate import RectBivariateSpline

    ys, xs = _geometric_offsets(src[0], dst[0]), _geometric_offsets(src[1], dst[1])
    ty = torch.arange(-(dst[0] // 2), dst[0] // 2 + 1, dtype=torch.float64)
    tx = torch.arange(-(dst[1] // 2), dst[1] // 2 + 1, dtype=torch.float64)
    grid = table[:-_EXTRA].detach().double().cpu().reshape(*src, num_heads)  # (2h-1, 2w-1, nH)
    heads = []
    for i in range(num_heads):
        spline = RectBivariateSpline(ys.numpy(), xs.numpy(), grid[..., i].numpy(),
                                     kx=min(3, src[0] - 1), ky=min(3, src[1] - 1), s=0)
        heads.append(torch.from_numpy(spline(ty.numpy(), tx.numpy())).reshape(-1))  # (dst_h * dst_w,)
    body = torch.stack(heads, dim=1).to(table.dtype).to(table.device)  # (dst_h * dst_w, nH)
    return torch.cat([body, table[-_EXTRA:].detach()], dim=0)


def square_grid(rows: int) -> tuple[int, int]:
    """The token grid of a table with ``rows`` rows, square as the released checkpoints (the official code assumes
    it too)."""
    side = round((rows - _EXTRA) ** 0.5)
    if side * side != rows - _EXTRA or side % 2 == 0:
        raise UserError(f"a relative position table of {rows} rows is not one of a square token grid "
                        f"((2h-1)^2 + 3 rows); the checkpoint is not a SimMIM/BEiT ViT")
    return (side + 1) // 2, (side + 1) // 2


def convert_official_vit(state_dict: Mapping[str, torch.Tensor], encoder: SimMIMViT) -> dict[str, torch.Tensor]:
    """Official SimMIM ViT keys (pretrained or fine-tuned; BEiT's and ours are the same) -> ``encoder``'s: index
    buffers dropped; a shared relative position bias copied into every block's own table when ``encoder`` has
    per-block tables (the official fine-tuning load); every table resized to ``encoder``'s token grid; an absolute
    position embedding resampled (timm); a pretrained final ``norm`` replaced by ``encoder``'s fresh ``fc_norm``
    when it pools with one (the official load leaves ``fc_norm`` at its init). A SimMIM ``encoder.`` prefix and
    the decoder are kept, so a SimMIM model loads the result directly."""
    prefix = "encoder." if any(k.startswith("encoder.") for k in state_dict) else ""
    enc = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    enc = {k: v for k, v in enc.items() if not k.endswith("relative_position_index")}
    per_block = encoder.blocks[0].attn.relative_position_bias_table is not None
    has_block_tables = any(_BLOCK_TABLE.match(k) for k in enc)
    if per_block and _SHARED in enc and not has_block_tables:
        shared = enc.pop(_SHARED)
        for i in range(len(encoder.blocks)):
            enc[f"blocks.{i}.attn.{_TABLE}"] = shared.clone()
    elif not per_block and has_block_tables:
        raise UserError("the checkpoint has a relative position bias per block (a fine-tuned ViT) but the encoder "
                        "shares one bias; build it as vit_base_patch16_ft (model.name=vit_base_patch16_ft)")
    grid = encoder.grid_size
    for k, v in enc.items():
        if k.endswith(_TABLE):
            enc[k] = resize_rel_pos_table(v, square_grid(v.shape[0]), grid)
    if "pos_embed" in enc and encoder.pos_embed is not None and enc["pos_embed"].shape != encoder.pos_embed.shape:
        enc["pos_embed"] = resample_abs_pos_embed(enc["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    pools_with_norm = isinstance(encoder.norm, nn.Identity)
    if pools_with_norm and "norm.weight" in enc and "fc_norm.weight" not in enc:
        log.info("pretrained final norm dropped; fc_norm starts fresh, as the official fine-tuning")
        enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}
        enc.update({f"fc_norm.{n}": p.detach().clone() for n, p in encoder.fc_norm.named_parameters()})
    return {**{prefix + k: v for k, v in enc.items()}, **rest}


def vit_linear_probe_features(encoder: SimMIMViT, x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """The SimMIM paper's ViT linear probe input: the patch tokens after block ``block`` (1-based: the 8th of
    ViT-B's 12), averaged. (B, C_in, H, W) -> (B, C)."""
    if not 1 <= block <= len(encoder.blocks):
        raise UserError(f"linear-probe block {block} is not a block of this ViT: 1..{len(encoder.blocks)}")
    (tokens,) = encoder.forward_intermediates(x, indices=[block - 1], norm=False, stop_early=True,
                                              output_fmt="NLC", intermediates_only=True)  # (B, L, C)
    return tokens.mean(dim=1)
