"""timm's generic model tests (timm/tests/test_models.py), adapted to our class built through timm's registry.

Each test below keeps the checks of the timm test it names, on ``simmim_swinv2_pico`` with the registry's default
config (192 px, window 12) and timm's reduced test sizes: timm shrinks the input of models without a fixed input
size (backward 128 px, features 96 px), which here also exercises the padding path. Not adapted: torch.jit.script
(our model is not scriptable; ``torch.jit.trace`` is tested instead) and the pretrained-weight downloads.
"""

import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import simmim.models  # noqa: F401  (registers the simmim_* names)

MODEL = "simmim_swinv2_pico"
TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_FFEAT_SIZE, TARGET_FX_SIZE = 384, 128, 96, 128


def input_size(model: torch.nn.Module, target: int | None = None) -> tuple[int, int, int]:
    """timm's ``_get_input_size``: the config's size, capped at ``target`` unless the input size is fixed."""
    size = model.default_cfg["input_size"]
    if model.default_cfg.get("fixed_input_size") or not target:
        return size
    return tuple(min(s, target) for s in size)


def test_model_forward():
    model = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FWD_SIZE))
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1 and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_model_backward():
    model = timm.create_model(MODEL, pretrained=False, num_classes=42).train()
    out = model(torch.randn(2, *input_size(model, TARGET_BWD_SIZE)))
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


def test_model_default_cfgs():
    model = timm.create_model(MODEL, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state_dict = model.default_cfg, model.state_dict()
    pool_size = cfg["pool_size"]
    spatial, feat = get_spatial_dim(model.output_fmt), get_channel_dim(model.output_fmt)
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        out = model.forward_features(x)
        pre = model.forward_head(out, pre_logits=True)
        assert (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size
        assert out.shape[feat] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.ndim == 4 and (unpooled.shape[spatial[0]], unpooled.shape[spatial[1]]) == pool_size
        fresh = timm.create_model(MODEL, pretrained=False, num_classes=0, global_pool="").eval()
        assert fresh(x).shape == unpooled.shape
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict


def _check_feature_maps(outputs, channels, reductions, size, output_fmt):
    feat, spatial = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[feat] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert o.shape[spatial[0]] <= math.ceil(size[0] / r) + 1
        assert o.shape[spatial[1]] <= math.ceil(size[1] / r) + 1


def test_model_forward_features():
    model = timm.create_model(MODEL, pretrained=False, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    size = input_size(model, TARGET_FFEAT_SIZE)
    with torch.no_grad():
        outputs = model(torch.randn(1, *size))
    _check_feature_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(), size[1:],
                        getattr(model, "output_fmt", "NCHW"))


def test_model_forward_intermediates_features():
    model = timm.create_model(MODEL, pretrained=False, features_only=True, feature_cls="getter").eval()
    size = input_size(model, TARGET_FFEAT_SIZE)
    with torch.no_grad():
        outputs = model(torch.randn(1, *size))
    _check_feature_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(), size[1:],
                        getattr(model, "output_fmt", "NCHW"))


def test_model_forward_intermediates():
    model = timm.create_model(MODEL, pretrained=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = input_size(model, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        _check_feature_maps(intermediates, info.channels(), info.reduction(), size[1:], "NCHW")
        assert torch.allclose(final, model.forward_features(x))
        model.set_grad_checkpointing()
        checkpointed, _ = model.forward_intermediates(x, output_fmt="NCHW")
        assert torch.allclose(final, checkpointed, rtol=1e-4, atol=1e-5)


def _create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's helper: torchvision's feature extractor returning the graph's output node(s), with timm's leaves."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return_nodes = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return_nodes = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def test_model_forward_fx():
    model = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FX_SIZE))
    with torch.inference_mode():
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(x).values()))
        # graphs hold aten ops; eager float32 CPU products run in oneDNN (another summation order): equal within
        # float error, and bit-equal to the eager model on the aten backend
        torch.testing.assert_close(fx_outputs, model(x), rtol=1e-5, atol=1e-5)
        model.set_linear_backend("aten")
        outputs = model(x)
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


def test_model_backward_fx():
    model = timm.create_model(MODEL, pretrained=False, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(torch.randn(2, *input_size(model, TARGET_BWD_SIZE))).values()))
    outputs.mean().backward()
    for name, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_model_forward_torchscript_trace():
    """timm scripts; our model traces (``torch.jit.trace``) at a fixed size (the padding it needs is baked in)."""
    model = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FX_SIZE))
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)  # eager products: oneDNN
        model.set_linear_backend("aten")
        assert torch.equal(traced(x), model(x))


def test_model_forward_torch_export_dynamic_batch():
    model = timm.create_model(MODEL, pretrained=False).eval()
    size = input_size(model, TARGET_FX_SIZE)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (torch.randn(2, *size),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(3, *size)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("indices", [None, 2, [0, -1]])
def test_prune_intermediate_layers(indices):
    """timm's pruning contract: the pruned model returns the same intermediates for the indices it kept."""
    model = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FFEAT_SIZE))
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices, prune_head=True)
        torch.testing.assert_close(model.forward_intermediates(x, indices=kept, intermediates_only=True), expected)
