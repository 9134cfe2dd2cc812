"""Where the hours go (simmim.perf): the FLOP count through the oneDNN Linear op, the MFU peak, data wait, ETA.
The logged scalars of a real run are checked in test_pretrain.py (check_perf_scalars)."""

import time

import pytest
import torch
from torch.utils.flop_counter import flop_registry

from simmim import SimMIM
from simmim.models import create_model, onednn_linear
from simmim.perf import PerfMeter, count_flops, format_duration, peak_flops

needs_onednn = pytest.mark.skipif(not onednn_linear.onednn_available(), reason="this torch has no oneDNN linear op")


def _step_flops(model: torch.nn.Module, backend: str, images: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """FLOPs of a forward + backward per op, with the encoder's Linear layers on ``backend``."""
    from torch.utils.flop_counter import FlopCounterMode

    model.encoder.set_linear_backend(backend)
    with FlopCounterMode(display=False) as counter:
        model(images, mask).loss.backward()
    model.zero_grad(set_to_none=True)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@needs_onednn
def test_the_onednn_linear_op_counts_the_flops_of_plain_linear(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_WORK", 0)  # every product of the tiny model through oneDNN
    torch.manual_seed(0)
    model = SimMIM(create_model("swinv2_pico", img_size=32, window_size=4, num_classes=0)).train()
    images, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 8, 8) > 0.4
    onednn, plain = _step_flops(model, "auto", images, mask), _step_flops(model, "aten", images, mask)
    assert onednn.get("simmim.onednn_matmul_nt", 0) > 0.5 * sum(onednn.values())  # the op did run, and counted
    assert "simmim.onednn_matmul_nt" not in plain
    assert sum(onednn.values()) == sum(plain.values())


@needs_onednn
def test_swinv2_tiny_forward_at_192_counts_7_gflop_with_the_formula_and_a_tenth_without():
    model = create_model("swinv2_tiny", img_size=192, window_size=12, num_classes=0).train()  # train: no bias cache
    x = torch.randn(1, 3, 192, 192)

    def forward():
        with torch.no_grad():
            model(x)

    with_formula = count_flops(forward)  # the same as with plain Linear layers (the test above, on a small model)
    formula = flop_registry.pop(torch.ops.simmim.onednn_matmul_nt)
    try:
        blind = count_flops(forward)
    finally:
        flop_registry[torch.ops.simmim.onednn_matmul_nt] = formula
    assert 6.5e9 < with_formula < 7.5e9
    assert blind < 0.15 * with_formula  # what the issue saw: the products in oneDNN were invisible to the counter


def test_mfu_peak_is_the_users_or_a_known_gpus_else_unknown(monkeypatch):
    assert peak_flops(torch.device("cpu"), "no") is None
    assert peak_flops(torch.device("cpu"), "bf16", user=2e12) == 2e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cuda = torch.device("cuda")
    assert peak_flops(cuda, "bf16") == 989e12 and peak_flops(cuda, "no") == 67e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, "fp16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, "bf16") is None


def test_data_wait_is_the_share_blocked_in_next_and_eta_uses_the_median_step():
    meter = PerfMeter(torch.device("cpu"))

    def slow():
        for i in range(4):
            time.sleep(0.05)  # the "loader" blocks 50 ms per batch
            yield i

    t0 = time.perf_counter()
    for _ in meter.timed(slow()):
        time.sleep(0.05)  # the "step" takes as long
        meter.step_done()
    values = meter.window(images=8, elapsed=time.perf_counter() - t0, steps_left=10)
    assert 0.35 < values["perf/data_wait"] < 0.65
    assert values["eta_sec"] == pytest.approx(10 * 0.1, rel=0.3)
    assert values["perf/images_per_s"] > 0 and "perf/mfu" not in values and "perf/tflops" not in values
    meter.flops_per_image, meter.peak = 1e9, 1e10
    values = meter.window(images=8, elapsed=1.0, steps_left=0)
    assert values["perf/data_wait"] == 0.0  # a new window
    assert values["perf/tflops"] == pytest.approx(8e-3) and values["perf/mfu"] == pytest.approx(0.8)
    text, postfix = meter.summary(values)
    assert "MFU 80.0%" in text and "(RSS)" in text and set(postfix) == {"img/s", "mfu", "data", "mem", "eta"}


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90000) == "1 days, 1:00:00"
    assert format_duration(float("nan")) == "?"
