"""Line charts with error bars drawn with PIL, so the study needs no plotting dependency.

A figure is a row of :class:`Panel` s sharing nothing but the canvas; each panel has categorical x positions and any
number of :class:`Series` (a line through the means, a bar of +-1 std at every point, a legend entry). Points whose
mean is NaN are skipped, which lets a series cover only some x positions (fine-tuned results at two sizes, say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 520, 400  # one panel's axes, tick labels and title; the legend rows come below
MARGIN = dict(left=62, right=16, top=40, bottom=50)  # axis labels and ticks live in the margins
LEGEND_ROW = 18
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


@dataclass
class Series:
    label: str
    means: list[float]  # one per x position, NaN = no point there
    stds: list[float]
    colour: tuple[int, int, int] = PALETTE[0]
    dashed: bool = False
    hollow: bool = False  # hollow markers, e.g. for a second setting of the same variant


@dataclass
class Panel:
    title: str
    x_labels: list[str]
    series: list[Series] = field(default_factory=list)
    y_label: str = "top-1 accuracy (%)"
    x_values: list[float] | None = None  # numeric x of each label (None: evenly spaced categories)
    log_x: bool = False  # place x_values on a log scale (they must be > 0)
    x_label: str = ""  # under the tick labels


def _x_fractions(panel: Panel) -> list[float]:
    """Where each x label sits across the axes, in (0, 1)."""
    n = len(panel.x_labels)
    if panel.x_values is None or n < 2:
        return [(i + 0.5) / n for i in range(n)]
    v = [math.log(x) if panel.log_x else x for x in panel.x_values]
    lo, hi = min(v), max(v)
    return [0.06 + 0.88 * (x - lo) / (hi - lo) for x in v]  # a margin inside the frame for the end points


def _y_range(panel: Panel) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for s in panel.series:
        for m, sd in zip(s.means, s.stds, strict=True):
            if math.isfinite(m):
                sd = sd if math.isfinite(sd) else 0.0
                lo, hi = min(lo, m - sd), max(hi, m + sd)
    if not math.isfinite(lo):
        return 0.0, 100.0
    pad = max((hi - lo) * 0.08, 1.0)
    step = 5.0 if hi - lo > 10 else 1.0
    return max(0.0, math.floor((lo - pad) / step) * step), min(100.0, math.ceil((hi + pad) / step) * step)


def _ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50) if span / s <= 8)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def _dashed_line(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float],
                 colour: tuple[int, int, int], width: int, dash: float = 7.0) -> None:
    length = math.dist(a, b)
    n = max(int(length // dash), 1)
    for i in range(0, n, 2):
        t0, t1 = i / n, min((i + 1) / n, 1.0)
        draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                   (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=colour, width=width)


def _draw_panel(img: Image.Image, panel: Panel, x0: int, y0: int, font: ImageFont.ImageFont,
                small: ImageFont.ImageFont) -> None:
    draw = ImageDraw.Draw(img)
    left, top = x0 + MARGIN["left"], y0 + MARGIN["top"]
    right, bottom = x0 + PANEL_W - MARGIN["right"], y0 + PANEL_H - MARGIN["bottom"]
    lo, hi = _y_range(panel)
    xs = [left + (right - left) * f for f in _x_fractions(panel)]

    def y_of(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    draw.text(((left + right) / 2, y0 + 14), panel.title, fill="black", font=font, anchor="mm")
    for t in _ticks(lo, hi):  # horizontal grid with labels
        draw.line([(left, y_of(t)), (right, y_of(t))], fill=(225, 225, 225))
        draw.text((left - 6, y_of(t)), f"{t:g}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    for x, label in zip(xs, panel.x_labels, strict=True):
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        for k, line in enumerate(label.split("\n")):
            draw.text((x, bottom + 8 + 14 * k), line, fill="black", font=small, anchor="mt")
    if panel.x_label:
        draw.text(((left + right) / 2, bottom + 38), panel.x_label, fill="black", font=small, anchor="mt")
    label_img = Image.new("RGBA", (bottom - top, 18), (255, 255, 255, 0))
    ImageDraw.Draw(label_img).text(((bottom - top) / 2, 9), panel.y_label, fill="black", font=small, anchor="mm")
    label_img = label_img.rotate(90, expand=True)
    img.paste(label_img, (x0 + 4, top), label_img)  # the alpha channel is the paste mask

    offsets = [(k - (len(panel.series) - 1) / 2) * 4 for k in range(len(panel.series))]  # keep error bars apart
    for s, dx in zip(panel.series, offsets, strict=True):
        pts = [(x + dx, m, sd) for x, m, sd in zip(xs, s.means, s.stds, strict=True) if math.isfinite(m)]
        for (xa, ma, _), (xb, mb, _) in zip(pts, pts[1:], strict=False):
            if s.dashed:
                _dashed_line(draw, (xa, y_of(ma)), (xb, y_of(mb)), s.colour, 2)
            else:
                draw.line([(xa, y_of(ma)), (xb, y_of(mb))], fill=s.colour, width=2)
        for x, m, sd in pts:
            y = y_of(m)
            if math.isfinite(sd) and sd > 0:  # +-1 std bar with caps
                y_hi, y_lo = y_of(m + sd), y_of(m - sd)
                draw.line([(x, y_hi), (x, y_lo)], fill=s.colour, width=1)
                draw.line([(x - 4, y_hi), (x + 4, y_hi)], fill=s.colour, width=1)
                draw.line([(x - 4, y_lo), (x + 4, y_lo)], fill=s.colour, width=1)
            r = 4
            draw.ellipse([x - r, y - r, x + r, y + r], outline=s.colour, width=2,
                         fill="white" if s.hollow else s.colour)

    ly = y0 + PANEL_H + 4  # legend under the x labels, so it never hides a point
    lx = left + 10
    for s in panel.series:
        if s.dashed:
            _dashed_line(draw, (lx, ly), (lx + 22, ly), s.colour, 2, dash=5.0)
        else:
            draw.line([(lx, ly), (lx + 22, ly)], fill=s.colour, width=2)
        draw.ellipse([lx + 7, ly - 4, lx + 15, ly + 4], outline=s.colour, width=2,
                     fill="white" if s.hollow else s.colour)
        draw.text((lx + 30, ly), s.label, fill="black", font=small, anchor="lm")
        ly += LEGEND_ROW


def plot_panels(panels: list[Panel], path: str | Path, caption: str = "") -> Path:
    """Draw ``panels`` side by side into a PNG at ``path``; ``caption`` goes underneath. Returns the path."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    legend_h = LEGEND_ROW * max(len(p.series) for p in panels) + 4
    caption_h = 26 if caption else 0
    img = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + legend_h + caption_h), "white")
    for i, panel in enumerate(panels):
        _draw_panel(img, panel, i * PANEL_W, 0, font, small)
    if caption:
        ImageDraw.Draw(img).text((img.width / 2, img.height - caption_h / 2), caption, fill=(60, 60, 60),
                                 font=small, anchor="mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
