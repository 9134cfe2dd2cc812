"""Bundled YAML recipes (installed as ``simmim.configs``): pretrain/, finetune/, demo/, accelerate/."""

from pathlib import Path

from simmim.errors import InputNotFoundError

CONFIG_DIR = Path(__file__).resolve().parent


def resolve(name: str) -> Path:
    """A config path as given, or a bundled recipe by name: ``pretrain/swinv2_base_192_w12_800ep`` (``.yaml``
    optional). Raises FileNotFoundError listing the bundled recipes."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    known = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.glob("*/*.yaml"))
    raise InputNotFoundError(f"config {name!r} is neither a file nor a bundled recipe; bundled: {', '.join(known)}")
