"""The encoder contract (models/encoders.py, docs/encoders.md) for every family, Swin V1's SimMIM loss against the
official SimMIM forward re-stated on timm's modules, and official-layout Swin V1 checkpoints (pretrained with
decoder, and fine-tuned) read through the one weights reader, with timm's ``checkpoint_filter_fn`` as the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from simmim.masked_modeling import SimMIM
from simmim.models import FAMILIES, create_encoder, detect_family, family_of
from simmim.optim import param_groups
from simmim.weights import read_weights

# a tiny variant per family at 64 px (ViT: patch 16, a 4 x 4 grid)
TINY = {"swinv2": ("swinv2_pico", dict(img_size=64, window_size=4)),
        "swin": ("swin_pico", dict(img_size=64, window_size=4)),
        "vit": ("vit_base_patch16", dict(img_size=64, embed_dim=32, depth=2, num_heads=2))}
PICO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))  # swin_pico's shape, for the timm oracle


def tiny(family: str, **kw) -> torch.nn.Module:
    name, geometry = TINY[family]
    return create_encoder(name, **{**geometry, **kw})


@pytest.fixture(params=sorted(TINY))
def family(request) -> str:
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# the contract, for every family


def test_every_family_registered_has_a_tiny_variant_here():
    assert set(TINY) == set(FAMILIES) == {"swinv2", "swin", "vit"}


def test_contract_shapes_and_attributes(family):
    enc = tiny(family, num_classes=5)
    g = enc.geometry()
    assert g["family"] == family and g["variant"] == TINY[family][0] and family_of(g["variant"]).name == family
    assert (g["img_size"], g["patch_size"], g["encoder_stride"], g["in_chans"]) == ([64, 64], enc.patch_size,
                                                                                    enc.encoder_stride, 3)
    assert enc.mask_token is None
    enc.init_mask_token()
    assert enc.mask_token.shape == (1, 1, enc.patch_embed.proj.out_channels)
    x = torch.randn(2, 3, 64, 64)
    s = enc.encoder_stride
    z = enc.forward_features(x)
    assert z.shape == (2, 64 // s, 64 // s, enc.num_features)  # channels-last, normed
    assert enc(x).shape == (2, 5)
    enc.reset_classifier(0)
    assert enc(x).shape == (2, enc.num_features)
    # the official SimMIM Swin models exclude the mask token from weight decay; the official ViT does not
    assert ("mask_token" in enc.no_weight_decay()) == FAMILIES[family].windowed


def test_mask_replaces_tokens_after_the_patch_embedding(family):
    """A fully masked image gives the same features whatever its pixels; an unmasked one depends on them."""
    enc = perturb_(tiny(family, num_classes=0)).eval()
    enc.init_mask_token()
    h = 64 // enc.patch_size
    full = torch.ones(2, h, h, dtype=torch.bool)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc.forward_features(a, full), enc.forward_features(b, full))
    assert not torch.allclose(enc.forward_features(a, ~full), enc.forward_features(b, ~full))


def test_layer_ids_cover_every_parameter_in_order(family):
    enc = tiny(family, num_classes=5)
    ids = {n: enc.layer_id(n) for n, _ in enc.named_parameters()}
    assert min(ids.values()) == 0 and max(ids.values()) == enc.num_layer_ids - 1
    head = [n for n in ids if n.startswith("head.")]  # Swin: head.fc.*, ViT (BEiT layout): head.*
    assert ids["patch_embed.proj.weight"] == 0 and head and {ids[n] for n in head} == {enc.num_layer_ids - 1}
    assert set(ids.values()) == set(range(enc.num_layer_ids))  # every id is used


def test_swin_layer_ids_follow_the_official_get_swin_layer():
    """microsoft/SimMIM optimizer.py: official names (downsample at the END of stage i) -> sum(depths[:i+1]); the
    same parameter in timm's layout (start of stage i+1) must get the same id from our rule."""
    enc = create_encoder("swin_pico", img_size=64, window_size=4, num_classes=5)
    depths = (2, 2, 2, 2)
    assert enc.layer_id("layers.1.downsample.reduction.weight") == sum(depths[:1])  # official layers.0.downsample
    assert enc.layer_id("layers.3.downsample.norm.weight") == sum(depths[:3])
    assert enc.layer_id("layers.2.blocks.1.attn.qkv.weight") == sum(depths[:2]) + 1 + 1
    assert enc.layer_id("mask_token") == 0 and enc.layer_id("norm.weight") == sum(depths) + 1


def test_param_groups_take_layer_ids_from_the_encoder():
    enc = create_encoder("swin_pico", img_size=64, window_size=4, num_classes=5)
    groups = param_groups(enc, 0.05, layer_decay=0.9)
    n = enc.num_layer_ids
    for g in groups:
        lids = {enc.layer_id(name) for name in g["names"]}
        assert len(lids) == 1
        assert g["lr_scale"] == pytest.approx(0.9 ** (n - 1 - lids.pop()))
    tables = [name for g in groups if g["weight_decay"] == 0 for name in g["names"]]
    assert any(name.endswith("relative_position_bias_table") for name in tables)


def test_swinv2_layer_ids_equal_the_depths_rule():
    """SwinV2 through the contract gives the groups param_groups gave from depths (the SwinV2 path unchanged)."""
    enc = create_encoder("swinv2_pico", img_size=64, window_size=4, num_classes=5)
    by_contract = param_groups(enc, 0.05, layer_decay=0.75)
    by_depths = param_groups(enc, 0.05, layer_decay=0.75, depths=enc.depths)
    assert [(g["names"], g["lr_scale"], g["weight_decay"]) for g in by_contract] == \
        [(g["names"], g["lr_scale"], g["weight_decay"]) for g in by_depths]


def test_set_input_size_moves_the_geometry(family):
    enc = tiny(family, num_classes=0).eval()
    enc.set_input_size(96, window_size=6)
    assert enc.geometry()["img_size"] == [96, 96]
    assert enc.forward_features(torch.randn(1, 3, 96, 96)).shape[1:3] == (96 // enc.encoder_stride,) * 2


def test_unknown_variant_suggests_the_closest():
    from simmim.errors import UserError

    with pytest.raises(UserError, match="did you mean 'swin_base'"):
        create_encoder("swin_bsae")


def test_detect_family_tells_the_layouts_apart(family):
    enc = tiny(family, num_classes=0)
    assert detect_family(enc.state_dict()) is FAMILIES[family]


# ----------------------------------------------------------------------------------------------------------------
# parity with the official SimMIM Swin V1 forward


def official_simmim_loss(timm_swin: SwinTransformer, mask_token: torch.Tensor, decoder: torch.nn.Module,
                         x: torch.Tensor, mask: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """microsoft/SimMIM models/simmim.py (SwinTransformerForSimMIM.forward + SimMIM.forward) re-stated on timm's
    modules: tokens (B, L, C) after the patch embedding and its norm, ``x * (1 - w) + mask_token * w``, the stages,
    the norm, (B, C, H/32, W/32), Conv2d 1x1 + PixelShuffle on NCHW, L1 on masked pixels / in_chans."""
    t = timm_swin.patch_embed(x)  # (B, h, w, C): timm's embedding ends with the norm, as the official one
    B, h, w, C = t.shape
    t = t.reshape(B, h * w, C)
    tokens = mask_token.expand(B, h * w, -1)
    wgt = mask.flatten(1).unsqueeze(-1).type_as(tokens)
    t = (t * (1.0 - wgt) + tokens * wgt).reshape(B, h, w, C)
    z = timm_swin.norm(timm_swin.layers(t)).permute(0, 3, 1, 2)  # (B, C, H/32, W/32)
    x_rec = decoder(z)
    m = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous()
    return (F.l1_loss(x, x_rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / x.shape[1]


def test_swin_v1_simmim_loss_equals_the_official_forward():
    model = SimMIM(create_encoder("swin_pico", img_size=64, window_size=4, num_classes=0))
    perturb_(model)
    ref = SwinTransformer(img_size=64, window_size=4, num_classes=0, **PICO).eval()
    ref.load_state_dict({k.removeprefix("encoder."): v for k, v in model.state_dict().items()
                         if k.startswith("encoder.") and k != "encoder.mask_token"})
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    mask = torch.rand(3, 16, 16) < 0.6
    ours = model(x, mask).loss
    theirs = official_simmim_loss(ref, model.encoder.mask_token, model.decoder, x, mask)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert ours.item() > 0.1  # a real loss, not two zeros


# ----------------------------------------------------------------------------------------------------------------
# official-layout checkpoints


def official_swin_state(img: int, window: int, embed: int = 16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                        prefix: str = "encoder.", num_classes: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of microsoft/SimMIM's swin_transformer.py (SwinTransformer /
    SwinTransformerForSimMIM), written from that code's structure: PatchMerging (norm, reduction) at the END of
    stages 0..2, persistent relative_position_index and attn_mask buffers, ``head`` for a classifier, and for a
    SimMIM checkpoint ``encoder.mask_token`` and ``decoder.0``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {f"{prefix}patch_embed.proj.weight": r(embed, 3, 4, 4), f"{prefix}patch_embed.proj.bias": r(embed),
          f"{prefix}patch_embed.norm.weight": 1 + r(embed), f"{prefix}patch_embed.norm.bias": r(embed)}
    res = img // 4
    for i, (d, nh) in enumerate(zip(depths, heads, strict=True)):
        dim = embed * 2**i
        win = min(window, res)  # official: window = resolution where the map is not larger
        for j in range(d):
            b = f"{prefix}layers.{i}.blocks.{j}."
            sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                       b + "attn.relative_position_bias_table": r((2 * win - 1) ** 2, nh),
                       b + "attn.relative_position_index": torch.randint(0, (2 * win - 1) ** 2, (win**2, win**2),
                                                                         generator=g),
                       b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                       b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                       b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                       b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                       b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
            if j % 2 and res > window:  # shifted blocks save their mask
                sd[b + "attn_mask"] = torch.zeros((res // win) ** 2, win**2, win**2)
        if i < len(depths) - 1:
            sd.update({f"{prefix}layers.{i}.downsample.norm.weight": 1 + r(4 * dim),
                       f"{prefix}layers.{i}.downsample.norm.bias": r(4 * dim),
                       f"{prefix}layers.{i}.downsample.reduction.weight": r(2 * dim, 4 * dim)})
            res //= 2
    last = embed * 2 ** (len(depths) - 1)
    sd.update({f"{prefix}norm.weight": 1 + r(last), f"{prefix}norm.bias": r(last)})
    if prefix:
        sd.update({"encoder.mask_token": r(1, 1, embed), "decoder.0.weight": r(32**2 * 3, last, 1, 1),
                   "decoder.0.bias": r(32**2 * 3)})
    if num_classes:
        sd.update({"head.weight": r(num_classes, last), "head.bias": r(num_classes)})
    return sd


def timm_oracle(official: dict[str, torch.Tensor], img: int, window: int, num_classes: int = 0
                ) -> tuple[SwinTransformer, dict[str, torch.Tensor]]:
    """timm's own conversion of the official encoder keys (checkpoint_filter_fn) into a timm Swin at img/window."""
    ref = SwinTransformer(img_size=img, window_size=window, num_classes=num_classes, **PICO).eval()
    bare = {k.removeprefix("encoder."): v for k, v in official.items()
            if not k.startswith("decoder.") and k != "encoder.mask_token"}
    converted = checkpoint_filter_fn(bare, ref)
    ref.load_state_dict(converted)
    return ref, converted


def test_official_simmim_swin_checkpoint_loads_through_the_one_reader(tmp_path):
    official = official_swin_state(64, 4)
    path = tmp_path / "simmim_pretrain__swin_pico.pth"
    torch.save({"model": official, "epoch": 99}, path)  # the official files wrap the state dict in 'model'
    weights = read_weights(path)
    assert weights.source == "official"
    family = detect_family(weights.state_dict)
    assert family is FAMILIES["swin"]
    model = SimMIM(create_encoder("swin_pico", img_size=64, window_size=4, num_classes=0))
    model.load_state_dict(family.convert(weights.state_dict, model.encoder))
    ref, converted = timm_oracle(official, 64, 4)
    ours = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    ours.pop("mask_token")
    assert ours.keys() == converted.keys()
    for k, v in converted.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(model.encoder.mask_token, official["encoder.mask_token"], rtol=0, atol=0)
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16, 16) < 0.6
    model.eval()
    theirs = official_simmim_loss(ref, official["encoder.mask_token"], model.decoder, x, mask)
    assert abs(model(x, mask).loss.item() - theirs.item()) < 1e-5


def test_official_finetuned_swin_checkpoint_loads_at_another_window(tmp_path):
    """A fine-tuned official file (no encoder. prefix, head.weight) trained at 64 px/W4 loads into a classifier
    at 96 px/W6: tables resized as timm's checkpoint_filter_fn resizes them, the head mapped to head.fc."""
    official = official_swin_state(64, 4, prefix="", num_classes=7)
    path = tmp_path / "swin_pico_finetuned.pth"
    torch.save({"model": official}, path)
    weights = read_weights(path)
    enc = create_encoder("swin_pico", img_size=96, window_size=6, num_classes=7)
    enc.load_state_dict(FAMILIES["swin"].convert(weights.state_dict, enc))
    ref, converted = timm_oracle(official, 96, 6, num_classes=7)
    assert enc.layers[0].blocks[0].attn.relative_position_bias_table.shape == (11 * 11, 1)
    for k, v in converted.items():
        torch.testing.assert_close(enc.state_dict()[k], v, msg=k)
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(enc.eval()(x), ref(x))
