"""simmim benchmark: the timm reference is the same SimMIM, memory is measured, sections and JSON come out."""

import json
from pathlib import Path

import pytest
import torch

from simmim.benchmarks.model import TimmSimMIM, build_pair, make_batch, memory_section, peak_memory
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


@pytest.mark.parametrize(("name", "timm_class", "window"), [("swin_pico", "SwinTransformer", 4),
                                                          ("vit_pico", "Beit", None)])
def test_the_other_encoders_are_compared_with_plain_timm(name, timm_class, window):
    """Swin V1 and ViT: the reference is timm's own model built by name (``timm_spec``), running the official SimMIM
    forward on our weights; same loss and gradients, and the model section runs on it."""
    from simmim.benchmarks.model import model_section

    ours, ref = build_pair(name, 64, window, torch.device("cpu"))
    assert type(ref.encoder).__name__ == timm_class and type(ref.encoder).__module__.startswith("timm.")
    images, mask = make_batch(2, 64, torch.device("cpu"), patch_size=ours.encoder.patch_size)
    a, b = ours(images, mask).loss, ref(images, mask)[0]
    a.backward(), b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.encoder.mask_token.grad, ref.mask_token.grad, rtol=1e-4, atol=1e-7)
    section = model_section(name, 64, window, batch_size=2, rounds=1, iters=1, warmup=0, modes=("train",))
    assert {r["model"] for r in section.data["rows"]} == {"simmim", "timm"}


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
    assert [r[2] for r in rows] == ["simmim", "timm"]
    doc_rows = {r["model"]: r for r in json.loads(out.read_text())["sections"]["model"]["rows"]}
    ours, timm_row = doc_rows["simmim"], doc_rows["timm"]  # the ratio is the median of per-round ratios
    per_round = sorted(a / b for a, b in zip(ours["rounds"], timm_row["rounds"], strict=True))
    assert ours["vs_timm"] == pytest.approx(per_round[len(per_round) // 2])
    assert f"{ours['vs_timm']:.2f}x" == rows[0][-1]
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch"] == torch.__version__ and doc["sections"]["model"]["rows"][0]["images_per_sec"] > 0
    assert table.startswith("swinv2_pico 64px W4")  # the model timed heads the report
    # the CPU's vector extensions decide which kernels run: every report records them (from /proc/cpuinfo here)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    assert doc["machine"]["cpu_flags"] == [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                       "amx_bf16", "amx_tile") if f in flags]
    assert doc["settings"]["model"] == "swinv2_pico" and doc["machine"]["cpus_usable"] >= 1


def test_cli_errors_name_the_problem(capsys):
    assert main(["benchmark", "--model", "swinv2_giant"]) == 2  # timm has no extra-norm SwinV2
    assert "extra main-branch norms" in capsys.readouterr().err
    assert main(["benchmark", "--model", "swinv2_tinny"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_pipeline_and_index_sections_through_the_cli(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (300, 220), (40 * i, 90, 160)).save(folder / f"{i}.jpg", quality=90)
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--what", "pipeline", "index", "--folder", str(folder), "--rounds", "1",
                 "--index-files", "300", "--compare-list", "--source-images", "6", "--shards", "2", "--parquet-files",
                 "2", "--first-batch-files", "20", "--first-batch-shards", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[pipeline]" in printed and "[index]" in printed and "[sources]" in printed
    assert "swinv2" not in printed.split("[pipeline]")[0]  # no model was timed: the header names none
    sections = json.loads(out.read_text())["sections"]
    row = sections["pipeline"]["rows"][0]
    assert row["images"] == 3 and row["ratio"] == pytest.approx(row["ours_ips"] / row["official_ips"])
    sources = sections["sources"]
    assert [r["source"] for r in sources["rows"]] == ["folder", "tar shards", "parquet, streamed",
                                                      "parquet, memory-mapped"]
    assert all(r["images"] == 6 and r["ips"] > 0 for r in sources["rows"])
    assert [(r["layout"], r["seconds"] > 0) for r in sources["first_batch"]] == [
        ("20 files", True), ("3 shards", True), ("3 shards", True)]
    names = [r["name"] for r in sections["index"]["rows"]]
    assert names == ["packed FileIndex", "list of Paths"]
    assert all(r["files"] == 300 for r in sections["index"]["rows"])


def test_save_section_times_both_ways_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--what", "save", "--model", "swinv2_pico", "--img-size", "32", "--window-size", "4",
                 "--rounds", "1", "--save-dir", str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[save]" in printed and "blocked async/sync" in printed
    data = json.loads(out.read_text())["sections"]["save"]
    assert set(data["per_round"]) == {"sync_blocked", "sync_write", "async_blocked", "async_write"}
    assert all(len(v) == 1 and v[0] > 0 for v in data["per_round"].values())
    for mode in ("sync", "async"):  # blocked is part of the write; the direct save blocks for all of it
        assert data["medians"][f"{mode}_blocked"] <= data["medians"][f"{mode}_write"]
    assert data["blocked_ratio_async_over_sync"] == pytest.approx(
        data["per_round"]["async_blocked"][0] / data["per_round"]["sync_blocked"][0])
    # the file holds the weights and both AdamW moments, plus a little (counters, param groups, zip headers)
    assert 2.9 * data["state_bytes"] / 3 < data["file_bytes"] < 1.1 * data["state_bytes"]
    assert not list(tmp_path.glob("simmim-save-bench-*"))  # its files are removed afterwards


def test_save_section_refuses_a_model_that_does_not_fit_in_memory(monkeypatch, capsys):
    from simmim.benchmarks import save

    monkeypatch.setattr(save, "_available_host_bytes", lambda: 2**20)
    assert main(["benchmark", "--what", "save", "--model", "swinv2_pico", "--img-size", "32",
                 "--window-size", "4"]) == 2
    assert "GiB of host memory" in capsys.readouterr().err


def test_highres_times_one_step_and_reports_a_contender_that_does_not_fit():
    from simmim.benchmarks.highres import highres_section, one_step

    row = one_step("full+sequential", "swinv2_pico", 64, 4, cap_gib=None, device="cpu", threads=None)  # in-process
    assert row["fit"] and row["seconds"] > 0 and row["peak_gib"] >= row["before_gib"] > 0.05, row
    # its own process under a cap of 1 MiB beyond what it has mapped: the step cannot allocate
    starved = highres_section("swinv2_pico", 64, 4, contenders=("timm",), cap_gib=0.001, device="cpu", threads=1)
    assert starved.data["rows"][0]["fit"] is False and "did not fit in 0.001 GiB" in starved.table
