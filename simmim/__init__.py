"""simmim: SimMIM self-supervised pretraining with a Swin Transformer V2 backbone.

The public names below are imported on first use (PEP 562), so ``import simmim`` and ``simmim --version`` do not
pay for torch and timm.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("simmim")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {  # public name -> the module that defines it
    "SimMIM": "simmim.masked_modeling",
    "SimMIMOutput": "simmim.masked_modeling",
    "masked_l1_loss": "simmim.masked_modeling",
    "normalize_target": "simmim.masked_modeling",
    "load_encoder": "simmim.weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'simmim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
