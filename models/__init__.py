"""Swin Transformer V2 backbone, its variants and weight converters (installed as ``simmim.models``).

Importing this package registers the variants with timm as ``simmim_<variant>`` (see :mod:`.timm_registry`).
"""

from . import timm_registry  # noqa: F401  (registers simmim_<variant> with timm's model registry)
from .compile import compile_model
from .convert import convert_state_dict, detect_format, load_pretrained, to_official
from .detection import DetectionBackbone, detection_backbone
from .encoders import FAMILIES, Family, create_encoder, detect_family, family_of, list_encoders
from .swin import SwinV1
from .swin_transformer_v2 import SwinTransformerV2
from .variants import VARIANTS, Geometry, create_model, list_models, variant_geometry

__all__ = [
    "VARIANTS",
    "FAMILIES",
    "DetectionBackbone",
    "Family",
    "SwinV1",
    "Geometry",
    "SwinTransformerV2",
    "compile_model",
    "convert_state_dict",
    "create_encoder",
    "create_model",
    "detect_family",
    "family_of",
    "list_encoders",
    "detect_format",
    "detection_backbone",
    "list_models",
    "load_pretrained",
    "to_official",
    "variant_geometry",
]
