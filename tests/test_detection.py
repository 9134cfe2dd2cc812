"""The encoder as a torchvision detection backbone (issue 17 item 2): NCHW FPN levels at any image size, and one
Mask R-CNN training step that reaches the encoder (the README's Faster R-CNN recipe runs in test_readme_backbone)."""

import copy
from collections import OrderedDict

import torch
from conftest import perturb_
from torchvision.models.detection import MaskRCNN

from simmim.models import create_model, detection_backbone

TINY_RCNN = dict(num_classes=3, min_size=64, max_size=96, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=20,
                 box_batch_size_per_image=16, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                 box_detections_per_img=10)


def encoder():
    return perturb_(create_model("swinv2_pico", img_size=64, window_size=4, num_classes=0))


def test_backbone_gives_nchw_fpn_levels_from_the_stage_maps_at_any_size():
    enc = encoder().eval()
    reference = copy.deepcopy(enc)
    backbone = detection_backbone(enc, out_channels=32).eval()
    assert backbone.out_channels == 32 and backbone.body is enc
    x = torch.randn(1, 3, 72, 100)  # neither a multiple of 32 nor of the windows
    with torch.no_grad():
        out = backbone(x)
        maps = reference.forward_intermediates(x, intermediates_only=True)  # (B, C_i, h_i, w_i)
        normed = [norm(m) for norm, m in zip(backbone.norms, maps, strict=True)]
        expected = backbone.fpn(OrderedDict((str(i), m) for i, m in enumerate(normed)))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 18, 25), (1, 32, 9, 13), (1, 32, 5, 7), (1, 32, 3, 4),
                                                      (1, 32, 2, 2)]
    for key in out:
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=1e-6)
    # fewer stages: the encoder is pruned after the last one taken
    three = detection_backbone(encoder(), out_indices=(0, 1, 2), out_channels=16)
    assert len(three.body.layers) == 3 and list(three(x)) == ["0", "1", "2", "pool"]


def test_mask_rcnn_trains_one_step_on_the_encoder():
    enc = encoder()
    model = MaskRCNN(detection_backbone(enc, out_channels=32), **TINY_RCNN).train()
    images = [torch.rand(3, 72, 100), torch.rand(3, 64, 80)]
    masks = [torch.zeros(1, 72, 100, dtype=torch.uint8), torch.zeros(1, 64, 80, dtype=torch.uint8)]
    masks[0][0, 12:50, 10:40] = masks[1][0, 6:40, 5:30] = 1
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1]), "masks": masks[0]},
               {"boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks[1]}]
    before = enc.layers[1].blocks[0].attn.qkv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(enc.layers[1].blocks[0].attn.qkv.weight, before)  # the step moved the encoder
    with torch.no_grad():
        detections = model.eval()([torch.rand(3, 70, 90)])
    assert {"boxes", "labels", "scores", "masks"} <= set(detections[0])
