"""The decoder's gradients keep the weight's layout (issue 17.7): DDP lays its buckets out like the parameters and
warned ``Grad strides do not match bucket view strides`` (a gradient copy each step) for the 1x1 conv, whose input
was a channels-last view. It shows on CPUs with more than one intra-op thread."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from simmim import SimMIM
from simmim.models import create_model


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread takes a conv kernel that happens to return the weight's layout
    yield
    torch.set_num_threads(before)


def test_ddp_gets_gradients_in_the_parameters_layout(two_threads):
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = SimMIM(create_model("swinv2_pico", img_size=32, window_size=4))
        ddp = nn.parallel.DistributedDataParallel(model)
        images = torch.randn(2, 3, 32, 32)
        mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        mask[:, :4] = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp(images, mask).loss.backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "Grad strides" in str(w.message)]  # warned once per process only: see below
    for name, p in model.named_parameters():  # what DDP compares, for every step
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), name
