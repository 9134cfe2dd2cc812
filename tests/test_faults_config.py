"""Fault injection, config files (issue 15 item 12): absurd YAML, in a file or an override, ends in one line naming
the file (or the override) and the problem, exit 2, no traceback, and the output directory exactly as it was.
Each case is refused before any model is built, so the whole file runs in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_faults import snapshot

from simmim.cli import main

DEEP = 20000  # PyYAML composes nested nodes recursively: this deep was a RecursionError traceback


def _laughs(levels: int = 9) -> str:
    """A YAML list whose aliases would expand to 9**levels items ("billion laughs"); PyYAML shares them."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def _refused(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run the CLI into an output directory that holds a user's file; return its one error line."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err[:2000]
    assert len(err) < 400, err  # one readable line, whatever the input's size
    assert snapshot(out) == before
    return err


@pytest.mark.parametrize("text", ["[" * DEEP + "]" * DEEP, "{a: " * DEEP + "1" + "}" * DEEP],
                         ids=["sequence", "mapping"])
def test_yaml_nested_20000_deep_in_a_file_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(f"model:\n  img_size: {text}\n")
    err = _refused(capsys, tmp_path, ["pretrain", str(path)])
    assert f"config {path}, line 2" in err and "nested more than" in err


def test_yaml_nested_20000_deep_in_an_override_is_one_line(tmp_path, capsys):
    err = _refused(capsys, tmp_path, ["pretrain", "demo/pretrain", "model.img_size=" + "[" * DEEP + "]" * DEEP])
    assert "override 'model.img_size=[[[" in err and "nested more than" in err


def test_nesting_a_config_needs_is_accepted(tmp_path):
    from simmim.config import PretrainConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pretrained_window_sizes: [12, 12, 12, 6]\ndata:\n  crop_scale: [0.5, 1.0]\n")
    assert load_config(PretrainConfig, path).model.pretrained_window_sizes == (12, 12, 12, 6)


@pytest.mark.parametrize("key, expected", [("data.path", "data.path: expected a string"),
                                           ("data.mean", "data.mean[0]: expected a number")])
def test_billion_laughs_is_refused_in_one_short_line(tmp_path, capsys, key, expected):
    """The aliases are never expanded, and the error shows a cut repr (the full one was 43 million items)."""
    section, name = key.split(".")
    path = tmp_path / "laughs.yaml"
    path.write_text(f"{section}:\n  {name}: {_laughs()}\n")
    assert expected in _refused(capsys, tmp_path, ["pretrain", str(path)])


def test_an_integer_too_long_for_python_is_one_line(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("data:\n  batch_size: " + "9" * (sys.get_int_max_str_digits() + 1) + "\n")
    err = _refused(capsys, tmp_path, ["pretrain", str(path)])
    assert f"config {path}, line 2, column 15: an integer of" in err and "too long" in err


def test_a_file_too_big_to_be_a_config_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")  # e.g. a data file passed as the config
    assert "is it the right file" in _refused(capsys, tmp_path, ["pretrain", str(path)])


def test_removed_grad_checkpointing_in_a_file_names_its_replacement(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  grad_checkpointing: true\n")
    for command in ("pretrain", "finetune"):
        err = _refused(capsys, tmp_path, [command, str(path)])
        assert "'model.grad_checkpointing' was removed; use model.recompute=full" in err
