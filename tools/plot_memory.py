"""Plot the memory / speed trade-off of the recompute modes from ``simmim benchmark --what memory --json FILE``.

    python tools/plot_memory.py docs/benchmarks/memory_cpu.json docs/benchmarks/memory_tradeoff.png

One point per mode: activation memory per image (x) against training images/s (y), timm's SwinV2 for reference.
Drawn with Pillow (a project dependency), so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 90, 40, 70, 80
COLORS = {"none": (31, 119, 180), "attention": (44, 160, 44), "full": (214, 39, 40), "sequential": (148, 103, 189),
          "timm": (90, 90, 90)}
LABELS = {"none": "none", "attention": "attention (selective)", "full": "full checkpointing",
          "sequential": "sequential attention", "timm": "timm SwinV2"}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot(doc: dict, out: Path) -> None:
    section = doc["sections"]["memory"]
    rows = section["rows"]
    xs = [r["mib_per_image"] for r in rows]
    ys = [r["images_per_sec"] for r in rows]
    x_hi, y_hi = max(xs) * 1.15, max(ys) * 1.2
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    small, normal, title = _font(14), _font(16), _font(18)

    def px(x: float, y: float) -> tuple[float, float]:
        return (LEFT + x / x_hi * (W - LEFT - RIGHT), H - BOTTOM - y / y_hi * (H - TOP - BOTTOM))

    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    for t in _ticks(0, x_hi):
        x, _ = px(t, 0)
        d.line([x, H - BOTTOM, x, H - BOTTOM + 5], fill="black")
        d.line([x, TOP, x, H - BOTTOM], fill=(230, 230, 230))
        d.text((x, H - BOTTOM + 8), f"{t:g}", fill="black", font=small, anchor="mt")
    for t in _ticks(0, y_hi):
        _, y = px(0, t)
        d.line([LEFT - 5, y, LEFT, y], fill="black")
        d.line([LEFT, y, W - RIGHT, y], fill=(230, 230, 230))
        d.text((LEFT - 8, y), f"{t:g}", fill="black", font=small, anchor="rm")
    d.text(((LEFT + W - RIGHT) / 2, H - 30), "activation memory per image (MiB)", fill="black", font=normal,
           anchor="mm")
    ylabel = Image.new("RGB", (200, 24), "white")
    ImageDraw.Draw(ylabel).text((100, 12), "training images/s", fill="black", font=normal, anchor="mm")
    img.paste(ylabel.rotate(90, expand=True), (18, int((TOP + H - BOTTOM) / 2) - 100))
    name, img_size, win, dtype = section["model"], section["img_size"], section["window_size"], section["dtype"]
    machine = doc["machine"]
    d.text((W / 2, 25), f"SimMIM training step, {name} {img_size} px W{win}, {dtype}: memory vs speed",
           fill="black", font=title, anchor="mm")
    d.text((W / 2, 48), f"{machine['cpu']} ({machine['threads']} threads) / {machine.get('cuda') or 'CPU'}, "
           f"torch {machine['torch']}, {machine['date']}", fill=(80, 80, 80), font=small, anchor="mm")
    for r in rows:
        x, y = px(r["mib_per_image"], r["images_per_sec"])
        color = COLORS.get(r["mode"], (0, 0, 0))
        shape = d.rectangle if r["mode"] == "timm" else d.ellipse
        shape([x - 7, y - 7, x + 7, y + 7], fill=color, outline="black")
        d.text((x + 11, y + 1), r["mode"], fill=color, font=small, anchor="lm")
    # the figures, as a legend in the empty lower right corner (points at high memory and speed)
    lx, ly = W - RIGHT - 330, H - BOTTOM - 20 - 22 * len(rows)
    d.rectangle([lx - 10, ly - 10, W - RIGHT - 10, H - BOTTOM - 12], fill="white", outline=(180, 180, 180))
    for k, r in enumerate(rows):
        color = COLORS.get(r["mode"], (0, 0, 0))
        d.text((lx, ly + 22 * k), f"{LABELS.get(r['mode'], r['mode'])}", fill=color, font=small, anchor="lt")
        d.text((W - RIGHT - 20, ly + 22 * k), f"{r['mib_per_image']:.0f} MiB/img, {r['images_per_sec']:.2f} img/s",
               fill=color, font=small, anchor="rt")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="output of simmim benchmark --what memory --json FILE")
    p.add_argument("png", type=Path)
    args = p.parse_args()
    plot(json.loads(args.json.read_text()), args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
