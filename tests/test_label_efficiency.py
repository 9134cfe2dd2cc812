"""The label-efficiency study (tools/label_efficiency.py) in quick mode: the pretraining snapshots, the label subsets,
every fine-tune and probe, and the tables and plot agree with results.json."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import label_efficiency as study  # noqa: E402
import line_plot  # noqa: E402


def test_label_subsets_are_class_balanced_nested_and_seeded():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([120, 100, 100, 100, 100, 100, 100, 100, 100, 80])])
    one = study.label_subset(labels, 0.01, seed=0)
    assert len(one) == 10 and sorted(labels[one].tolist()) == list(range(10))  # 1% of 1000: one per class
    five = study.label_subset(labels, 0.05, seed=0)
    assert torch.bincount(labels[five], minlength=10).tolist() == [5] * 10
    assert set(one.tolist()) <= set(five.tolist())  # nested within a seed
    odd = study.label_subset(labels, 0.013, seed=0)  # 13 images: 3 classes get a second one
    assert sorted(torch.bincount(labels[odd], minlength=10).tolist()) == [1] * 7 + [2] * 3
    assert len(study.label_subset(labels, 1.0, seed=0)) == 1000
    assert set(study.label_subset(labels, 0.05, seed=1).tolist()) != set(five.tolist())
    # more than the smallest class holds: that class gives all it has, the others fill the count
    big = study.label_subset(labels, 0.9, seed=0)
    assert len(big) == 900 and (labels[big] == 9).sum() == 80


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("le")
    result = study.main(["--quick", "--workers", "2", "--out", str(out)])
    return out, result


def test_quick_study_runs_every_job(quick):
    out, result = quick
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["probes"] == result["probes"]
    b = study.QUICK
    for init in study.INITS:
        for f in b.fractions:
            got = {r["seed"]: r for r in saved["rows"] if r["init"] == init and r["fraction"] == f
                   and r["stage"] == "fine-tune"}
            assert set(got) == set(b.seeds), (init, f)
            assert all(math.isfinite(r["top1"]) and 0 <= r["top1"] <= 100 for r in got.values())
            assert all(r["labels"] == round(f * b.pool_scenes) for r in got.values())
            stages = {(r["seed"], r["stage"]) for r in saved["rows"] if r["init"] == init and r["fraction"] == f}
            more = {"direct", "three-stage"} if f in b.stage3_fractions else set()
            assert stages == {(s, st) for s in b.seeds for st in {"fine-tune"} | more}
    assert [p["step"] for p in saved["probes"]] == study.snapshot_steps(b) == sorted(result["snapshots"])
    assert len(saved["pretrain_loss"]) == b.pretrain_steps


def test_snapshot_zero_is_the_random_init_and_simmim_fine_tunes_start_from_the_last(quick):
    _, result = quick
    b = study.QUICK
    snaps = result["snapshots"]
    init = study.new_encoder(b, b.pretrain_seed, num_classes=0).state_dict()
    assert snaps[0].keys() == init.keys()
    assert all(torch.equal(snaps[0][k], init[k]) for k in init)
    last = snaps[b.pretrain_steps]
    assert any(not torch.equal(last[k], init[k]) for k in init)  # pretraining moved the weights
    model = study.init_classifier(b, "SimMIM", seed=5, encoder_state=last).state_dict()
    assert all(torch.equal(model[k], last[k]) for k in last)
    rand = study.init_classifier(b, "random", seed=5, encoder_state=None).state_dict()
    assert torch.equal(model["head.fc.weight"], rand["head.fc.weight"])  # same fresh head for both inits


def test_tables_give_the_json_mean_and_std(quick):
    out, _ = quick
    rows = json.loads((out / "results.json").read_text())["rows"]
    text = (out / "tables.md").read_text()
    assert "nan" not in text.lower()
    table1 = text.split("**Table 2.**")[0]
    for init in study.INITS:
        line = next(ln for ln in table1.splitlines() if ln.startswith(f"| {init} |"))
        cells = [tuple(map(float, c)) for c in re.findall(r"(\d+\.\d) ± (\d+\.\d)", line)]
        assert len(cells) == len(study.QUICK.fractions)
        for (mean, std), f in zip(cells, study.QUICK.fractions, strict=True):
            vals = [r["top1"] for r in rows if r["init"] == init and r["fraction"] == f and r["stage"] == "fine-tune"]
            assert mean == pytest.approx(statistics.fmean(vals), abs=0.051)
            assert std == pytest.approx(statistics.stdev(vals), abs=0.051)
    png = Image.open(out / "label_efficiency.png").convert("RGB")
    assert png.width == 2 * line_plot.PANEL_W
    colours = {c for _, c in png.getcolors(maxcolors=1 << 20)}
    assert all(c in colours for c in line_plot.PALETTE[:4])  # both inits and both probes were drawn
