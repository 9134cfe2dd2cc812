"""simmim.compat: every private API of torch, accelerate and timm works on the installed versions, and each check
catches the breakage it is there for and takes its stated fallback (or fails naming the version)."""

import logging
import subprocess
import sys

import accelerate
import pytest
import timm
import torch
from conftest import CPU_ENV, perturb_

from simmim import compat
from simmim.models import create_model


def test_every_private_api_works_on_the_installed_versions():
    assert compat.problems() == {}  # an upgrade that breaks one fails here, even where a fallback hides it
    assert len(compat._PROBLEMS) == 8
    for name in compat._PROBLEMS:  # each is listed in the module's table, the one place a maintainer reads
        assert name.rsplit(".", 1)[-1] in compat.__doc__, name


def test_the_onednn_probe_catches_a_changed_signature_or_wrong_values(monkeypatch, caplog):
    def new_signature(x, w, b, attr, scalars, algorithm, extra):  # a keyword added without a default
        return torch.nn.functional.linear(x, w, b)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", new_signature)
    problem = compat._check_mkldnn_linear()
    assert problem.startswith(f"torch {torch.__version__}: TypeError")
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *args: x @ w.T)  # ignores bias
    assert "differs from F.linear" in compat._check_mkldnn_linear()
    with caplog.at_level(logging.WARNING, logger="simmim.compat"):
        monkeypatch.setitem(compat._PROBLEMS, "torch.ops.mkldnn._linear_pointwise", None)  # restored afterwards
        assert not compat._record("torch.ops.mkldnn._linear_pointwise", problem, "float32 products use F.linear")
    assert f"torch {torch.__version__}" in caplog.text and "F.linear" in caplog.text


def test_a_broken_onednn_op_at_import_means_f_linear_and_a_warning():
    """The probe runs when simmim is imported; a model built then computes every product in F.linear."""
    script = """
import torch
def changed(x, w, b, attr, scalars, algorithm, extra):
    raise AssertionError("the broken op was called")
torch.ops.mkldnn._linear_pointwise = changed
from simmim.models import create_model, onednn_linear
assert not onednn_linear.onednn_available()
onednn_linear.MIN_WORK = 0  # pico's products would reach the op
model = create_model("swinv2_pico", img_size=32, window_size=2, num_classes=0)
with torch.no_grad():
    auto = model(torch.randn(1, 3, 32, 32))
print("ran", tuple(auto.shape))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=CPU_ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ran (1, 128)" in out.stdout
    assert f"torch.ops.mkldnn._linear_pointwise cannot be used (torch {torch.__version__}: TypeError" in out.stderr


def test_softmax_backward_matches_autograd_with_and_without_the_private_op(monkeypatch):
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    probs = x.softmax(-1)
    (expected,) = torch.autograd.grad(probs, x, g)
    for private in (True, False):
        monkeypatch.setattr(compat, "SOFTMAX_BACKWARD_OUT", private)
        grad = g.clone()
        compat.softmax_backward_(grad, probs.detach())
        torch.testing.assert_close(grad, expected)  # in place either way


def test_recomputed_attention_is_unchanged_by_the_public_softmax_backward(monkeypatch):
    model = perturb_(create_model("swinv2_pico", img_size=32, window_size=2, num_classes=4, drop_path_rate=0.0))
    model.set_recompute("attention")
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for private in (True, False):
        monkeypatch.setattr(compat, "SOFTMAX_BACKWARD_OUT", private)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_a_version_counter_the_position_bias_is_not_cached(monkeypatch):
    attn = create_model("swinv2_pico", img_size=32, window_size=2).eval().blocks()[0].attn
    with torch.no_grad():
        first = attn.position_bias_tensor()
        assert attn.position_bias_tensor() is first  # cached while the parameters are unchanged
        monkeypatch.setattr(compat, "VERSION_COUNTER", False)
        assert attn.position_bias_tensor() is not first  # recomputed every time: no way to see in-place changes
        torch.testing.assert_close(attn.position_bias_tensor(), first)


def test_accelerate_without_reset_state_fails_naming_its_version(monkeypatch):
    from accelerate.state import AcceleratorState

    compat._check_accelerator_reset.cache_clear()
    monkeypatch.delattr(AcceleratorState, "_reset_state")
    try:
        with pytest.raises(RuntimeError, match=f"accelerate {accelerate.__version__} has no AcceleratorState"):
            compat.reset_accelerator_state()
    finally:
        compat._check_accelerator_reset.cache_clear()
        monkeypatch.undo()
    compat.reset_accelerator_state()  # restored: works again
    assert compat.problems() == {}


def test_timm_helpers_fall_back_or_fail_naming_the_version(monkeypatch):
    model = create_model("swinv2_pico", img_size=32, window_size=2)
    monkeypatch.setattr(compat, "_update_model_input_size", None)
    model.set_input_size(img_size=64, window_size=4)  # timm's record is skipped, the model still moves
    assert model.img_size == (64, 64)
    fail = compat._missing("timm.models._features.feature_take_indices", f"timm {timm.__version__}: gone")
    monkeypatch.setattr(compat, "_feature_take_indices", fail)
    with pytest.raises(RuntimeError, match=f"timm {timm.__version__}: gone"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def test_the_found_inf_check_catches_a_fused_step_that_ignores_it(monkeypatch):
    """The engine skips non-finite steps on the device through ``found_inf``; a torch whose fused AdamW stopped
    reading it must be caught by the check (the engine then decides on the host), not silently train on NaNs."""
    original = torch.optim.AdamW.step

    def ignoring_found_inf(self, *args, **kwargs):
        self.__dict__.pop("found_inf", None)
        return original(self, *args, **kwargs)

    compat._check_fused_found_inf.cache_clear()
    try:
        assert compat._check_fused_found_inf() is None  # the installed torch honours it
        compat._check_fused_found_inf.cache_clear()
        monkeypatch.setattr(torch.optim.AdamW, "step", ignoring_found_inf)
        assert "ignores found_inf=1" in compat._check_fused_found_inf()
        fused = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True)
        assert not compat.can_skip_on_device(fused)
        assert "found_inf" in " ".join(compat.problems())
    finally:
        compat._check_fused_found_inf.cache_clear()
        compat._PROBLEMS.pop("torch.optim.AdamW(fused=True).found_inf", None)
