"""ONNX export of SimMIM's other encoders (issue 20): Swin V1 and ViT (shared and per-block relative position bias)
run checkpoints -> `simmim export --format onnx` -> a graph onnxruntime runs at other batch sizes than the export's
with the PyTorch model's outputs. Tiny geometry (32 px) to keep the dynamo exporter to a few seconds per graph."""

import json

import numpy as np
import onnxruntime as ort  # dev extra: the ONNX checks run, never skip
import pytest
import torch
from conftest import perturb_

from simmim.checkpoint import save_checkpoint
from simmim.cli import main
from simmim.export import ONNX_ATOL
from simmim.models import create_encoder
from simmim.weights import geometry_metadata, model_from_weights, read_run_checkpoint

# (variant, kind, geometry): a Swin V1 classifier (32 px / W4: shifted windows with their mask in stage 0), a ViT
# fine-tuned classifier (a table per block) and a ViT pretraining encoder (one shared table, pooled features)
CASES = [
    ("swin_pico", "simmim-finetune", dict(img_size=32, window_size=4, num_classes=5)),
    ("vit_pico_ft", "simmim-finetune", dict(img_size=32, num_classes=5)),
    ("vit_pico", "simmim-pretrain", dict(img_size=32, num_classes=0)),
]


def run_checkpoint(path, name: str, kind: str, geometry: dict):
    """A run checkpoint as the engine writes it, every parameter perturbed so no block is the identity."""
    model = perturb_(create_encoder(name, **geometry), seed=3)
    meta = {"kind": kind, **geometry_metadata(model, name), "mean": [0.5] * 3, "std": [0.25] * 3}
    state = model.state_dict()
    if kind == "simmim-finetune":
        meta.update(num_classes=model.num_classes, classes=[f"c{i}" for i in range(model.num_classes)])
    else:
        state = {f"encoder.{k}": v for k, v in state.items()}
    return save_checkpoint({"model": state, "meta": meta, "step": 2}, path)


@pytest.mark.parametrize(("name", "kind", "geometry"), CASES, ids=[c[0] for c in CASES])
def test_onnx_export_of_other_encoders_runs_in_onnxruntime_like_pytorch(tmp_path, name, kind, geometry):
    ckpt = run_checkpoint(tmp_path / f"{name}.pt", name, kind, geometry)
    assert main(["export", str(ckpt), "--format", "onnx"]) == 0
    graph, card_path = tmp_path / f"{name}.onnx", tmp_path / f"{name}.onnx.json"
    card = json.loads(card_path.read_text())
    assert card["architecture"]["family"] == ("swin" if name.startswith("swin") else "vit")
    assert card["files"] == [graph.name] and card["onnx"]["exporter"] == "dynamo"
    assert 0 <= card["onnx"]["max_abs_diff_vs_pytorch"] <= ONNX_ATOL  # the exporter's own check, batch 3
    assert "fixed input size 32x32" in card["onnx"]["input_size"] and "log-CPB" not in card["onnx"]["input_size"]

    model = model_from_weights(read_run_checkpoint(ckpt))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    width = geometry["num_classes"] or model.num_features
    for batch in (1, 4):  # the graph was traced at batch 2
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        assert expected.shape == (batch, width) and expected.std() > 0.1  # non-trivial, so the check can fail
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ONNX_ATOL)
