"""What a SwinV2 checkpoint learned about position (``simmim inspect``): the relative position bias of every block and
head as a (2W-1) x (2W-1) map of bias per relative offset (the SwinV2 paper's visualisation of learned biases), at
the window it was trained at and at a larger one, the per-head attention temperature, and the checkpoint's geometry
and training metadata as text. Swin V1 and ViT weights are drawn the same way (see below).

A log-CPB (or linear CPB) checkpoint is evaluated at the larger window exactly as a model moved there does: the
coordinates stay normalised by the trained window, so the maps show what the MLP extrapolates to. A V1 parameter
table has no values beyond its window; it is resized bicubically, as Swin V1 transfers (``set_input_size``).

A ViT (BEiT/SimMIM) has no windows: its relative position table spans the whole token grid, (2h-1)(2w-1) offsets
plus 3 CLS entries per head. The map is drawn at the trained grid and at ``scale`` times it, the larger one resized
as the toolkit moves a ViT to a larger image (:func:`simmim.models.vit.resize_rel_pos_table`, the official cubic
resize); the CLS entries are listed in the text. One table shared by all blocks (pretraining) or one per block
(fine-tuning), one row of the picture each.

Letters: nH heads, W window side, P the window a stage's bias was trained at, h x w a ViT's token grid.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from simmim.errors import UserError
from simmim.models.swin_transformer_v2 import LOGIT_SCALE_MAX, relative_coords_table
from simmim.models.vit import CLS_ENTRIES, resize_rel_pos_table, square_grid, vit_variant_of
from simmim.visualize import check_out_dir, save_png, save_text, write_output
from simmim.weights import Weights, read_weights

TEXT = "inspect.txt"
VIRIDIS = torch.tensor([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                       dtype=torch.float32) / 255  # anchors of the viridis colour map, low -> high
CELL_PX = 96  # a trained-window map is about this many pixels wide; the larger window's map grows with it
PAD, LABEL_H = 4, 14


@dataclass
class BlockBias:
    """One attention block's position-bias parameters (our key names, without the ``attn.`` prefix)."""

    stage: int
    block: int
    params: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return "table" if "relative_position_bias_table" in self.params else "cpb"

    @property
    def heads(self) -> int:
        return self.params["logit_scale"].shape[0] if "logit_scale" in self.params else self._bias_heads()

    def _bias_heads(self) -> int:
        table = self.params.get("relative_position_bias_table")
        return table.shape[1] if table is not None else self.params["cpb_mlp.2.weight"].shape[0]


def block_biases(weights: Weights) -> list[BlockBias]:
    """Every block's position-bias parameters in ``weights``, in order; refuses a file that has none."""
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, value in weights.encoder().items():
        if m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(.+)", key):
            found.setdefault((int(m[1]), int(m[2])), {})[m[3]] = value
    blocks = [BlockBias(s, b, p) for (s, b), p in sorted(found.items())
              if "cpb_mlp.0.weight" in p or "relative_position_bias_table" in p]
    if not blocks:
        raise UserError(f"{weights.describe()} has no position bias (no cpb_mlp or relative_position_bias_table "
                        "in its attention blocks); inspect reads SwinV2 weights: a simmim checkpoint or export, an "
                        "official, timm or transformers SwinV2 file")
    return blocks


def bias_maps(bias: BlockBias, window: int, trained: int, log_spaced: bool = True) -> torch.Tensor:
    """The bias the block adds to attention logits for each relative offset at ``window``: (nH, 2W-1, 2W-1).

    CPB: ``16 * sigmoid(mlp(coords))`` with the coordinates normalised by the ``trained`` window (as a model moved
    to ``window`` computes them). V1 table: the table, bicubically resized when ``window`` differs from its own."""
    p = {k: v.float() for k, v in bias.params.items()}
    if bias.kind == "table":
        table = p["relative_position_bias_table"]  # ((2P-1)^2, nH)
        side = math.isqrt(table.shape[0])
        maps = table.T.reshape(1, -1, side, side)  # (1, nH, 2P-1, 2P-1)
        if side != 2 * window - 1:
            maps = F.interpolate(maps, size=(2 * window - 1,) * 2, mode="bicubic", align_corners=False)
        return maps[0]
    coords = relative_coords_table((window, window), (trained, trained), log_spaced)  # (1, 2W-1, 2W-1, 2)
    hidden = F.relu(coords @ p["cpb_mlp.0.weight"].T + p["cpb_mlp.0.bias"])  # (1, 2W-1, 2W-1, 512)
    return 16 * torch.sigmoid(hidden @ p["cpb_mlp.2.weight"].T)[0].permute(2, 0, 1)  # (nH, 2W-1, 2W-1)


def temperatures(bias: BlockBias) -> list[float] | None:
    """The per-head multiplier of the cosine similarities, ``exp(min(logit_scale, log 100))``; None for a block
    with dot-product attention."""
    scale = bias.params.get("logit_scale")
    if scale is None:
        return None
    return torch.clamp(scale.float().flatten(), max=LOGIT_SCALE_MAX).exp().tolist()


def colourise(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(H, W) values -> (3, H, W) in [0, 1] through the viridis anchors, ``low``..``high`` spanning the map."""
    t = ((x - low) / max(high - low, 1e-12)).clamp(0, 1) * (len(VIRIDIS) - 1)
    i = t.floor().long().clamp(max=len(VIRIDIS) - 2)
    frac = (t - i)[..., None]
    return (VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac).permute(2, 0, 1)


def tile_pixels(maps: torch.Tensor, low: float, high: float, px: int) -> np.ndarray:
    """(nH, a, c) maps -> per head the (a * px, c * px, 3) uint8 tile drawn for it (each offset a px x px square)."""
    tiles = torch.stack([colourise(m, low, high) for m in maps]).repeat_interleave(px, 2).repeat_interleave(px, 3)
    return (tiles * 255).round().byte().permute(0, 2, 3, 1).numpy()


def picture_layout(small: tuple[int, int], large: tuple[int, int], heads: int) -> tuple[int, int]:
    """(pixels per offset, x of the larger maps) of :func:`stage_picture` for maps of ``small`` and ``large``
    offsets (rows, columns)."""
    px = max(1, CELL_PX // max(small))
    return px, (small[1] * px + PAD) * heads + 3 * PAD  # the trained maps, then a gap


def picture_size(small: tuple[int, int], large: tuple[int, int], heads: int, rows: int) -> tuple[int, int]:
    """(width, height) in pixels of :func:`stage_picture` with ``rows`` rows of ``heads`` maps each."""
    px, left = picture_layout(small, large, heads)
    width = max(left + (large[1] * px + PAD) * heads + PAD, 6 * 72)  # room for the title and the colour line
    return width, LABEL_H * 2 + rows * (large[0] * px + LABEL_H + PAD) + LABEL_H


def stage_picture(rows: Sequence[tuple[str, torch.Tensor, torch.Tensor]], title: str, low: float, high: float,
                  captions: tuple[str, str] | None = None) -> torch.Tensor:
    """A picture of one stage: per row (a block) its heads' maps at the trained window, then at the larger one.

    ``rows``: (label, maps at the trained window (nH, a, c), maps at the larger window (nH, b, d)); square for a
    Swin window, a ViT's token grid may not be. Every offset is drawn as a square of the same size, so the larger
    maps are larger and their centre lines up with the trained maps. ``captions`` head the two columns (default:
    the trained and the larger window). Returns (3, H, W) in [0, 1] with a white background."""
    (a, c), (b, d) = rows[0][1].shape[-2:], rows[0][2].shape[-2:]
    heads = rows[0][1].shape[0]
    px, left = picture_layout((a, c), (b, d), heads)
    width, height = picture_size((a, c), (b, d), heads, len(rows))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 2), title, fill="black")
    captions = captions or (f"trained window {(c + 1) // 2}", f"window {(d + 1) // 2}")
    draw.text((PAD, LABEL_H + 2), captions[0], fill="black")
    draw.text((left, LABEL_H + 2), captions[1], fill="black")
    y = 2 * LABEL_H + PAD
    for label, small, large in rows:
        draw.text((PAD, y), label, fill="black")
        y += LABEL_H
        for col, (maps, (rows_, cols), x0) in enumerate(((small, (a, c), PAD), (large, (b, d), left))):
            top = y + (b - rows_) * px // 2 if col == 0 else y
            for h, array in enumerate(tile_pixels(maps, low, high, px)):
                canvas.paste(Image.fromarray(array), (x0 + h * (cols * px + PAD), top))
        y += b * px + PAD
    draw.text((PAD, y), f"colour: bias {low:.2f} (dark) .. {high:.2f} (yellow); one column per head", fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def report(weights: Weights, variant: str | None, geometry: str, position: str, details: Sequence[str]) -> str:
    """``inspect.txt``: what the file is, its ``geometry`` and ``position`` bias, the ``details`` lines (per-head
    figures) and its training metadata."""
    lines = [f"checkpoint: {weights.describe()}", f"source: {weights.source}"]
    if weights.kind:
        lines.append(f"kind: {weights.kind}")
    lines.append(f"variant: {variant or 'not recorded'}")
    lines.append(f"geometry: {geometry}")
    lines.append(f"position bias: {position}")
    params = sum(v.numel() for v in weights.state_dict.values())
    lines.append(f"parameters in the file: {params:,}")
    if weights.checkpoint is not None and "step" in weights.checkpoint:
        lines.append(f"step: {weights.checkpoint['step']}")
    lines += ["", *details]
    if weights.meta:
        lines += ["", "metadata:", json.dumps(weights.meta, indent=2, default=str, sort_keys=True)]
    return "\n".join(lines) + "\n"


def describe(weights: Weights, blocks: Sequence[BlockBias], windows: Sequence[int]) -> str:
    """``inspect.txt`` of Swin V1/V2 weights: the file, its geometry, the temperature per head, its metadata."""
    g = weights.geometry
    details = ["attention temperature per head, exp(min(logit_scale, log 100)) (the paper initialises 10):"]
    for bias in blocks:
        temps = temperatures(bias)
        shown = " ".join(f"{t:6.2f}" for t in temps) if temps is not None else "dot-product attention"
        details.append(f"  stage {bias.stage} block {bias.block}: {shown}")
    return report(weights, (g.variant if g else None) or weights.meta.get("model"),
                  g.describe() if g else "not recorded",
                  f"{'V1 table' if blocks[0].kind == 'table' else 'continuous (CPB MLP)'}; "
                  f"trained windows per stage {'/'.join(map(str, windows))}", details)


MAX_WINDOW = 192  # the larger window drawn: 8x SwinV2's largest fine-tuning window (24); a few hundred MB at most


def inspect_checkpoint(checkpoint: str | Path | Weights, out: str | Path, scale: int = 2,
                       overwrite: bool = False) -> list[Path]:
    """Write ``position_bias_stage<i>.png`` per stage (every block and head at the trained window and at ``scale``
    times it) and ``inspect.txt`` into the folder ``out``; returns the paths. Existing outputs are refused unless
    ``overwrite``; nothing else in ``out`` is touched. ViT weights: ``position_bias_vit.png`` (see
    :func:`inspect_vit`)."""
    if scale < 2:
        raise UserError(f"--scale {scale} must be >= 2 (the larger window is scale x the trained one)")
    weights = checkpoint if isinstance(checkpoint, Weights) else read_weights(checkpoint)
    if (vit := vit_bias(weights)) is not None:
        return inspect_vit(weights, vit, out, scale, overwrite)
    blocks = block_biases(weights)
    stages = sorted({b.stage for b in blocks})
    windows = trained_windows(weights, blocks, stages)
    if scale * max(windows) > MAX_WINDOW:  # the CPB MLP runs on (2W-1)^2 offsets: W 4000 asked for 131 GB
        raise UserError(f"--scale {scale} makes a window of {scale * max(windows)} from the trained "
                        f"{max(windows)}; the largest drawn is {MAX_WINDOW}: use --scale "
                        f"{max(2, MAX_WINDOW // max(windows))} or less")
    names = [f"position_bias_stage{s}.png" for s in stages] + [TEXT]
    out = check_out_dir(out, names, overwrite)
    # a linear-CPB model has the same keys as a log-CPB one and no file records the choice: log-CPB, the SwinV2
    # default and the only one our runs train, is assumed (bias_maps(..., log_spaced=False) draws a linear one)
    log_spaced = True
    pictures = []
    for stage, window in zip(stages, windows, strict=True):
        rows = [(f"block {b.block}", bias_maps(b, window, window, log_spaced),
                 bias_maps(b, scale * window, window, log_spaced)) for b in blocks if b.stage == stage]
        low = min(float(m.min()) for _, s, large in rows for m in (s, large))
        high = max(float(m.max()) for _, s, large in rows for m in (s, large))
        kind = "V1 table, resized bicubically" if blocks[0].kind == "table" else "CPB, extrapolated"
        pictures.append(stage_picture(rows, f"stage {stage}: relative position bias per head ({kind})", low, high))
    written: list[Path] = []
    for name, picture in zip(names, pictures, strict=False):
        written.append(write_output(partial(save_png, picture), out / name, len(written)))
    text = describe(weights, blocks, windows)
    written.append(write_output(partial(save_text, text), out / TEXT, len(written)))
    return written


def trained_windows(weights: Weights, blocks: Sequence[BlockBias], stages: Sequence[int]) -> list[int]:
    """The window each stage's bias was trained at: the file's record (or, for a V1 table, its size)."""
    if blocks[0].kind == "table":
        return [(math.isqrt(next(b for b in blocks if b.stage == s).params["relative_position_bias_table"]
                            .shape[0]) + 1) // 2 for s in stages]
    if weights.windows is None:
        raise UserError(f"{weights.describe()} does not record the windows its position bias was trained at (a "
                        "bare timm file); inspect the simmim checkpoint or export it came from")
    return [weights.windows[s][0] for s in stages]


# ----------------------------------------------------------------------------------------------------------------
# ViT: one relative position table over the whole token grid, no windows

VIT_PICTURE = "position_bias_vit.png"
_VIT_TABLE = re.compile(r"(rel_pos_bias|blocks\.(\d+)\.attn)\.relative_position_bias_table")


@dataclass
class VitBias:
    """A ViT's relative position tables, each ((2h-1)(2w-1) + 3, nH) for the token grid ``grid`` = (h, w) it was
    trained at: ``("shared", table)`` for the one all blocks share (pretraining), ``("block i", table)`` per block
    (fine-tuning)."""

    tables: list[tuple[str, torch.Tensor]]
    grid: tuple[int, int]

    @property
    def sharing(self) -> str:
        labels = [label for label, _ in self.tables]
        if labels == ["shared"]:
            return "shared by all blocks"
        return "one per block" if "shared" not in labels else "shared by all blocks, and one per block"


def vit_bias(weights: Weights) -> VitBias | None:
    """The relative position tables of ViT weights (keys ``rel_pos_bias.*`` / ``blocks.i.attn.*``); None for weights
    that are not a ViT's; a ViT without any (absolute position embedding only) is refused in one line."""
    encoder = weights.encoder()
    found = [(m, v) for k, v in encoder.items() if (m := _VIT_TABLE.fullmatch(k))]
    if not found:
        if any(k.startswith("blocks.") for k in encoder):
            raise UserError(f"{weights.describe()} holds a ViT encoder without a relative position bias (an "
                            "absolute position embedding only); inspect draws relative position biases")
        return None
    order = {m.string: (-1, "shared") if m[2] is None else (int(m[2]), f"block {m[2]}") for m, _ in found}
    tables = [(order[m.string][1], v.detach().float()) for m, v in sorted(found, key=lambda f: order[f[0].string])]
    return VitBias(tables, vit_grid(weights, found[0][1].shape[0]))


def vit_grid(weights: Weights, rows: int) -> tuple[int, int]:
    """The token grid a table of ``rows`` rows was trained at: the recorded image size over the patch size where
    they fit the table, else the square grid its size gives (the released ViTs are square)."""
    img, patch = weights.meta.get("img_size"), (weights.meta.get("encoder") or {}).get("patch_size")
    if img and patch:
        h, w = img[0] // patch, img[1] // patch
        if (2 * h - 1) * (2 * w - 1) + len(CLS_ENTRIES) == rows:
            return h, w
    return square_grid(rows)


def vit_bias_maps(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ViT table ((2h-1)(2w-1) + 3, nH) -> the bias per token offset (nH, 2h-1, 2w-1), row dy + h - 1, column
    dx + w - 1 (BEiT's index), the 3 CLS entries left out."""
    rows, cols = 2 * grid[0] - 1, 2 * grid[1] - 1
    return table[: rows * cols].T.reshape(-1, rows, cols)


MAX_PIXELS = 64_000_000  # the largest ViT picture: ~190 MB as RGB, under PIL's decompression-bomb warning (89 M)


def vit_picture_size(bias: VitBias, scale: int) -> tuple[int, int]:
    """(width, height) of ``position_bias_vit.png`` at ``scale``."""
    (h, w), heads = bias.grid, bias.tables[0][1].shape[1]
    return picture_size((2 * h - 1, 2 * w - 1), (2 * scale * h - 1, 2 * scale * w - 1), heads, len(bias.tables))


def vit_scale_limit(bias: VitBias) -> int:
    """The largest ``scale`` drawn for ``bias``: a larger grid of at most :data:`MAX_WINDOW` tokens a side and a
    picture of at most :data:`MAX_PIXELS` (1 when even scale 2 is too large)."""
    limit = 1
    for scale in range(2, MAX_WINDOW // max(bias.grid) + 1):
        width, height = vit_picture_size(bias, scale)
        if width * height > MAX_PIXELS:
            break
        limit = scale
    return limit


def vit_rows(bias: VitBias, scale: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per table (label, maps at the trained grid (nH, 2h-1, 2w-1), maps at ``scale`` times it (nH, 2sh-1, 2sw-1)):
    the larger from the table resized as :meth:`SimMIMViT.set_input_size` resizes it (:func:`resize_rel_pos_table`).
    """
    (h, w), large = bias.grid, (scale * bias.grid[0], scale * bias.grid[1])
    return [(label, vit_bias_maps(t, (h, w)), vit_bias_maps(resize_rel_pos_table(t, (h, w), large), large))
            for label, t in bias.tables]


def inspect_vit(weights: Weights, bias: VitBias, out: str | Path, scale: int, overwrite: bool) -> list[Path]:
    """Write ``position_bias_vit.png`` (per table a row: every head's map at the trained token grid, then at
    ``scale`` times it, resized as a ViT moved to the larger image is) and ``inspect.txt`` into ``out``."""
    (h, w), side = bias.grid, max(bias.grid)
    if scale > (limit := vit_scale_limit(bias)):  # a ViT-B with a table per block at --scale 13: 189 M pixels
        width, height = vit_picture_size(bias, scale)
        raise UserError(f"--scale {scale} makes a token grid of {scale * side} from the trained {side} and a "
                        f"{width}x{height} px picture; the largest drawn is {MAX_WINDOW} tokens a side and "
                        f"{MAX_PIXELS // 10**6} M pixels: " + (f"use --scale {limit} or less" if limit >= 2 else
                                                               "these weights have too many tables and heads"))
    out = check_out_dir(out, [VIT_PICTURE, TEXT], overwrite)
    rows = vit_rows(bias, scale)
    low = min(float(m.min()) for _, s, big in rows for m in (s, big))
    high = max(float(m.max()) for _, s, big in rows for m in (s, big))
    picture = stage_picture(rows, f"ViT relative position bias per head ({bias.sharing}; cubic resize)", low, high,
                            (f"trained token grid {h}x{w}", f"token grid {scale * h}x{scale * w}"))
    written = [write_output(partial(save_png, picture), out / VIT_PICTURE, 0)]
    text = describe_vit(weights, bias)
    written.append(write_output(partial(save_text, text), out / TEXT, len(written)))
    return written


def describe_vit(weights: Weights, bias: VitBias) -> str:
    """``inspect.txt`` of ViT weights: the file, its token grid, the sharing of the bias, the 3 CLS entries per
    head of every table (not part of the maps), its metadata."""
    (h, w), encoder = bias.grid, weights.encoder()
    stem = encoder.get("patch_embed.proj.weight")  # (C, in_chans, patch, patch)
    size = ""
    if stem is not None:
        px = (h * stem.shape[-2], w * stem.shape[-1])
        size = f"{px[0] if px[0] == px[1] else f'{px[0]}x{px[1]}'} px, patch {stem.shape[-1]}, "
    details = ["CLS entries per head (table rows outside the maps; the resize keeps them):"]
    for label, table in bias.tables:
        for name, values in zip(CLS_ENTRIES, table[-len(CLS_ENTRIES):], strict=True):
            details.append(f"  {label} {name + ':':11} {' '.join(f'{v:7.3f}' for v in values.tolist())}")
    return report(weights, weights.meta.get("model") or vit_variant_of(encoder), f"{size}token grid {h}x{w}",
                  f"ViT relative position bias ({bias.sharing}); (2h-1)x(2w-1) = {2 * h - 1}x{2 * w - 1} offsets "
                  f"+ {len(CLS_ENTRIES)} CLS entries per head, {bias.tables[0][1].shape[1]} heads", details)
