"""The position-bias study (tools/position_bias_study.py) in quick mode: every variant, seed and test size gets a
finite accuracy, and the tables and the plot are written. The task's scenes are resolution-free."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import line_plot  # noqa: E402
import position_bias_study as study  # noqa: E402
from position_bias_task import digit_split, draw_layouts, render  # noqa: E402


def test_scenes_are_the_same_at_every_resolution():
    layouts = draw_layouts(digit_split("val"), 6, seed=3)
    small, labels = render(layouts, 64)
    large, labels_large = render(layouts, 128)
    assert small.shape == (6, 3, 64, 64) and large.shape == (6, 3, 128, 128)
    assert labels.tolist() == labels_large.tolist()
    # 2x2-average the 128 px render: it shows the same scene as the 64 px one, up to resampling
    pooled = large.float().view(6, 3, 64, 2, 64, 2).mean((3, 5))
    assert (pooled - small.float()).abs().mean() < 8  # of 255
    other = render(draw_layouts(digit_split("val"), 6, seed=4), 64)[0]
    assert (other.float() - small.float()).abs().mean() > 20  # different layouts really differ


def test_digit_split_is_disjoint_and_complete():
    train, val = set(digit_split("train").tolist()), set(digit_split("val").tolist())
    assert not train & val and len(train | val) == 1797 and len(val) == 360


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("pb")
    result = study.main(["--quick", "--threads", "1", "--out", str(out)])
    return out, result


def test_quick_study_has_finite_accuracy_for_every_variant_and_size(quick):
    out, result = quick
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows == result["rows"]
    seeds = study.QUICK.seeds
    sizes = {study.setting_name(*s) for s in study.WINDOW_SWEEP + study.RESOLUTION_SWEEP}
    for v in study.POSITION_BIAS + study.ABLATION:
        for seed in seeds:
            got = {r["setting"]: r for r in rows if r["variant"] == v.name and r["seed"] == seed and not r["finetuned"]}
            assert set(got) == sizes, (v.name, seed)
            assert all(math.isfinite(r["top1"]) and 0 <= r["top1"] <= 100 for r in got.values())
    for v in study.POSITION_BIAS:  # the paper's second setting: fine-tuned at the larger sizes
        tuned = {(r["seed"], r["setting"]) for r in rows if r["variant"] == v.name and r["finetuned"]}
        assert tuned == {(s, study.setting_name(*f)) for s in seeds for f in study.FINETUNE}
    # the windows really changed: at 64 px W8 is clamped to the 8x8 and 4x4 maps of stages 2 and 3
    windows = {r["setting"]: r["stage_windows"] for r in rows}
    assert windows["64/W4"] == "4/4/4" and windows["64/W8"] == "8/8/4" and windows["128/W8"] == "8/8/8"


def test_quick_study_writes_tables_and_plot(quick):
    out, _ = quick
    text = (out / "tables.md").read_text()
    assert "nan" not in text.lower()
    cells = re.findall(r"(\d+\.\d) ± (\d+\.\d)", text)
    pb, ab = len(study.POSITION_BIAS), len(study.ABLATION)
    larger = len(study.RESOLUTION_SWEEP) - 1  # direct and fine-tuned for each larger size
    sweep = len(dict.fromkeys(study.WINDOW_SWEEP + study.RESOLUTION_SWEEP))
    assert len(cells) == pb * (1 + 2 * larger) + pb * len(study.WINDOW_SWEEP) + ab * sweep
    for v in study.POSITION_BIAS + study.ABLATION:
        assert f"| {v.name} |" in text or f"| {study.ablation_label(v)} |" in text
    png = Image.open(out / "position_bias.png").convert("RGB")
    assert png.width == 3 * line_plot.PANEL_W
    colours = {c for _, c in png.getcolors(maxcolors=1 << 20)}
    for colour in line_plot.PALETTE[:6]:  # every series was drawn
        assert colour in colours


def test_plot_skips_missing_points(tmp_path):
    nan = float("nan")
    panel = line_plot.Panel("t", ["a", "b", "c"], [line_plot.Series("s", [50.0, nan, 70.0], [1.0, nan, 2.0])])
    path = line_plot.plot_panels([panel], tmp_path / "p.png")
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[1] == line_plot.PANEL_W and (arr == line_plot.PALETTE[0]).all(-1).sum() > 50
