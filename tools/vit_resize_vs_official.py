"""Check models.vit.resize_rel_pos_table against the official SimMIM/BEiT resize, which calls SciPy's ``interp2d``
(removed in SciPy 1.14), so the official side runs in a second environment with an older SciPy:

    python tools/vit_resize_vs_official.py dump DIR          # this project's environment: inputs + our resize
    python -m venv /tmp/oldscipy && /tmp/oldscipy/bin/pip install "numpy<2" "scipy<1.14"
    /tmp/oldscipy/bin/python tools/vit_resize_vs_official.py official DIR   # numpy + scipy only

The second step prints, per (old grid -> new grid), the largest difference between the two. The official side is
the official ``remap_pretrained_keys_vit`` maths restated on numpy: old offsets 0, +-1, +-(1 + q), ... with q from
a bisection in [1.01, 1.5] (the last midpoint tried), ``interp2d(kind='cubic')`` per head, the 3 CLS rows kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CASES = [(14, 24), (14, 12), (4, 6), (4, 5)]  # token grids: 224 -> 384 and 192 px, and two tiny ones


def dump(out: Path) -> None:
    import torch

    from simmim.models.vit import resize_rel_pos_table

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for src, dst in CASES:
        table = torch.randn((2 * src - 1) ** 2 + 3, 4, generator=g)
        np.save(out / f"in_{src}_{dst}.npy", table.numpy())
        np.save(out / f"ours_{src}_{dst}.npy", resize_rel_pos_table(table, (src, src), (dst, dst)).numpy())


def official_resize(table: np.ndarray, src_grid: int, dst_grid: int) -> np.ndarray:
    from scipy import interpolate

    src, dst = 2 * src_grid - 1, 2 * dst_grid - 1
    lo, hi, q = 1.01, 1.5, 1.01
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            hi = q
        else:
            lo = q
    steps, pos = [], 1.0
    for i in range(src // 2):
        steps.append(pos)
        pos += q ** (i + 1)
    old = [-s for s in reversed(steps)] + [0.0] + steps
    new = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    heads = [interpolate.interp2d(old, old, table[:-3, h].reshape(src, src), kind="cubic")(new, new).reshape(-1, 1)
             for h in range(table.shape[1])]
    return np.concatenate([np.concatenate(heads, 1), table[-3:]], 0).astype(np.float32)


def official(folder: Path) -> None:
    for src, dst in CASES:
        table, ours = np.load(folder / f"in_{src}_{dst}.npy"), np.load(folder / f"ours_{src}_{dst}.npy")
        diff = np.abs(official_resize(table, src, dst) - ours).max()
        print(f"grid {src}x{src} -> {dst}x{dst}: max |ours - official| = {diff:.3g}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("dump", "official"):
        sys.exit(__doc__)
    (dump if sys.argv[1] == "dump" else official)(Path(sys.argv[2]))
