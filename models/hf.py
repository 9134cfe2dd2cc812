"""Key conversion between this package's SwinV2 (= timm's layout) and Hugging Face transformers' ``Swinv2*`` models.

Pure tensor bookkeeping: nothing here imports transformers. The two layouts differ in four ways:

* names: ``norm1``/``norm2`` are ``layernorm_before``/``layernorm_after`` (both are *post*-norms despite the names),
  ``attn.proj`` is ``attention.output.dense``, ``mlp.fc1``/``fc2`` are ``intermediate.dense``/``output.dense``,
  ``cpb_mlp`` is ``continuous_position_bias_mlp``, the final ``norm`` is ``layernorm``, ``head.fc`` is ``classifier``;
* attention: our fused ``qkv.weight`` (3C, C) with ``q_bias``/``v_bias`` is HF's separate ``query``/``key``/``value``
  Linears; HF's ``key`` has no bias, like the fixed zero k-bias here;
* patch merging: HF keeps the official layout, ``downsample`` at the *end* of stage i (ours: start of stage i+1);
* prefix: every encoder key sits under ``swinv2.``; the classifier does not.

HF's model clamps windows to the stage resolution exactly as we do (``resolution <= window`` -> whole map, no shift),
concatenates the 2x2 neighbours in the same order, and normalises the log-CPB coordinates by
``pretrained_window_size - 1``. It cannot express rectangular windows, V1 ablations or SwinV2-H/G's extra norms:
:func:`check_hf_compatible` refuses those with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from simmim.errors import UserError

PREFIX = "swinv2."
SWIN_PREFIX = "swin."  # Swin V1 (transformers' SwinModel)
BEIT_PREFIX = "beit."
# HF checkpoints saved by older transformers versions may hold these geometry buffers: they are rebuilt on load
_HF_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")

# our block-internal names -> HF's (inside encoder.layers.i.blocks.j.)
_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp": "attention.self.continuous_position_bias_mlp",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_V1_BLOCK_NAMES = {"attn.relative_position_bias_table": "attention.self.relative_position_bias_table"}
_TOP_NAMES = {
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "patch_embed.norm": "embeddings.norm",
    "mask_token": "embeddings.mask_token",
    "norm": "layernorm",
}
_OUR_BLOCK = re.compile(r"^layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<rest>.+)$")
_OUR_DOWNSAMPLE = re.compile(r"^layers\.(?P<i>\d+)\.downsample\.(?P<rest>.+)$")
_HF_BLOCK = re.compile(r"^encoder\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.(?P<rest>.+)$")
_HF_DOWNSAMPLE = re.compile(r"^encoder\.layers\.(?P<i>\d+)\.downsample\.(?P<rest>.+)$")


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest matching module prefix of ``name`` (``a.b.weight`` matches ``a.b``); None if none does."""
    for src in sorted(table, key=len, reverse=True):
        if name == src or name.startswith(src + "."):
            return table[src] + name[len(src):]
    return None


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX, v1: bool = False
               ) -> dict[str, torch.Tensor]:
    """Our (timm-layout) encoder or classifier state dict -> HF ``Swinv2Model``/``Swinv2ForImageClassification`` keys
    (with ``v1``: a Swin V1's -> HF ``SwinModel``/``SwinForImageClassification``, pass ``prefix=SWIN_PREFIX``).

    ``qkv.weight`` (3C, C) is split into ``query``/``key``/``value`` weights (C, C) each; ``q_bias``/``v_bias`` (C,)
    become the ``query``/``value`` biases (V1: the fused ``qkv.bias`` (3C,) is split into all three). V1's
    ``relative_position_bias_table`` goes under ``attention.self``. Encoder keys get ``prefix`` (pass ``""`` for a
    bare ``Swinv2Model`` layout), ``head.fc.*`` becomes ``classifier.*``, a SimMIM ``mask_token`` becomes
    ``embeddings.mask_token``. Raises a UserError for keys HF has no place for (extra norms, V1 tables in V2, ...).
    The names are transformers 4.x's, which the hub's Swin checkpoints use and transformers 5 renames on load.
    """
    block_names = {**_BLOCK_NAMES, **(_V1_BLOCK_NAMES if v1 else {})}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state_dict.items():
        if k.startswith("head.fc."):
            out["classifier." + k.removeprefix("head.fc.")] = v
            continue
        if m := _OUR_DOWNSAMPLE.match(k):  # start of stage i -> end of stage i-1
            out[f"{prefix}encoder.layers.{int(m['i']) - 1}.downsample.{m['rest']}"] = v
            continue
        if m := _OUR_BLOCK.match(k):
            base = f"{prefix}encoder.layers.{m['i']}.blocks.{m['j']}."
            rest = m["rest"]
            if rest == "attn.qkv.weight" or (v1 and rest == "attn.qkv.bias"):
                param = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):  # (C, C) / (C,)
                    out[f"{base}attention.self.{name}.{param}"] = part.clone()
            elif rest in ("attn.q_bias", "attn.v_bias") and not v1:
                out[f"{base}attention.self.{'query' if rest == 'attn.q_bias' else 'value'}.bias"] = v
            elif (new := _rename(rest, block_names)) is not None:
                out[base + new] = v
            else:
                unknown.append(k)
            continue
        if (new := _rename(k, _TOP_NAMES)) is not None:
            out[prefix + new] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) have no Hugging Face {'Swin' if v1 else 'Swinv2'} equivalent: "
                        f"{', '.join(unknown[:4])}; HF's Swinv2 has no extra main-branch norms (SwinV2-H/G) and no "
                        "V1 ablations")
    return out


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX, v1: bool = False
               ) -> dict[str, torch.Tensor]:
    """HF ``Swinv2Model``/``Swinv2ForImageClassification``/``Swinv2ForMaskedImageModeling`` state dict -> ours (with
    ``v1`` and ``prefix=SWIN_PREFIX``: HF ``SwinModel``/``SwinFor*`` -> our Swin V1's, i.e. timm's).

    The inverse of :func:`ours_to_hf`: ``query``/``key``/``value`` weights are concatenated into ``qkv.weight``
    (3C, C), their biases become ``q_bias``/``v_bias`` (V1: ``qkv.bias`` (3C,)). Keys with or without ``prefix``
    are accepted; saved geometry buffers are dropped; a SimMIM decoder (``decoder.0.*``) is kept under its name. A
    non-zero ``key`` bias cannot be represented in SwinV2 (fixed at 0) and raises a UserError.
    """
    name = "Swin" if v1 else "Swinv2"
    block_names = {v_: k_ for k_, v_ in {**_BLOCK_NAMES, **(_V1_BLOCK_NAMES if v1 else {})}.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # "<block>attn.qkv.weight" -> {"query": W, "key": W, "value": W}
    unknown = []
    for k, v in state_dict.items():
        k = k.removeprefix(prefix)
        if k.endswith(_HF_BUFFERS):
            continue
        if k.startswith("classifier."):
            out["head.fc." + k.removeprefix("classifier.")] = v
        elif k.startswith("decoder."):
            out[k] = v
        elif k == "embeddings.position_embeddings":
            what = "SimMIM's Swin V1" if v1 else "SwinV2 with log-CPB"
            raise UserError("the HF checkpoint uses absolute position embeddings (use_absolute_embeddings=True), "
                            f"which {what} does not have")
        elif m := _HF_DOWNSAMPLE.match(k):  # end of stage i -> start of stage i+1
            out[f"layers.{int(m['i']) + 1}.downsample.{m['rest']}"] = v
        elif m := _HF_BLOCK.match(k):
            base = f"layers.{m['i']}.blocks.{m['j']}."
            rest = m["rest"]
            if am := re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", rest):
                which, param = am.groups()
                if param == "weight" or v1:
                    target = f"{base}attn.qkv.{param}"
                    out.setdefault(target, v)  # placeholder: keeps the key where HF has it
                    fused.setdefault(target, {})[which] = v
                elif which == "key":
                    if torch.any(v != 0):
                        raise UserError(f"{prefix}{k} is non-zero; SwinV2 fixes the key bias at 0")
                else:
                    out[base + ("attn.q_bias" if which == "query" else "attn.v_bias")] = v
            elif (new := _rename(rest, block_names)) is not None:
                out[base + new] = v
            else:
                unknown.append(k)
        elif (new := _rename(k, {v_: k_ for k_, v_ in _TOP_NAMES.items()})) is not None:
            out[new] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) are not part of HF's {name}: {', '.join(unknown[:4])}")
    return _fuse_qkv(out, fused)


def _fuse_qkv(out: dict[str, torch.Tensor], fused: Mapping[str, Mapping[str, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
    """Put each fused tensor (``...qkv.weight`` (3C, C) or ``qkv.bias`` (3C,)) of ``out`` together from HF's
    separate ``query``/``key``/``value`` parts, in that order; a missing part is a UserError."""
    for target, parts in fused.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"{target}: the HF checkpoint lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[target] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


# ----------------------------------------------------------------------------------------------------------------
# config


def _square(pair: tuple[int, int], what: str) -> int:
    if pair[0] != pair[1]:
        raise UserError(f"{what} is {pair[0]}x{pair[1]}; Hugging Face's Swinv2 supports square windows only")
    return pair[0]


def check_hf_compatible(model: nn.Module) -> None:
    """Raise ValueError (naming why) unless HF's ``Swinv2`` computes exactly what ``model`` computes."""
    blocks = model.blocks()
    if any(blk.extra_norm is not None for blk in blocks):
        raise UserError("this model adds a LayerNorm on the main branch every 6 blocks (SwinV2-H/G, "
                         "extra_norm_period=6), which Hugging Face's Swinv2 cannot represent; export it as "
                         "safetensors or onnx instead")
    if model.norm_placement != "res_post" or any(
            blk.attn.attention != "cosine" or blk.attn.position_bias != "log_cpb" for blk in blocks):
        raise UserError("Hugging Face's Swinv2 supports only res-post-norm, cosine attention and log-CPB; this "
                         "model uses a V1 ablation setting")
    _square(model.window_size, "window_size")
    for i, w in enumerate(model.effective_window_sizes):
        _square(w, f"stage {i} window (clamped to the stage resolution)")
    for i, w in enumerate(model.pretrained_window_sizes):
        _square(w, f"stage {i} pretrained window")


def _labels(config: dict[str, Any], num_classes: int, id2label: Mapping[int, str] | None) -> dict[str, Any]:
    """``id2label``/``label2id`` of a classifier (default names ``LABEL_i``) added to ``config``."""
    if num_classes > 0:
        labels = dict(id2label) if id2label is not None else {i: f"LABEL_{i}" for i in range(num_classes)}
        if sorted(labels) != list(range(num_classes)):
            raise UserError(f"id2label must name classes 0..{num_classes - 1}, got keys {sorted(labels)[:8]}")
        config["id2label"] = {str(i): labels[i] for i in range(num_classes)}
        config["label2id"] = {labels[i]: i for i in range(num_classes)}
    return config


def _swin_config(model: nn.Module, model_type: str, classes: tuple[str, str], mlp: nn.Module, qkv_bias: bool,
                 id2label: Mapping[int, str] | None) -> dict[str, Any]:
    """The fields transformers' ``SwinConfig`` and ``Swinv2Config`` share, for a Swin ``model`` of either kind."""
    h, w = model.img_size
    config: dict[str, Any] = {
        "architectures": [classes[1] if model.num_classes > 0 else classes[0]],
        "model_type": model_type,
        "image_size": h if h == w else [h, w],
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "embed_dim": model.embed_dim,
        "depths": list(model.depths),
        "num_heads": [stage.blocks[0].attn.num_heads for stage in model.layers],
        "window_size": _square(model.window_size, "window_size"),
        "mlp_ratio": mlp.fc1.out_features / mlp.fc1.in_features,
        "qkv_bias": qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "use_absolute_embeddings": False,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "encoder_stride": model.encoder_stride,
    }
    return _labels(config, model.num_classes, id2label)


def hf_config(model: nn.Module, id2label: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for transformers' ``Swinv2Config`` describing ``model`` (a SwinTransformerV2).

    A classifier (``num_classes > 0``) gets ``architectures=["Swinv2ForImageClassification"]`` and
    ``id2label``/``label2id`` (default names ``LABEL_i``); an encoder gets ``["Swinv2Model"]``. Raises a UserError
    where HF cannot represent the model (see :func:`check_hf_compatible`).
    """
    check_hf_compatible(model)
    first = model.blocks()[0]
    config = _swin_config(model, "swinv2", ("Swinv2Model", "Swinv2ForImageClassification"), first.mlp,
                          first.attn.q_bias is not None, id2label)
    # the trained windows (pretrained where set, else effective): the same outputs at this size, and a user who
    # loads it with another image_size/window_size keeps the log-CPB normalised as trained. HF divides the CPB
    # coordinates by (pretrained - 1) without guarding 1 (0/0 = NaN); a pretrained window of 2 gives the divisor 1
    # that ours (and timm's) max(pretrained - 1, 1) uses
    config["pretrained_window_sizes"] = [max(_square(p, "pretrained window"), 2) for p in model.trained_window_sizes]
    return config


def swin_hf_config(model: nn.Module, id2label: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for transformers' ``SwinConfig`` describing a Swin V1 ``model``
    (:class:`~simmim.models.swin.SwinV1`): ``SwinModel`` for an encoder, ``SwinForImageClassification`` with
    ``id2label`` for a classifier.

    transformers' Swin has one window for every stage and sizes each block's relative position table by it; where a
    stage's map is smaller than the window it shrinks the window at run time but not the table. So every stage must
    attend in the configured window (a map equal to the window is fine); otherwise a UserError names the fix.
    """
    _square(model.window_size, "window_size")
    window = model.window_size[0]
    for i, w in enumerate(model.effective_window_sizes):
        if _square(tuple(w), f"stage {i} window") != window:
            raise UserError(
                f"stage {i} of this Swin attends in {w[0]}x{w[0]} windows (its map is smaller than window_size "
                f"{window}), which transformers' Swin cannot represent (one window and table size for all "
                "stages); export it as timm, safetensors or onnx, or fine-tune at a size whose last stage map is at "
                f"least the window (img_size >= {window * model.encoder_stride})")
    first = model.layers[0].blocks[0]
    return _swin_config(model, "swin", ("SwinModel", "SwinForImageClassification"), first.mlp,
                        first.attn.qkv.bias is not None, id2label)


# ----------------------------------------------------------------------------------------------------------------
# ViT (SimMIM's, on timm's Beit) <-> transformers' Beit

_VIT_BLOCK_NAMES = {  # ours (timm Beit) inside blocks.i. -> HF (transformers 4.x names) inside encoder.layer.i.
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "attn.relative_position_bias_table": "attention.attention.relative_position_bias.relative_position_bias_table",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_VIT_TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "rel_pos_bias.relative_position_bias_table": "encoder.relative_position_bias.relative_position_bias_table",
    "norm": "layernorm",  # the pretraining variant: a norm over every token
    "fc_norm": "pooler.layernorm",  # the fine-tuning variant: a norm after the mean pool
}
_OUR_VIT_BLOCK = re.compile(r"^blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def vit_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = BEIT_PREFIX) -> dict[str, torch.Tensor]:
    """Our ViT (timm ``Beit`` keys) -> HF ``BeitModel``/``BeitForImageClassification`` keys (transformers 4.x names,
    which the hub's BEiT checkpoints use and transformers 5 renames on load).

    ``qkv.weight`` (3C, C) becomes ``query``/``key``/``value`` weights (C, C); ``q_bias``/``v_bias`` the ``query``/
    ``value`` biases (BEiT's key has no bias); layer scale ``gamma_1``/``gamma_2`` is ``lambda_1``/``lambda_2``; the
    shared relative position table goes to ``encoder.relative_position_bias``; ``head`` is ``classifier``.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state_dict.items():
        if k.endswith("relative_position_index"):
            continue
        if k.startswith("head."):
            out["classifier." + k.removeprefix("head.")] = v
        elif m := _OUR_VIT_BLOCK.match(k):
            base, rest = f"{prefix}encoder.layer.{m['i']}.", m["rest"]
            if rest == "attn.qkv.weight":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):  # (C, C) each
                    out[f"{base}attention.attention.{name}.weight"] = part.clone()
            elif rest in ("attn.q_bias", "attn.v_bias"):
                out[f"{base}attention.attention.{'query' if rest == 'attn.q_bias' else 'value'}.bias"] = v
            elif (new := _rename(rest, _VIT_BLOCK_NAMES)) is not None:
                out[base + new] = v
            else:
                unknown.append(k)
        elif (new := _rename(k, _VIT_TOP_NAMES)) is not None:
            out[prefix + new] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) have no Hugging Face Beit equivalent: {', '.join(unknown[:4])}")
    return out


_HF_VIT_BLOCK = re.compile(r"^encoder\.layer\.(?P<i>\d+)\.(?P<rest>.+)$")


def hf_to_vit(state_dict: Mapping[str, torch.Tensor], prefix: str = BEIT_PREFIX) -> dict[str, torch.Tensor]:
    """HF ``BeitModel``/``BeitForImageClassification`` state dict (transformers 4.x names) -> our ViT's (timm
    ``Beit``'s): the inverse of :func:`vit_to_hf`. ``query``/``key``/``value`` weights become ``qkv.weight`` (3C, C);
    the query/value biases ``q_bias``/``v_bias``; saved ``relative_position_index`` buffers are dropped."""
    block_names = {v_: k_ for k_, v_ in _VIT_BLOCK_NAMES.items()}
    top_names = {v_: k_ for k_, v_ in _VIT_TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in state_dict.items():
        k = k.removeprefix(prefix)
        if k.endswith("relative_position_index"):
            continue
        if k.startswith("classifier."):
            out["head." + k.removeprefix("classifier.")] = v
        elif m := _HF_VIT_BLOCK.match(k):
            base, rest = f"blocks.{m['i']}.", m["rest"]
            if am := re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest):
                which, param = am.groups()
                if param == "weight":
                    out.setdefault(base + "attn.qkv.weight", v)  # placeholder: keeps the key where HF has it
                    fused.setdefault(base + "attn.qkv.weight", {})[which] = v
                elif which == "key":
                    unknown.append(prefix + k)  # BEiT's key has no bias
                else:
                    out[base + ("attn.q_bias" if which == "query" else "attn.v_bias")] = v
            elif (new := _rename(rest, block_names)) is not None:
                out[base + new] = v
            else:
                unknown.append(prefix + k)
        elif (new := _rename(k, top_names)) is not None:
            out[new] = v
        else:
            unknown.append(prefix + k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) are not part of HF's Beit as SimMIM's ViT uses it: "
                        f"{', '.join(unknown[:4])}")
    return _fuse_qkv(out, fused)


def vit_hf_config(model: nn.Module, id2label: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for transformers' ``BeitConfig`` describing a SimMIM ViT ``model``
    (:class:`~simmim.models.vit.SimMIMViT`): ``BeitModel`` for an encoder, ``BeitForImageClassification`` for a
    classifier. The fine-tuning variant (a bias per block, mean pooling with a norm) is BEiT's ``use_mean_pooling``;
    the pretraining variant (one shared bias, a norm over the tokens) exports as an encoder only: HF's classifier
    would pool its CLS token, which SimMIM's ViT never trains."""
    h, w = model.img_size
    if h != w:
        raise UserError(f"image size {h}x{w}: transformers' Beit takes square images; export as timm, safetensors "
                        "or onnx")
    mean_pooling = not isinstance(model.fc_norm, nn.Identity)
    if model.num_classes > 0 and not mean_pooling:
        raise UserError("this ViT classifier pools without a norm after the mean (the pretraining variant), which "
                        "transformers' BeitForImageClassification cannot do (it pools the CLS token); fine-tune as "
                        "vit_base_patch16_ft, or export as timm, safetensors or onnx")
    first = model.blocks[0]
    config: dict[str, Any] = {
        "architectures": ["BeitForImageClassification" if model.num_classes > 0 else "BeitModel"],
        "model_type": "beit",
        "image_size": h,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": first.attn.num_heads,
        "intermediate_size": first.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": model.blocks[0].norm1.eps,
        "use_mask_token": False,
        "use_absolute_position_embeddings": model.pos_embed is not None,
        "use_relative_position_bias": first.attn.relative_position_bias_table is not None,
        "use_shared_relative_position_bias": model.rel_pos_bias is not None,
        "layer_scale_init_value": 0.1 if first.gamma_1 is not None else 0.0,  # > 0: lambda_1/2 exist (loaded)
        "use_mean_pooling": mean_pooling,
    }
    return _labels(config, model.num_classes, id2label)


# ----------------------------------------------------------------------------------------------------------------
# one entry per encoder family: what the hf export writes and what the weights reader reads


@dataclass(frozen=True)
class HFLayout:
    """How an encoder family maps onto a transformers model type."""

    model_type: str  # config.json's "model_type"
    title: str  # what the README calls the architecture
    config: Callable[[nn.Module, Mapping[int, str] | None], dict[str, Any]]  # (model, id2label) -> config.json
    to_hf: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]  # our state dict -> HF keys
    pooled: Callable[[dict[str, Any]], str]  # config -> which output holds simmim's pooled features
    from_hf: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]  # HF keys -> our state dict


def _pooler(config: dict[str, Any]) -> str:
    return "pooler_output"


def _beit_pooled(config: dict[str, Any]) -> str:
    # BEiT without mean pooling pools its CLS token; SimMIM's ViT pools the mean of the patch tokens
    return "pooler_output" if config["use_mean_pooling"] else "last_hidden_state[:, 1:].mean(1)"


HF_LAYOUTS: dict[str, HFLayout] = {  # keyed by the encoder family (models.encoders.FAMILIES)
    "swinv2": HFLayout("swinv2", "Swin Transformer V2", hf_config, ours_to_hf, _pooler, hf_to_ours),
    "swin": HFLayout("swin", "Swin Transformer (V1)", swin_hf_config,
                     partial(ours_to_hf, prefix=SWIN_PREFIX, v1=True), _pooler,
                     partial(hf_to_ours, prefix=SWIN_PREFIX, v1=True)),
    "vit": HFLayout("beit", "ViT (BEiT-style: relative position bias, layer scale)", vit_hf_config, vit_to_hf,
                    _beit_pooled, hf_to_vit),
}


def hf_layout_of(model_type: str | None) -> tuple[str, HFLayout] | None:
    """(family, layout) for a transformers ``model_type`` (``swinv2``, ``swin``, ``beit``); None for others."""
    return next(((family, layout) for family, layout in HF_LAYOUTS.items() if layout.model_type == model_type),
                None)
