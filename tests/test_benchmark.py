"""simmim benchmark: the timm reference is the same SimMIM, memory is measured, sections and JSON come out."""

import json

import pytest
import torch

from simmim.benchmark import TimmSimMIM, build_pair, make_batch, memory_section, peak_memory
from simmim.cli import main


def test_timm_reference_is_the_same_simmim():
    ours, ref = build_pair("swinv2_pico", 64, 4, torch.device("cpu"))
    images, mask = make_batch(2, 64, torch.device("cpu"))
    assert isinstance(ref, TimmSimMIM) and mask.shape == (2, 16, 16) and mask.float().mean() == 0.75  # 3 of 4 cells
    for m in (ours, ref):
        m.zero_grad()
    a, b = ours(images, mask).loss, ref(images, mask)[0]
    a.backward(), b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.decoder[0].weight.grad, ref.decoder[0].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.encoder.mask_token.grad, ref.mask_token.grad, rtol=1e-4, atol=1e-7)


def test_peak_memory_sees_cpu_allocations():
    def fn():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(2048, 1024)  # 8 MiB, both alive: 12 MiB at the peak
        del a, b
        torch.ones(1024, 1024)  # 4 MiB after the peak

    assert 12 * 2**20 <= peak_memory(fn, torch.device("cpu")) < 13 * 2**20


def test_memory_section_orders_the_modes():
    section = memory_section("swinv2_pico", 64, 4, batch_sizes=(1, 3), rounds=1, device="cpu")
    rows = {r["mode"]: r for r in section.data["rows"]}
    assert list(rows) == ["none", "attention", "full", "sequential", "timm"]
    per_image = {mode: r["mib_per_image"] for mode, r in rows.items()}
    assert 0 < per_image["full"] < per_image["attention"] < per_image["none"] <= per_image["timm"]
    assert rows["none"]["speed_vs_none"] == 1.0 and all(r["images_per_sec"] > 0 for r in rows.values())
    assert "MiB/image" in section.table


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["benchmark", "--model", "swinv2_pico", "--img-size", "64", "--window-size", "4", "--batch-size", "2",
            "--rounds", "1", "--iters", "1", "--train", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines() if line.startswith("train ")]
    assert [r[2] for r in rows] == ["simmim", "timm"] and rows[1][-1] == "1.00x"
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch"] == torch.__version__ and doc["sections"]["model"]["rows"][0]["images_per_sec"] > 0


def test_cli_errors_name_the_problem(capsys):
    assert main(["benchmark", "--model", "swinv2_giant"]) == 2  # timm has no extra-norm SwinV2
    assert "extra main-branch norms" in capsys.readouterr().err
    assert main(["benchmark", "--model", "swinv2_tinny"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_pipeline_section_is_a_hook_into_the_data_package(capsys, monkeypatch):
    import simmim.data

    if hasattr(simmim.data, "benchmark"):
        pytest.skip("simmim.data ships its pipeline benchmark")
    assert main(["benchmark", "--what", "pipeline"]) == 2
    assert "simmim.data.benchmark" in capsys.readouterr().err
