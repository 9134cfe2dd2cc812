"""Typed run configuration: dataclasses hold every default, YAML files hold differences, ``key.sub=value`` overrides
come last. Unknown keys and values of the wrong type fail before any work, naming the key.

Defaults are the official SwinV2-B SimMIM recipe (192 px, W12, 800 epochs); ``configs/`` holds the variations.
Learning rates are per 512 images and scaled linearly by the global batch (:func:`scaled_lr`), never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class ModelConfig:
    name: str = "swinv2_base"  # a simmim.models variant
    img_size: int = 192  # the SimMIM pretraining resolution of the paper
    window_size: int = 12  # 192 px / W12 gives effective windows 12/12/12/6
    pretrained_window_sizes: tuple[int, ...] | None = None  # None: no earlier window (pretraining from scratch)
    drop_path_rate: float = 0.1  # official SwinV2-B SimMIM recipe
    in_chans: int = 3
    grad_checkpointing: bool = False  # trade compute for activation memory; true means recompute: full
    # what blocks recompute in backward: none; attention (the attention core and GELU: ~0.6x memory for a few %
    # of step time); full (activation checkpointing). See models/recompute.py and docs/benchmarks.md
    recompute: Literal["none", "attention", "full"] = "none"
    sequential_attention: int | None = None  # windows per attention chunk (paper §3.6); None = all at once


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # folder of images, datasets save_to_disk folder, hf:NAME, or embedded[:photos|digits|all]
    split: str = "train"  # for datasets sources
    image_column: str | None = None  # for datasets sources; None = the first Image column
    streaming: bool = False  # iterate a hub dataset without downloading it whole
    batch_size: int = 128  # per device; the global batch is batch_size x processes x accumulation_steps
    num_workers: int = 8
    mask_patch_size: int = 32  # masks are drawn on a 32 px grid, then upsampled to tokens
    mask_ratio: float = 0.6
    crop_scale: tuple[float, float] = (0.67, 1.0)  # RandomResizedCrop scale of the official pretraining
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1e-4  # per 512 images
    warmup_lr: float = 5e-7  # per 512 images
    min_lr: float = 5e-6  # per 512 images (cosine floor)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # max global grad norm; None = no clipping
    accumulation_steps: int = 1
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning); 1.0 = off


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: float = 10
    kind: Literal["cosine", "multistep"] = "multistep"
    milestones: tuple[int, ...] = (700,)  # epochs where multistep multiplies the lr by gamma
    gamma: float = 0.1
    max_steps: int | None = None  # stop after this many optimizer steps (short runs, tests); None = epochs


@dataclass(frozen=True)
class SimMIMConfig:
    norm_target: bool = True  # per-pixel normalised target, on in the official SwinV2 recipe
    norm_target_window: int = 47  # odd sliding window of the target normalisation


@dataclass(frozen=True)
class RunConfig:
    output: str = "runs/pretrain"
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = 20  # optimizer steps between scalar logs
    image_every: int = 1000  # steps between reconstruction grids (0 = only at the end)
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # step checkpoints kept
    resume: str | None = None  # "auto" = newest valid checkpoint in output/checkpoints, or a path
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True  # tqdm bar on the main process


@dataclass(frozen=True)
class MonitorConfig:
    data: str = ""  # labelled data for k-NN / linear-probe monitoring (e.g. embedded:digits); "" = off
    every: int = 0  # steps between evaluations during pretraining; 0 = only at the end (when data is set)
    stage: int = -1  # encoder stage whose pooled features are probed (-1 = the last, normed)
    knn_k: int = 20
    img_size: int | None = None  # defaults to model.img_size


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning: the official SwinV2-B recipe (224 px, W14, 100 epochs) as defaults


@dataclass(frozen=True)
class FinetuneModelConfig(ModelConfig):
    img_size: int = 224
    window_size: int = 14
    pretrained_window_sizes: tuple[int, ...] | None = None  # None: the windows the checkpoint was trained at
    num_classes: int | None = None  # None: the number of classes in the data


@dataclass(frozen=True)
class FinetuneDataConfig:
    path: str = ""  # ImageNet-style folder (train/<class>/, val/<class>/), save_to_disk dir, hf:NAME, embedded:digits
    train_split: str = "train"
    val_split: str = "val"  # "validation" etc. are found too
    image_column: str | None = None
    label_column: str | None = None
    batch_size: int = 128  # per device
    num_workers: int = 8
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale
    hflip: float = 0.5  # horizontal flip probability
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec
    color_jitter: float = 0.4
    re_prob: float = 0.25  # random erasing
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct (256 for 224), center-crop; 1.0 = plain resize
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MixupConfig:
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    base_lr: float = 1.25e-3  # per 512 images
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    layer_decay: float = 0.75


@dataclass(frozen=True)
class FinetuneScheduleConfig(ScheduleConfig):
    epochs: int = 100
    warmup_epochs: float = 20
    kind: Literal["cosine", "multistep"] = "cosine"
    milestones: tuple[int, ...] = ()


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3), evaluated too
    decay: float = 0.9999


@dataclass(frozen=True)
class FinetuneRunConfig(RunConfig):
    output: str = "runs/finetune"
    eval_every: int = 0  # steps between evaluations; 0 = every epoch


@dataclass(frozen=True)
class FinetuneConfig:
    pretrained: str = ""  # checkpoint to start from: ours, an exported encoder, official or timm; "" = from scratch
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type; the message names the key."""


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to ``tp`` (PyYAML reads ``1e-4`` as a string; '5' may be meant as a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare no/yes as a boolean
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(choices)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; keys not given keep their defaults."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown(path, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): fit for YAML and for checkpoints loaded with ``weights_only``."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(i) for i in v]
        return v
    return plain(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars), checking keys against ``cls``."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. optim.base_lr=2e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node_cls, node = cls, data
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(node_cls)]
            if part not in names:
                raise _unknown(".".join(parts[:depth + 1]), names)
            tp = typing.get_type_hints(node_cls)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    example = f"{key}.{dataclasses.fields(tp)[0].name}=..."
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {example}")
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section")
                node = node.setdefault(part, {})
                node_cls = tp
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults <- YAML file (which may name a ``base:`` YAML it extends) <- ``key=value`` overrides."""
    data = read_yaml(Path(path)) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or [], cls))


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is merged underneath."""
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} extends itself through 'base:' ({' -> '.join(map(str, _seen))})")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(read_yaml((path.parent / base).resolve(), (*_seen, path.resolve())), data)


def merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``diff`` wins."""
    out = dict(base)
    for k, v in diff.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (every key, so a run can be repeated from it alone)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """A checked copy of a frozen config with dotted changes: ``replace(cfg, **{"run.output": "x"})``."""
    data = to_dict(cfg)
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise _unknown(key, list(node))
            node = node[part]
        node[last] = value
    return from_dict(type(cfg), data)


def scaled_lr(lr_per_512: float, global_batch: int) -> float:
    """The linear scaling rule of the official recipes: learning rates are quoted per 512 images."""
    return lr_per_512 * global_batch / 512
