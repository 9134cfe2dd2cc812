"""Data pipeline for SimMIM (installed as ``simmim.data``): mask generation, transforms, sources and datasets."""

from .datasets import MaskedImageDataset, probe_source
from .images import (
    IMAGE_EXTENSIONS,
    ChannelMismatchError,
    UnreadableImageError,
    decode_pil,
    decode_tensor,
    load_image,
    load_rgb,
    read_raw,
)
from .loader import make_loader
from .mask import MaskGenerator, sample_seed
from .samples import sample_digits, sample_photos
from .shards import TarIndexSource, TarShardSource
from .sources import EmbeddedSource, HFImageSource, ImageFolderSource, open_source
from .stream import MaskedImageStream
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, denormalize, pretrain_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ChannelMismatchError",
    "EmbeddedSource",
    "HFImageSource",
    "ImageFolderSource",
    "MaskGenerator",
    "MaskedImageDataset",
    "MaskedImageStream",
    "PretrainTransform",
    "TarIndexSource",
    "TarShardSource",
    "UnreadableImageError",
    "decode_pil",
    "decode_tensor",
    "denormalize",
    "load_image",
    "load_rgb",
    "make_loader",
    "open_source",
    "pretrain_transform",
    "probe_source",
    "read_raw",
    "sample_digits",
    "sample_photos",
    "sample_seed",
]
