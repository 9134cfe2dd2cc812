"""SimMIM's ViT-B/16 (models/vit.py) against oracles that are not our own code: a re-statement of the official
``VisionTransformerForSimMIM`` + ``SimMIM`` forward (official models/vision_transformer.py, models/simmim.py), timm's
``Beit`` loaded through timm's ``checkpoint_filter_fn``, official-layout fixtures whose keys and shapes are written
from the official code, and the official ``get_vit_layer`` / ``utils.py`` resize maths re-stated here.

Tiny models: 64 px, patch 16 (a 4 x 4 grid), embed 32, 2 heads, depth 2-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit, checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer

from simmim import SimMIM
from simmim.errors import UserError
from simmim.models.vit import (
    VIT_VARIANTS,
    convert_official_vit,
    create_vit,
    is_vit_state_dict,
    resize_rel_pos_table,
    vit_linear_probe_features,
)

TINY = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
C, HEADS, PATCH = 32, 2, 16


def official_index(h: int, w: int) -> torch.Tensor:
    """The official RelativePositionBias.relative_position_index for an h x w grid (persistent in its checkpoints)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, L)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # (L, L, 2)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, :], index[:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def official_keys(depth: int, grid: int, pretrained: bool, num_classes: int = 0) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official SimMIM ViT checkpoint's ``model`` (no absolute position embedding, q/v biases,
    layer scale), from the official code: pretrained = VisionTransformerForSimMIM (shared bias, final norm) inside
    SimMIM (``encoder.`` + ``decoder.0``); fine-tuned = VisionTransformer (a bias per block, fc_norm, head)."""
    rows, L = (2 * grid - 1) ** 2 + 3, grid * grid + 1
    keys = {"cls_token": (1, 1, C), "patch_embed.proj.weight": (C, 3, PATCH, PATCH), "patch_embed.proj.bias": (C,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "gamma_1": (C,), b + "gamma_2": (C,), b + "norm1.weight": (C,), b + "norm1.bias": (C,),
                     b + "attn.q_bias": (C,), b + "attn.v_bias": (C,), b + "attn.qkv.weight": (3 * C, C),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,), b + "norm2.weight": (C,),
                     b + "norm2.bias": (C,), b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
                     b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,)})
        if not pretrained:
            keys.update({b + "attn.relative_position_bias_table": (rows, HEADS),
                         b + "attn.relative_position_index": (L, L)})
    if pretrained:
        keys.update({"rel_pos_bias.relative_position_bias_table": (rows, HEADS),
                     "rel_pos_bias.relative_position_index": (L, L), "norm.weight": (C,), "norm.bias": (C,),
                     "mask_token": (1, 1, C)})
        keys = {f"encoder.{k}": v for k, v in keys.items()}
        keys.update({"decoder.0.weight": (PATCH**2 * 3, C, 1, 1), "decoder.0.bias": (PATCH**2 * 3,)})
    else:
        keys.update({"fc_norm.weight": (C,), "fc_norm.bias": (C,), "head.weight": (num_classes, C),
                     "head.bias": (num_classes,)})
    return keys


def official_checkpoint(depth: int = 2, grid: int = 4, pretrained: bool = True, num_classes: int = 5,
                        seed: int = 0) -> dict:
    """``{'model': state dict}`` in the official layout with random values (index buffers as the official code)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(depth, grid, pretrained, num_classes).items():
        sd[k] = official_index(grid, grid) if k.endswith("relative_position_index") else \
            0.3 * torch.randn(shape, generator=g) + (1.0 if k.endswith(("norm1.weight", "norm2.weight")) else 0.0)
    return {"model": sd}


def official_simmim_loss(sd: dict, x: torch.Tensor, mask: torch.Tensor, depth: int) -> torch.Tensor:
    """The official ``SimMIM(VisionTransformerForSimMIM)`` forward re-stated on an official state dict: mask token
    after the patch embedding, CLS, shared relative bias, pre-norm blocks with layer scale, final norm, 1x1 conv +
    PixelShuffle(16), L1 on masked pixels / in_chans."""
    e = "encoder."
    grid = x.shape[-1] // PATCH
    t = F.conv2d(x, sd[e + "patch_embed.proj.weight"], sd[e + "patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2)  # (B, L, C)
    B, L, _ = t.shape
    w = mask.flatten(1).unsqueeze(-1).float()
    t = t * (1 - w) + sd[e + "mask_token"].expand(B, L, -1) * w
    t = torch.cat([sd[e + "cls_token"].expand(B, -1, -1), t], dim=1)
    index = official_index(grid, grid)
    bias = sd[e + "rel_pos_bias.relative_position_bias_table"][index.view(-1)].view(L + 1, L + 1, -1)
    bias = bias.permute(2, 0, 1)  # (nH, N, N)
    for i in range(depth):
        b = f"{e}blocks.{i}."
        y = F.layer_norm(t, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv_bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(C), sd[b + "attn.v_bias"]])
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], qkv_bias).reshape(B, L + 1, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (C // HEADS) ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(B, L + 1, C), sd[b + "attn.proj.weight"],
                     sd[b + "attn.proj.bias"])
        t = t + sd[b + "gamma_1"] * y
        y = F.layer_norm(t, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "gamma_2"] * y
    t = F.layer_norm(t, (C,), sd[e + "norm.weight"], sd[e + "norm.bias"], eps=1e-6)
    z = t[:, 1:].permute(0, 2, 1).reshape(B, C, grid, grid)
    rec = F.pixel_shuffle(F.conv2d(z, sd["decoder.0.weight"], sd["decoder.0.bias"]), PATCH)
    m = mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).unsqueeze(1).float()
    return ((x - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3


def timm_beit(finetune: bool, depth: int = 2, num_classes: int = 0, img_size: int = 64) -> Beit:
    """timm's own Beit with the official SimMIM ViT's switches (the oracle model)."""
    return Beit(img_size=img_size, patch_size=PATCH, embed_dim=C, depth=depth, num_heads=HEADS, qkv_bias=True,
                init_values=0.1, use_abs_pos_emb=False, use_shared_rel_pos_bias=not finetune,
                use_rel_pos_bias=finetune, global_pool="avg", use_fc_norm=finetune, num_classes=num_classes).eval()


def inputs(grid: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, grid * PATCH, grid * PATCH, generator=g)
    mask = torch.rand(2, grid, grid, generator=g) < 0.6
    mask[:, 0, 0] = True  # at least one masked patch per image
    return x, mask


# ----------------------------------------------------------------------------------------------------------------
# the SimMIM loss equals the official model's


def test_simmim_loss_equals_the_official_forward_on_official_weights():
    ckpt = official_checkpoint(depth=2)
    model = SimMIM(create_vit("vit_base_patch16", num_classes=0, **TINY)).eval()
    model.load_state_dict(convert_official_vit(ckpt["model"], model.encoder), strict=True)
    x, mask = inputs()
    ours = model(x, mask)
    ref = official_simmim_loss(ckpt["model"], x, mask, depth=2)
    assert ours.pred.shape == x.shape
    torch.testing.assert_close(ours.loss, ref, rtol=0, atol=1e-5)
    assert ours.loss.item() > 0.1  # a real loss, not a degenerate 0 = 0
    # the masked tokens matter: another mask gives another loss on both sides, still equal
    other = ~mask
    torch.testing.assert_close(model(x, other).loss, official_simmim_loss(ckpt["model"], x, other, 2), atol=1e-5,
                               rtol=0)


def test_our_simmim_state_dict_is_the_official_layout():
    model = SimMIM(create_vit("vit_base_patch16", num_classes=0, **TINY))
    official = {k: v for k, v in official_keys(2, 4, pretrained=True).items()
                if not k.endswith("relative_position_index")}  # a buffer ours rebuilds, as timm's Beit
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official


def test_mask_token_replaces_exactly_the_masked_patches():
    enc = create_vit("vit_base_patch16", num_classes=0, **TINY)
    enc.init_mask_token()
    x, mask = inputs()
    y = x.clone()
    cells = mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).unsqueeze(1).expand_as(x)
    y[cells] = torch.randn(int(cells.sum()))  # new pixels under the mask only
    torch.testing.assert_close(enc.forward_features(x, mask), enc.forward_features(y, mask), rtol=0, atol=0)
    assert not torch.allclose(enc.forward_features(x), enc.forward_features(y))


# ----------------------------------------------------------------------------------------------------------------
# official checkpoints: pretrained (with decoder) and fine-tuned, against timm's checkpoint_filter_fn


def test_official_pretrained_checkpoint_loads_as_timm_loads_it():
    ckpt = official_checkpoint(depth=2)
    enc = create_vit("vit_base_patch16", num_classes=0, **TINY).eval()
    enc.init_mask_token()
    sd = convert_official_vit(ckpt["model"], enc)
    assert not any(k.endswith("relative_position_index") for k in sd)
    assert {"decoder.0.weight", "decoder.0.bias", "encoder.mask_token"} <= set(sd)
    enc.load_state_dict({k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")},
                        strict=True)
    oracle = timm_beit(finetune=False)
    bare = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items()
            if k.startswith("encoder.") and k != "encoder.mask_token"}
    oracle.load_state_dict(checkpoint_filter_fn(bare, oracle), strict=True)
    x, _ = inputs()
    tokens = oracle.forward_features(x)[:, 1:]  # (B, L, C) after the final norm
    torch.testing.assert_close(enc.forward_features(x), tokens.reshape(2, 4, 4, C), rtol=0, atol=1e-6)
    torch.testing.assert_close(enc(x), oracle(x), rtol=0, atol=1e-6)  # mean of the normed tokens


def test_official_finetuned_checkpoint_gives_timms_logits():
    ckpt = official_checkpoint(depth=2, pretrained=False, num_classes=5)
    enc = create_vit("vit_base_patch16_ft", num_classes=5, **TINY).eval()
    enc.load_state_dict(convert_official_vit(ckpt["model"], enc), strict=True)
    oracle = timm_beit(finetune=True, num_classes=5)
    oracle.load_state_dict(checkpoint_filter_fn(ckpt, oracle), strict=True)
    x, _ = inputs()
    torch.testing.assert_close(enc(x), oracle(x), rtol=0, atol=1e-6)
    assert enc(x).shape == (2, 5)


def test_pretrained_shared_bias_is_copied_into_every_fine_tuning_block():
    ckpt = official_checkpoint(depth=3)
    enc = create_vit("vit_base_patch16_ft", num_classes=5, **{**TINY, "depth": 3}).eval()
    sd = convert_official_vit(ckpt["model"], enc)
    shared = ckpt["model"]["encoder.rel_pos_bias.relative_position_bias_table"]
    assert "encoder.rel_pos_bias.relative_position_bias_table" not in sd
    for i in range(3):
        torch.testing.assert_close(sd[f"encoder.blocks.{i}.attn.relative_position_bias_table"], shared, rtol=0, atol=0)
    assert "encoder.norm.weight" not in sd  # the pretrained final norm is not used by a mean-pooling model
    torch.testing.assert_close(sd["encoder.fc_norm.weight"], torch.ones(C))
    enc_sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    enc_sd.pop("mask_token")
    missing, unexpected = enc.load_state_dict(enc_sd, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    # oracle: the official remap (utils.remap_pretrained_keys_vit) re-stated, then timm's loader
    oracle = timm_beit(finetune=True, depth=3, num_classes=5)
    remapped = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    table = remapped.pop("rel_pos_bias.relative_position_bias_table")
    remapped.update({f"blocks.{i}.attn.relative_position_bias_table": table.clone() for i in range(3)})
    oracle.load_state_dict(checkpoint_filter_fn(remapped, oracle), strict=False)
    x, _ = inputs()
    torch.testing.assert_close(enc.forward_head(enc.forward_features(x), pre_logits=True),
                               oracle.forward_head(oracle.forward_features(x), pre_logits=True), rtol=0, atol=1e-6)


def test_a_fine_tuned_checkpoint_into_the_pretraining_encoder_names_the_variant():
    ckpt = official_checkpoint(depth=2, pretrained=False)
    with pytest.raises(UserError, match="vit_base_patch16_ft"):
        convert_official_vit(ckpt["model"], create_vit("vit_base_patch16", num_classes=0, **TINY))


def test_detects_vit_checkpoints_and_nothing_else():
    assert is_vit_state_dict(official_checkpoint(pretrained=True)["model"])
    assert is_vit_state_dict(official_checkpoint(pretrained=False)["model"])
    assert is_vit_state_dict(create_vit("vit_base_patch16_ft", num_classes=3, **TINY).state_dict())
    assert is_vit_state_dict(timm_beit(finetune=False).state_dict())
    plain_vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    assert not is_vit_state_dict(plain_vit.state_dict())  # timm's ViT: fused qkv bias, no BEiT parts
    from simmim.models import create_model
    assert not is_vit_state_dict(create_model("swinv2_pico", img_size=32, window_size=4).state_dict())


# ----------------------------------------------------------------------------------------------------------------
# the relative position table at another size


def official_offsets(src: int, dst: int) -> list[float]:
    """Where the official utils.py places the old offsets (geometric steps whose sum reaches dst // 2)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


@pytest.mark.parametrize("fn", ["linear", "cubic"])
@pytest.mark.parametrize("dst", [5, 6])
def test_table_resize_is_the_official_cubic_through_geometric_offsets(fn, dst):
    src_grid, dst_grid = (4, 4), (dst, dst)  # 64 -> 80 / 96 px: 7 x 7 offsets -> 9 x 9 / 11 x 11
    n = 2 * dst - 1
    ys = torch.tensor(official_offsets(7, n), dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, ys, indexing="ij")
    # the new offsets; beyond the outermost old one (q is capped at 1.5: 96 px) the official interp2d holds the edge
    ty = torch.arange(-(n // 2), n // 2 + 1, dtype=torch.float64).clamp(ys[0], ys[-1])
    tyy, txx = torch.meshgrid(ty, ty, indexing="ij")

    def f(y, x):  # one function per head; polynomials of degree <= 3 per axis are reproduced by a cubic spline
        return torch.stack([0.3 * y - 0.2 * x, 0.01 * y**3 - 0.02 * x**2 * y + 0.1 * x] if fn == "cubic" else
                           [0.3 * y - 0.2 * x, -0.1 * y + 0.05 * x], dim=-1).reshape(-1, 2)

    extra = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    table = torch.cat([f(yy, xx), extra]).float()
    out = resize_rel_pos_table(table, src_grid, dst_grid)
    assert out.shape == (n * n + 3, 2)
    torch.testing.assert_close(out[:-3].double(), f(tyy, txx), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[-3:], table[-3:], rtol=0, atol=0)  # the CLS entries are kept
    timm_linear = resize_rel_pos_bias_table(table, new_window_size=dst_grid, new_bias_shape=(n * n + 3, 2))
    if fn == "linear":  # timm places the offsets as BEiT does and interpolates linearly: same on a linear table
        torch.testing.assert_close(out, timm_linear, rtol=0, atol=1e-4)
    else:  # ... but not on a cubic one, which only the official cubic reproduces
        assert (out - timm_linear).abs().max() > 1e-2
    assert resize_rel_pos_table(table, src_grid, src_grid) is table


def test_set_input_size_grows_the_tables_like_the_weight_conversion():
    small = create_vit("vit_base_patch16", num_classes=0, **TINY).eval()
    with torch.no_grad():
        for n, p in small.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_()
    loaded = create_vit("vit_base_patch16", num_classes=0, **{**TINY, "img_size": 96}).eval()
    loaded.load_state_dict(convert_official_vit(small.state_dict(), loaded), strict=True)
    before = small.rel_pos_bias.relative_position_bias_table.detach().clone()
    small.set_input_size(96)
    table = small.rel_pos_bias.relative_position_bias_table
    assert table.shape == (11 * 11 + 3, HEADS) and small.grid_size == (6, 6) and small.img_size == (96, 96)
    torch.testing.assert_close(table[(11 * 11) // 2], before[(7 * 7) // 2], rtol=0, atol=1e-6)  # offset (0, 0)
    torch.testing.assert_close(table[-3:], before[-3:], rtol=0, atol=0)
    torch.testing.assert_close(table, loaded.rel_pos_bias.relative_position_bias_table, rtol=0, atol=0)
    index = small.rel_pos_bias.relative_position_index
    assert index.shape == (37, 37) and int(index.max()) == 11 * 11 + 2
    torch.testing.assert_close(index, official_index(6, 6))
    x, mask = inputs(grid=6)
    small.init_mask_token()
    out = small.forward_features(x, mask)
    assert out.shape == (2, 6, 6, C) and out.isfinite().all()
    torch.testing.assert_close(small.forward_features(x), loaded.forward_features(x), rtol=0, atol=1e-6)
    assert small.geometry()["img_size"] == [96, 96]


def test_fine_tuning_at_another_size_resizes_every_block_table():
    ckpt = official_checkpoint(depth=2)
    enc = create_vit("vit_base_patch16_ft", num_classes=0, **{**TINY, "img_size": 96})
    sd = convert_official_vit(ckpt["model"], enc)
    want = resize_rel_pos_table(ckpt["model"]["encoder.rel_pos_bias.relative_position_bias_table"], (4, 4), (6, 6))
    for i in range(2):
        torch.testing.assert_close(sd[f"encoder.blocks.{i}.attn.relative_position_bias_table"], want)


# ----------------------------------------------------------------------------------------------------------------
# layer ids, linear probe, contract facts


BASE = [v for v in VIT_VARIANTS if v.startswith("vit_base")]  # the pico pair is for tests


@pytest.fixture(scope="module")
def base() -> dict:
    """Both ViT-B/16 variants on the meta device (shapes only), with SimMIM's mask token."""
    with torch.device("meta"):
        encoders = {v: create_vit(v, num_classes=1000 if v.endswith("_ft") else 0) for v in BASE}
        for enc in encoders.values():
            enc.init_mask_token()
    return encoders


def official_vit_layer(name: str, num_layers: int) -> int:
    """get_vit_layer of the official SimMIM optimizer.py (num_layers = depth + 2)."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


@pytest.mark.parametrize("variant", BASE)
def test_layer_ids_are_the_official_ones_for_every_base_parameter(base, variant):
    enc = base[variant]
    assert enc.num_layer_ids == 14
    names = [n for n, _ in enc.named_parameters()]
    assert len(names) > 150 and "mask_token" in names
    for n in names:
        assert enc.layer_id(n) == official_vit_layer(n, 14), n
        assert enc.layer_id(f"encoder.{n}") == enc.layer_id(n)
    ids = {enc.layer_id(n) for n in names}
    assert ids == set(range(14))  # every id is used: 0, the 12 blocks, 13


def test_base_variants_are_the_official_vit_b16(base):
    pre, ft = base["vit_base_patch16"], base["vit_base_patch16_ft"]
    for enc in (pre, ft):
        assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (768, 12, 12)
        assert enc.pos_embed is None and enc.blocks[0].attn.q_bias is not None
        assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
        assert (enc.patch_size, enc.encoder_stride, enc.grid_size, enc.num_features) == (16, 16, (14, 14), 768)
        assert enc.norm.eps == 1e-6 if enc is pre else enc.fc_norm.eps == 1e-6
    torch.testing.assert_close(create_vit("vit_base_patch16", num_classes=0, **TINY).blocks[0].gamma_1,
                               torch.full((C,), 0.1))
    assert pre.rel_pos_bias is not None and pre.blocks[0].attn.relative_position_bias_table is None
    assert ft.rel_pos_bias is None and ft.blocks[0].attn.relative_position_bias_table is not None
    assert not isinstance(pre.norm, torch.nn.Identity) and isinstance(ft.norm, torch.nn.Identity)
    assert pre.no_weight_decay() == {"cls_token"}  # the official set (no absolute position embedding here)
    assert pre.num_layer_ids == 14 and pre.mask_token.shape == (1, 1, 768)
    assert pre.geometry() == dict(family="vit", variant="vit_base_patch16", img_size=[224, 224], window_size=None,
                                  patch_size=16, encoder_stride=16, num_features=768, in_chans=3)


def test_linear_probe_averages_the_patch_tokens_of_the_chosen_block(base):
    enc = create_vit("vit_base_patch16", num_classes=0, **{**TINY, "depth": 4}).eval()
    x, _ = inputs()
    seen = {}
    enc.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    enc(x)
    feats = vit_linear_probe_features(enc, x, block=2)  # depth // 2
    torch.testing.assert_close(feats, seen["out"][:, 1:].mean(1), rtol=0, atol=1e-6)
    assert not torch.allclose(feats, vit_linear_probe_features(enc, x, block=3))
    with pytest.raises(UserError, match="1..4"):
        vit_linear_probe_features(enc, x, block=5)
    with torch.device("meta"):  # ViT-B/16: the 8th of 12 blocks by default
        assert vit_linear_probe_features(base["vit_base_patch16"], torch.empty(2, 3, 224, 224)).shape == (2, 768)


def test_classifier_reset_and_pooled_features():
    enc = create_vit("vit_base_patch16_ft", num_classes=7, **TINY).eval()
    x, _ = inputs()
    assert enc(x).shape == (2, 7) and enc.get_classifier().out_features == 7
    pooled = enc.forward_head(enc.forward_features(x), pre_logits=True)
    enc.reset_classifier(0)
    torch.testing.assert_close(enc(x), pooled)
    with pytest.raises(UserError, match="avg"):
        enc.reset_classifier(3, global_pool="token")


def test_the_fine_tuning_variant_is_timms_beit_base(base):
    """An exported fine-tuned encoder is a timm ``beit_base_patch16_224`` (same keys and shapes, same switches)."""
    import timm

    with torch.device("meta"):
        beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in base["vit_base_patch16_ft"].state_dict().items() if k != "mask_token"}
    assert ours == {k: tuple(v.shape) for k, v in beit.state_dict().items()}
    assert beit.blocks[0].gamma_1 is not None and beit.pos_embed is None and beit.global_pool == "avg"


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = SimMIM(create_vit("vit_base_patch16", num_classes=0, **TINY))
    x, mask = inputs()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.encoder.set_grad_checkpointing(enable)
        loss = model(x, mask).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert model.encoder.mask_token.grad.abs().sum() > 0  # the masked tokens are learned


def test_an_image_size_that_is_not_whole_patches_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"200 is not a multiple of the ViT patch size 16.*e\.g\. 192"):
        create_vit("vit_base_patch16", num_classes=0, **{**TINY, "img_size": 200})
    enc = create_vit("vit_base_patch16", num_classes=0, **TINY)
    with pytest.raises(UserError, match="model.img_size"):
        enc.set_input_size(72)
    assert enc.img_size == (64, 64)  # refused before anything changed
