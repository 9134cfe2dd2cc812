"""Data pipeline for SimMIM (installed as ``simmim.data``): mask generation, transforms and datasets."""

from .datasets import MaskedImageDataset, MaskedImageStream
from .images import IMAGE_EXTENSIONS, load_rgb
from .mask import MaskGenerator, sample_seed
from .samples import sample_digits, sample_photos
from .sources import EmbeddedSource, HFImageSource, ImageFolderSource, open_source
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, pretrain_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "EmbeddedSource",
    "HFImageSource",
    "ImageFolderSource",
    "MaskGenerator",
    "MaskedImageDataset",
    "MaskedImageStream",
    "denormalize",
    "load_rgb",
    "open_source",
    "pretrain_transform",
    "sample_digits",
    "sample_photos",
    "sample_seed",
]
