"""simmim: SimMIM self-supervised pretraining with a Swin Transformer V2 backbone."""

from importlib.metadata import PackageNotFoundError, version

from .model import SimMIM, SimMIMOutput, masked_l1_loss, normalize_target
from .weights import load_encoder

try:
    __version__ = version("simmim")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["SimMIM", "SimMIMOutput", "__version__", "load_encoder", "masked_l1_loss", "normalize_target"]
