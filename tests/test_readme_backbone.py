"""The README's snippets for using the encoder in detection and segmentation run as written (on swinv2_pico, the
names and sizes swapped), and give the maps our own forward_intermediates gives."""

import re
from pathlib import Path

import pytest
import torch
from test_finetune import pretrain_checkpoint

from simmim.cli import main
from simmim.weights import model_from_weights, read_run_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
SWAP = {"simmim_swinv2_base": "simmim_swinv2_pico", "swinv2b": "encoder", "img_size=192, window_size=12":
        "img_size=64, window_size=4", "torch.randn(1, 3, 800, 1344)": "X"}  # X: a 96x128 image, see below


def snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Using the encoder for detection and segmentation")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("which", [0, 1], ids=["timm", "transformers"])
def test_readme_dense_task_snippets_run(which, tmp_path, monkeypatch, capsys):
    code = snippets()[which]
    for old, new in SWAP.items():
        code = code.replace(old, new)
    ckpt = pretrain_checkpoint(tmp_path)  # perturbed swinv2_pico weights (64 px / W4): a fresh model cannot match
    assert main(["export", str(ckpt), "--out", str(tmp_path / "encoder.safetensors")]) == 0
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "encoder-hf")]) == 0
    monkeypatch.chdir(tmp_path)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))  # not a multiple of the windows
    scope: dict = {"X": x}
    exec(code, scope)
    assert [tuple(f.shape) for f in scope["features"]] == [(1, 16, 24, 32), (1, 32, 12, 16), (1, 64, 6, 8),
                                                            (1, 128, 3, 4)]
    with torch.no_grad():
        ours = model_from_weights(read_run_checkpoint(ckpt)).forward_intermediates(x, intermediates_only=True)
    for got, expected in zip(scope["features"], ours, strict=True):
        torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
