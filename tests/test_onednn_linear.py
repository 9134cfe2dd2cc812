"""The oneDNN Linear path: the same products as F.linear up to summation order, and F.linear wherever it must be."""

import pytest
import torch
import torch.nn.functional as F

from simmim.models import create_model, onednn_linear
from simmim.models.onednn_linear import Linear, linear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("in_features", [96, 256], ids=["blas-weight-grad", "onednn-weight-grad"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_f_linear(in_features, bias):
    x = torch.randn(3, 400, in_features, requires_grad=True)
    w = torch.randn(72, in_features, requires_grad=True)
    b = torch.randn(72, requires_grad=True) if bias else None
    g = torch.randn(3, 400, 72)
    assert x.numel() * 72 >= onednn_linear.MIN_WORK  # large enough for the oneDNN path
    with torch.profiler.profile() as prof:
        linear(x, w, b)
    assert any("onednn_matmul_nt" in e.key for e in prof.key_averages())
    grads = []
    for fn in (linear, F.linear):
        out = fn(x, w, b)
        out.backward(g)
        grads.append((out.detach(), x.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone()))
        for t in (x, w, b):
            if t is not None:
                t.grad = None
    for ours, ref in zip(*grads, strict=True):
        if ref is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_falls_back_to_f_linear_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_WORK", 0)  # tiny tensors would take F.linear anyway
    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # autocast keeps its own bf16 product
    assert torch.equal(linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    assert torch.equal(linear(x, w, b, backend="aten"), F.linear(x, w, b))

    layer = Linear(16, 8)
    graph = torch.fx.symbolic_trace(layer).graph  # tracers see aten's linear, not the oneDNN op
    assert any(n.target is F.linear for n in graph.nodes)
    assert "mkldnn" not in str(graph)
    monkeypatch.setattr(onednn_linear, "MIN_WORK", 10**9)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # small products: the op's dispatch costs more


def onednn_calls(fn) -> int:
    """How many times ``fn()`` ran the oneDNN op (the profiler sees each call of the custom op)."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "onednn_matmul_nt" in e.key)


def test_model_backend_switch(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_WORK", 0)  # pico's products are below the size the op pays off at
    model = create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    linears = sum(isinstance(m, Linear) for m in model.modules())
    with torch.no_grad():
        assert onednn_calls(lambda: model(x)) == linears  # every block Linear and patch merging, once each
        fast = model(x)
        model.set_linear_backend("aten")
        assert onednn_calls(lambda: model(x)) == 0
        plain = model(x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert all(m.backend == "aten" for m in model.modules() if isinstance(m, Linear))
    with pytest.raises(ValueError, match="'auto' or 'aten'.*model.linear_backend"):
        model.set_linear_backend("mkl")


def test_linear_backend_is_a_config_key(monkeypatch):
    """``model.linear_backend`` (a dotted override on the command line) reaches every Linear of the run's model."""
    from simmim.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
    from simmim.configs import CONFIG_DIR
    from simmim.finetune import build_classifier
    from simmim.pretrain import build_encoder

    monkeypatch.setattr(onednn_linear, "MIN_WORK", 0)
    pretrain = CONFIG_DIR / "demo" / "pretrain.yaml"
    assert load_config(PretrainConfig, pretrain).model.linear_backend == "auto"
    for backend in ("aten", "auto"):
        cfg = load_config(PretrainConfig, pretrain, [f"model.linear_backend={backend}"])
        encoder = build_encoder(cfg).eval()
        assert {m.backend for m in encoder.modules() if isinstance(m, Linear)} == {backend}
        x = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
        with torch.no_grad():
            calls = onednn_calls(lambda enc=encoder, x=x: enc(x))
        assert (calls > 0) == (backend == "auto")
    cfg = load_config(FinetuneConfig, CONFIG_DIR / "demo" / "finetune.yaml", ["model.linear_backend=aten"])
    model, _ = build_classifier(cfg, num_classes=3)
    assert {m.backend for m in model.modules() if isinstance(m, Linear)} == {"aten"}
    with pytest.raises(ConfigError, match="model.linear_backend"):
        load_config(PretrainConfig, pretrain, ["model.linear_backend=mkl"])
