"""torch.compile for the backbone: one whole graph per mode at a fixed input size.

The encoder compiles with ``fullgraph=True`` (no graph break) in train and eval mode and in every recompute mode.
What makes that hold: the inference cache of the position bias and the CPU-specific paths step aside while
compiling (:mod:`.tracing`), the oneDNN Linear is a registered custom op that stays one call in the graph
(:mod:`.onednn_linear`), and size-dependent Python branches see static sizes (``dynamic=False``). A new input size
or a switch between train and eval compiles a new graph once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_encoder(module: nn.Module) -> bool:
    """An encoder of the contract (docs/encoders.md), not a wrapper holding one."""
    return hasattr(module, "encoder_stride") and hasattr(module, "layer_id") and hasattr(module, "forward_features")


def compile_model(model: nn.Module, fullgraph: bool = True, dynamic: bool = False, **kwargs: Any) -> nn.Module:
    """Compile the ``forward_features`` of every encoder (SwinV2, Swin V1, ViT: the contract) in ``model``, in place.

    ``forward_features`` is the entry both SimMIM (``encoder.forward_features(images, mask)``) and classification
    (``forward`` = ``forward_features`` + the pooled head) go through. ``model`` keeps its type, parameters and
    ``state_dict`` keys (no ``_orig_mod.`` prefix), so the caller's loop, checkpoints and optimizer are unchanged.
    Compile after any deep copy of the model (an EMA copy, for example). ``model`` is an encoder/classifier or a
    module holding one (for ``SimMIM`` the decoder and loss stay eager). Keyword arguments go to ``torch.compile``
    (``mode=``, ``backend=``, ...). Returns ``model``.
    """
    encoders = [m for m in model.modules() if _is_encoder(m)]
    if not encoders:
        raise ValueError(f"{type(model).__name__} holds no encoder to compile")
    for enc in encoders:
        enc.forward_features = torch.compile(enc.forward_features, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
    return model
