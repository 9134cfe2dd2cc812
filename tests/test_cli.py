"""The command line entry point."""

import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("argv,message", [
    (["benchmark", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["benchmark", "--rounds", "-2"], "--rounds: must be >= 1"),
    (["benchmark", "--iters", "x"], "--iters: expected an integer"),
    (["benchmark", "--what", "memory", "--memory-batch-sizes", "4", "4"], "two different batch sizes"),
    (["eval", "x.pt", "--data", "embedded:digits", "--sweep", "0:0"], "positive numbers"),
    (["eval", "x.pt", "--data", "embedded:digits", "--img-size", "0", "--window-size", "4"], "--img-size: must be"),
    (["eval", "x.pt", "--data", "embedded:digits", "--num-workers", "-1"], "--num-workers: must be >= 0"),
    (["export", "x.pt", "--format", "onnx", "--opset", "0"], "--opset: must be >= 1"),
    (["demo", "--finetune-epochs", "0"], "--finetune-epochs: must be >= 1"),
])
def test_bad_numbers_on_the_command_line_are_one_line_errors(argv, message, capsys):
    try:
        code = main(argv)  # commands that validate a value themselves return 2
    except SystemExit as exit_:  # argparse's usage error for a value its type refuses
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_import_and_version_do_not_load_torch():
    """``import simmim`` and ``simmim --version`` stay fast: the public names load torch on first use only."""
    code = ("import sys, simmim; from simmim.cli import build_parser; build_parser(); "
            "assert not {'torch', 'timm'} & set(sys.modules); "
            "from simmim import SimMIM; assert 'torch' in sys.modules and SimMIM.__name__ == 'SimMIM'")
    subprocess.run([sys.executable, "-c", code], check=True)
