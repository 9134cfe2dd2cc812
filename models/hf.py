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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from simmim.errors import UserError

PREFIX = "swinv2."
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


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Our (timm-layout) encoder or classifier state dict -> HF ``Swinv2Model``/``Swinv2ForImageClassification`` keys.

    ``qkv.weight`` (3C, C) is split into ``query``/``key``/``value`` weights (C, C) each; ``q_bias``/``v_bias`` (C,)
    become the ``query``/``value`` biases. Encoder keys get ``prefix`` (``swinv2.``; pass ``""`` for a bare
    ``Swinv2Model`` layout), ``head.fc.*`` becomes ``classifier.*``, a SimMIM ``mask_token`` becomes
    ``embeddings.mask_token``. Raises ValueError for keys HF has no place for (extra norms, V1 tables, ...).
    """
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
            if rest == "attn.qkv.weight":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):  # (C, C) each
                    out[f"{base}attention.self.{name}.weight"] = part.clone()
            elif rest in ("attn.q_bias", "attn.v_bias"):
                out[f"{base}attention.self.{'query' if rest == 'attn.q_bias' else 'value'}.bias"] = v
            elif (new := _rename(rest, _BLOCK_NAMES)) is not None:
                out[base + new] = v
            else:
                unknown.append(k)
            continue
        if (new := _rename(k, _TOP_NAMES)) is not None:
            out[prefix + new] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) have no Hugging Face Swinv2 equivalent: {', '.join(unknown[:4])}; "
                         "HF's Swinv2 has no extra main-branch norms (SwinV2-H/G) and no V1 ablations")
    return out


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """HF ``Swinv2Model``/``Swinv2ForImageClassification``/``Swinv2ForMaskedImageModeling`` state dict -> ours.

    The inverse of :func:`ours_to_hf`: ``query``/``key``/``value`` weights are concatenated into ``qkv.weight``
    (3C, C), their biases become ``q_bias``/``v_bias``. Keys with or without ``prefix`` are accepted; saved geometry
    buffers are dropped; a SimMIM decoder (``decoder.0.*``) is kept under its name. A non-zero ``key`` bias cannot be
    represented (the k bias is fixed at 0 in SwinV2) and raises ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # block key prefix -> {"query": W, "key": W, "value": W}
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
            raise UserError("the HF checkpoint uses absolute position embeddings (use_absolute_embeddings=True), "
                             "which SwinV2 with log-CPB does not have")
        elif m := _HF_DOWNSAMPLE.match(k):  # end of stage i -> start of stage i+1
            out[f"layers.{int(m['i']) + 1}.downsample.{m['rest']}"] = v
        elif m := _HF_BLOCK.match(k):
            base = f"layers.{m['i']}.blocks.{m['j']}."
            rest = m["rest"]
            if am := re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", rest):
                which, param = am.groups()
                if param == "weight":
                    out.setdefault(base + "attn.qkv.weight", v)  # placeholder: keeps the key where HF has it
                    qkv.setdefault(base, {})[which] = v
                elif which == "key":
                    if torch.any(v != 0):
                        raise UserError(f"{prefix}{k} is non-zero; SwinV2 fixes the key bias at 0")
                else:
                    out[base + ("attn.q_bias" if which == "query" else "attn.v_bias")] = v
            elif (new := _rename(rest, {v_: k_ for k_, v_ in _BLOCK_NAMES.items()})) is not None:
                out[base + new] = v
            else:
                unknown.append(k)
        elif (new := _rename(k, {v_: k_ for k_, v_ in _TOP_NAMES.items()})) is not None:
            out[new] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{len(unknown)} key(s) are not part of HF's Swinv2: {', '.join(unknown[:4])}")
    for base, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"{base}: the HF checkpoint lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[base + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])  # (3C, C)
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


def hf_config(model: nn.Module, id2label: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for transformers' ``Swinv2Config`` describing ``model`` (a SwinTransformerV2).

    A classifier (``num_classes > 0``) gets ``architectures=["Swinv2ForImageClassification"]`` and
    ``id2label``/``label2id`` (default names ``LABEL_i``); an encoder gets ``["Swinv2Model"]``. Raises ValueError
    where HF cannot represent the model (see :func:`check_hf_compatible`).
    """
    check_hf_compatible(model)
    first = model.blocks()[0]
    h, w = model.img_size
    # the trained windows (pretrained where set, else effective): the same outputs at this size, and a user who
    # loads it with another image_size/window_size keeps the log-CPB normalised as trained. HF divides the CPB
    # coordinates by (pretrained - 1) without guarding 1 (0/0 = NaN); a pretrained window of 2 gives the divisor 1
    # that ours (and timm's) max(pretrained - 1, 1) uses
    pretrained = [max(_square(p, "pretrained window"), 2) for p in model.trained_window_sizes]
    config: dict[str, Any] = {
        "architectures": ["Swinv2ForImageClassification" if model.num_classes > 0 else "Swinv2Model"],
        "model_type": "swinv2",
        "image_size": h if h == w else [h, w],
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "embed_dim": model.embed_dim,
        "depths": list(model.depths),
        "num_heads": list(model.num_heads),
        "window_size": _square(model.window_size, "window_size"),
        "pretrained_window_sizes": pretrained,
        "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features,
        "qkv_bias": first.attn.q_bias is not None,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "use_absolute_embeddings": False,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "encoder_stride": model.encoder_stride,
    }
    if model.num_classes > 0:
        labels = dict(id2label) if id2label is not None else {i: f"LABEL_{i}" for i in range(model.num_classes)}
        if sorted(labels) != list(range(model.num_classes)):
            raise UserError(f"id2label must name classes 0..{model.num_classes - 1}, got keys {sorted(labels)[:8]}")
        config["id2label"] = {str(i): labels[i] for i in range(model.num_classes)}
        config["label2id"] = {labels[i]: i for i in range(model.num_classes)}
    return config
