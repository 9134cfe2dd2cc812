"""The command line entry point."""

import subprocess
import sys

from simmim import __version__
from simmim.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "simmim", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"simmim {__version__}"
    out = subprocess.run([sys.executable, "-m", "simmim", "--help"], capture_output=True, text=True, check=True)
    assert "models" in out.stdout


def test_models_lists_variants_with_counts(capsys):
    assert main(["models", "--img-size", "224", "--window-size", "14"]) == 0
    out = capsys.readouterr().out
    assert "swinv2_base" in out and "87.9M" in out and "14/14/14/7" in out


def test_models_bad_input_exits_2(capsys):
    assert main(["models", "swinv2_tinny"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["models", "swinv2_tiny", "--img-size", "200"]) == 2
    assert "not a multiple of 32" in capsys.readouterr().err


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "masked L1" in out and "val top-1" in out
    table = out[out.index("img_size"):].splitlines()
    assert table[1].split()[:2] == ["96", "W6"] and table[2].split()[:2] == ["128", "W8"]
    assert (tmp_path / "demo" / "export" / "swinv2_pico_digits.safetensors").is_file()
    assert list((tmp_path / "demo" / "pretrain" / "images").glob("*.png"))
    assert list((tmp_path / "demo").rglob("events.out.tfevents.*"))
