"""torch.compile with fullgraph=True at a fixed size, train and eval, every recompute mode (CPU, small backends).

The tests compile with the ``eager`` (graph capture only) and ``aot_eager`` (plus AOTAutograd's forward/backward
graphs) backends: a graph break fails them as it would fail inductor, in seconds instead of minutes.
"""

import pytest
import torch
import torch._dynamo
from conftest import perturb_
from torch._dynamo.backends.debugging import aot_eager

from simmim import SimMIM
from simmim.models import compile_model, create_model, onednn_linear
from simmim.models.onednn_linear import onednn_available


def _fresh(**kw):
    torch._dynamo.reset()
    return perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=10, drop_path_rate=0.0,
                                 **kw))


def test_eval_compiles_to_one_graph_and_does_not_recompile(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_WORK", 0)  # the oneDNN op even for pico's small products
    model = _fresh().eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compile_model(model, backend=backend)
        with torch._dynamo.config.patch(error_on_recompile=True):
            first, second = model(x), model(x)  # the bias cache no longer forces a recompile (or a break)
    assert len(graphs) == 1
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    if onednn_available():  # the oneDNN product stays one call in the compiled graph
        assert "simmim.onednn_matmul_nt" in str(graphs[0].graph)


@pytest.mark.parametrize("mode", ["none", "attention"])  # "full" is PyTorch's own checkpoint
def test_training_step_compiles_with_fullgraph(mode):
    model = _fresh()
    model.set_recompute(mode)
    simmim = SimMIM(model).train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16) < 0.6
    reference = SimMIM(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0,
                                    drop_path_rate=0.0)).train()
    reference.load_state_dict(simmim.state_dict())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compile_model(simmim, backend=backend)
    assert type(simmim.encoder).__name__ == "SwinTransformerV2" and "encoder.mask_token" in simmim.state_dict()
    for _ in range(2):
        for m in (simmim, reference):
            m.zero_grad()
            m(x, mask).loss.backward()
    assert len(graphs) == 1  # one graph, reused by the second step
    torch.testing.assert_close(simmim(x, mask).loss, reference(x, mask).loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(simmim.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_model_needs_a_backbone():
    with pytest.raises(ValueError, match="holds no encoder"):
        compile_model(torch.nn.Linear(2, 2))


def test_run_compile_trains_pretraining_and_fine_tuning_with_a_compiled_encoder(tmp_path, monkeypatch):
    """`run.compile=true` wiring: the encoder's forward goes through torch.compile(fullgraph=True), so any graph
    break fails the run. The eager backend keeps the test fast; the compiled kernels are covered above."""
    import simmim.finetune
    import simmim.pretrain
    from simmim.cli import main
    from simmim.models import compile_model

    compiled = []

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return compile_model(model, backend="eager", **kwargs)

    monkeypatch.setattr(simmim.pretrain, "compile_model", eager_compile)
    monkeypatch.setattr(simmim.finetune, "compile_model", eager_compile)
    tiny = ["model.img_size=32", "model.window_size=4", "run.progress=false", "schedule.max_steps=2"]
    assert main(["pretrain", "demo/pretrain", *tiny, "data.mask_patch_size=8", "data.batch_size=4",
                 "run.compile=true", "--output", str(tmp_path / "pre")]) == 0
    assert main(["finetune", "demo/finetune", *tiny, "data.batch_size=8", "ema.enabled=true", "run.compile=true",
                 "--pretrained", str(tmp_path / "pre" / "checkpoints" / "ckpt-00000002.pt"),
                 "--output", str(tmp_path / "ft")]) == 0
    assert compiled == ["SimMIM", "SwinTransformerV2"]
    state = torch.load(tmp_path / "ft" / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])  # checkpoints keep their keys
