"""Typed run configuration: dataclasses hold every default, YAML files hold differences, ``key.sub=value`` overrides
come last. Everything is checked when the config is built, before any work, by a one-line :class:`ConfigError` that
names the key: YAML errors (file and line), unknown keys, wrong types, numbers outside their section's ``limits``
table, and values that do not fit together (image size vs windows and masks, schedule, channels, mixup batch).

Defaults are the official SwinV2-B SimMIM recipe (192 px, W12, 800 epochs); ``configs/`` holds the variations.
Learning rates are per 512 images and scaled linearly by the global batch (:func:`scaled_lr`), never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from simmim.errors import InputNotFoundError, UserError


@dataclass(frozen=True)
class Range:
    """The values a number field accepts (each item, for a tuple): ``low``/``high`` bounds (None = unbounded),
    inclusive unless ``*_open``, and always finite. ``hint`` ends the error message with the fix."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None when it is fine."""
        if not math.isfinite(value):
            return "must be a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self}{self.hint}" if below or above else None

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return "a finite number" if self.low is None else f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_1 = Range(1)  # counts, sizes, intervals
AT_LEAST_0 = Range(0)  # counts where 0 means "off" or "none"
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): rates and decays where 1 would stop all change


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
    # where float32 CPU Linear products run: auto (oneDNN, ~2x faster than MKL on the project's CPU, where it
    # passes its check; F.linear elsewhere); aten (always F.linear). Same products up to summation order.
    linear_backend: Literal["auto", "aten"] = "auto"

    limits: ClassVar[dict[str, Range]] = {
        "img_size": AT_LEAST_1, "window_size": AT_LEAST_1,
        "pretrained_window_sizes": Range(0, hint=" (0 = not pretrained at that stage)"),
        "drop_path_rate": FRACTION, "in_chans": AT_LEAST_1, "sequential_attention": AT_LEAST_1,
    }


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
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN  # one per input channel (model.in_chans); ImageNet's
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    limits: ClassVar[dict[str, Range]] = {
        "batch_size": AT_LEAST_1, "num_workers": AT_LEAST_0, "mask_patch_size": AT_LEAST_1,
        "mask_ratio": Range(0, 1, low_open=True, high_open=True), "crop_scale": Range(0, 1, low_open=True),
        "mean": Range(), "std": POSITIVE,
    }


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

    limits: ClassVar[dict[str, Range]] = {
        "base_lr": POSITIVE, "warmup_lr": AT_LEAST_0, "min_lr": AT_LEAST_0, "weight_decay": AT_LEAST_0,
        "betas": FRACTION, "eps": POSITIVE,
        "clip_grad": Range(0, low_open=True, hint="; optim.clip_grad=null turns clipping off"),
        "accumulation_steps": AT_LEAST_1, "layer_decay": Range(0, 1, low_open=True, hint=" (1 = off)"),
    }


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: float = 10
    kind: Literal["cosine", "multistep"] = "multistep"
    milestones: tuple[int, ...] = (700,)  # epochs where multistep multiplies the lr by gamma
    gamma: float = 0.1
    max_steps: int | None = None  # stop after this many optimizer steps (short runs, tests); None = epochs

    limits: ClassVar[dict[str, Range]] = {
        "epochs": AT_LEAST_1, "warmup_epochs": AT_LEAST_0, "milestones": AT_LEAST_0, "gamma": POSITIVE,
        "max_steps": Range(1, hint="; schedule.max_steps=null runs schedule.epochs"),
    }


@dataclass(frozen=True)
class SimMIMConfig:
    norm_target: bool = True  # per-pixel normalised target, on in the official SwinV2 recipe
    norm_target_window: int = 47  # odd sliding window of the target normalisation

    limits: ClassVar[dict[str, Range]] = {"norm_target_window": Range(3, hint=" and odd")}


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
    compile: bool = False  # torch.compile the encoder (fullgraph, fixed size): faster steps after a compile

    limits: ClassVar[dict[str, Range]] = {
        "seed": Range(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
        "log_every": AT_LEAST_1, "image_every": Range(0, hint=" (0 = only at the end)"), "save_every": AT_LEAST_1,
        "keep_last": AT_LEAST_1, "max_bad_steps": AT_LEAST_1,
    }


@dataclass(frozen=True)
class MonitorConfig:
    data: str = ""  # labelled data for k-NN / linear-probe monitoring (e.g. embedded:digits); "" = off
    every: int = 0  # steps between evaluations during pretraining; 0 = only at the end (when data is set)
    stage: int = -1  # encoder stage whose pooled features are probed (-1 = the last, normed)
    knn_k: int = 20
    img_size: int | None = None  # None = model.img_size, the only size the encoder runs at (checked)

    limits: ClassVar[dict[str, Range]] = {
        "every": Range(0, hint=" (0 = only at the end)"), "stage": Range(-1), "knn_k": AT_LEAST_1,
        "img_size": AT_LEAST_1,
    }


@dataclass(frozen=True)
class PretrainConfig:
    init: str = ""  # warm start: weights to begin from (ours, official SimMIM, timm, HF); not a resume; "" = random
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

    limits: ClassVar[dict[str, Range]] = {**ModelConfig.limits, "num_classes": AT_LEAST_1}


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
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct (256 for 224), center-crop; 1.0 = plain resize
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN  # one per input channel (model.in_chans); ImageNet's
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    limits: ClassVar[dict[str, Range]] = {
        "batch_size": AT_LEAST_1, "num_workers": AT_LEAST_0, "crop_scale": Range(0, 1, low_open=True),
        "hflip": PROBABILITY, "color_jitter": AT_LEAST_0, "re_prob": PROBABILITY,
        "crop_pct": Range(0, 1, low_open=True), "mean": Range(), "std": POSITIVE,
    }


@dataclass(frozen=True)
class MixupConfig:
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    limits: ClassVar[dict[str, Range]] = {
        "mixup": AT_LEAST_0, "cutmix": AT_LEAST_0, "prob": PROBABILITY, "switch_prob": PROBABILITY,
        "label_smoothing": FRACTION,
    }


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

    limits: ClassVar[dict[str, Range]] = {"decay": FRACTION}


@dataclass(frozen=True)
class FinetuneRunConfig(RunConfig):
    output: str = "runs/finetune"
    eval_every: int = 0  # steps between evaluations; 0 = every epoch

    limits: ClassVar[dict[str, Range]] = {**RunConfig.limits, "eval_every": Range(0, hint=" (0 = every epoch)")}


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


class ConfigError(UserError):
    """A config file or override cannot be read, a key is unknown, a value has the wrong type or is out of range, or
    values do not fit together; the one-line message names the key (and the file and line for YAML errors)."""


# ----------------------------------------------------------------------------------------------------------------
# checks: each field against its section's ``limits``, then what must hold between fields (cheap, before any work)


def _check_limits(section: Any, prefix: str) -> None:
    """Every number of one section (each item of a tuple) against ``limits``; an unset optional (None) passes."""
    for name, limit in getattr(type(section), "limits", {}).items():
        value = getattr(section, name)
        for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
            problem = None if item is None else limit.problem(item)
            if problem:
                key = f"{prefix}{name}[{i}]" if isinstance(value, tuple) else f"{prefix}{name}"
                raise ConfigError(f"{key}={item!r} {problem}")


def _check_model(m: ModelConfig) -> tuple[int, int]:
    """The variant exists and the image tiles into windows at every stage. Returns (patch size, stages)."""
    import inspect

    from simmim.models import VARIANTS, SwinTransformerV2
    from simmim.models.swin_transformer_v2 import stage_geometry, to_pair

    if m.name not in VARIANTS:
        close = difflib.get_close_matches(m.name, list(VARIANTS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"model.name={m.name!r} is not a SwinV2 variant; {hint}choose one of: {', '.join(VARIANTS)}")
    variant = VARIANTS[m.name]
    patch = variant.get("patch_size", inspect.signature(SwinTransformerV2).parameters["patch_size"].default)
    stages = len(variant["depths"])
    try:
        stage_geometry(to_pair(m.img_size), patch, stages, to_pair(m.window_size))
    except ValueError as err:
        raise ConfigError(f"model.img_size={m.img_size} with model.window_size={m.window_size}: {err}") from None
    if m.pretrained_window_sizes is not None and len(m.pretrained_window_sizes) != stages:
        raise ConfigError(f"model.pretrained_window_sizes={list(m.pretrained_window_sizes)} needs one window per "
                          f"stage of {m.name} ({stages}), e.g. [12,12,12,6] after 192 px / W12")
    return patch, stages


def _check_image_data(d: DataConfig | FinetuneDataConfig, in_chans: int) -> None:
    if d.crop_scale[0] > d.crop_scale[1]:
        raise ConfigError(f"data.crop_scale={list(d.crop_scale)} must be [min, max] with min <= max")
    for name in ("mean", "std"):
        values = getattr(d, name)
        if len(values) != in_chans:
            example = "[0.5]" if in_chans == 1 else "[" + ",".join(["0.5"] * in_chans) + "]"
            raise ConfigError(f"data.{name}={list(values)} has {len(values)} values but model.in_chans is "
                              f"{in_chans}; give one per input channel, e.g. data.{name}={example}")


def _check_schedule(s: ScheduleConfig) -> None:
    if s.warmup_epochs > s.epochs:
        raise ConfigError(f"schedule.warmup_epochs={s.warmup_epochs:g} is longer than schedule.epochs={s.epochs}")
    if s.kind != "multistep":
        return
    if any(b <= a for a, b in zip(s.milestones, s.milestones[1:], strict=False)):
        raise ConfigError(f"schedule.milestones={list(s.milestones)} must increase")
    if any(m > s.epochs for m in s.milestones):
        raise ConfigError(f"schedule.milestones={list(s.milestones)} lie beyond schedule.epochs={s.epochs}, so the "
                          f"multistep lr would never decay there; set milestones within the epochs (e.g. "
                          f"schedule.milestones=[{max(1, s.epochs * 7 // 8)}]) or schedule.kind=cosine")


def _check_auto_augment(spec: str) -> None:
    """``spec`` parses as timm's ``create_transform`` would parse it (RandAugment, AugMix or AutoAugment)."""
    from timm.data import auto_augment as aa

    build = (aa.rand_augment_transform if spec.startswith("rand") else
             aa.augment_and_mix_transform if spec.startswith("augmix") else aa.auto_augment_transform)
    try:
        build(spec, {})
    except (AssertionError, ValueError, KeyError, IndexError):  # timm asserts on unknown sections and policies
        raise ConfigError(f"data.auto_augment={spec!r} is not a timm augmentation spec; e.g. rand-m9-mstd0.5-inc1 "
                          "(RandAugment), augmix-m5-w4-d2, original (AutoAugment), or null for none") from None


def _check_pretrain(cfg: PretrainConfig) -> None:
    patch, stages = _check_model(cfg.model)
    d, size = cfg.data, cfg.model.img_size
    if d.mask_patch_size % patch:
        raise ConfigError(f"data.mask_patch_size={d.mask_patch_size} must be a multiple of the backbone's patch size "
                          f"{patch} (each mask cell hides whole patches)")
    if size % d.mask_patch_size:
        raise ConfigError(f"model.img_size={size} must be a multiple of data.mask_patch_size={d.mask_patch_size} "
                          "(masks are drawn on a grid of mask_patch_size cells)")
    _check_image_data(d, cfg.model.in_chans)
    _check_schedule(cfg.schedule)
    window = cfg.simmim.norm_target_window
    if window % 2 == 0:
        raise ConfigError(f"simmim.norm_target_window={window} must be odd (a window centred on each pixel), "
                          f"e.g. {window + 1}")
    if cfg.monitor.stage >= stages:
        raise ConfigError(f"monitor.stage={cfg.monitor.stage} must be a stage of {cfg.model.name}: 0..{stages - 1}, "
                          "or -1 for the last")
    if cfg.monitor.img_size not in (None, size):  # the encoder only runs at the size it is built for
        raise ConfigError(f"monitor.img_size={cfg.monitor.img_size} differs from model.img_size={size}, the only "
                          "size the monitor can feed the encoder; leave monitor.img_size=null")


def _check_finetune(cfg: FinetuneConfig) -> None:
    _check_model(cfg.model)
    d, x = cfg.data, cfg.mixup
    _check_image_data(d, cfg.model.in_chans)
    _check_schedule(cfg.schedule)
    if cfg.model.in_chans != 3 and (d.auto_augment or d.color_jitter):
        raise ConfigError(f"data.auto_augment and data.color_jitter work on RGB images only; with model.in_chans="
                          f"{cfg.model.in_chans} set data.auto_augment=null data.color_jitter=0")
    if d.auto_augment:
        _check_auto_augment(d.auto_augment)
    if (x.mixup > 0 or x.cutmix > 0) and x.prob > 0 and d.batch_size % 2:
        raise ConfigError(f"data.batch_size={d.batch_size} must be even with mixup/cutmix on (timm's Mixup pairs each "
                          "image with another of its batch); use an even batch or mixup.mixup=0 mixup.cutmix=0")


_CONSISTENCY: dict[type, Callable[[Any], None]] = {PretrainConfig: _check_pretrain, FinetuneConfig: _check_finetune}


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
            value = _parse_yaml(value, key)
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
    data = {} if data is None else data
    if not isinstance(data, dict):
        where = f"section {prefix.rstrip('.')}" if prefix else "a config"
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
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
    cfg = cls(**kwargs)
    _check_limits(cfg, prefix)
    for kind, check in _CONSISTENCY.items():
        if isinstance(cfg, kind):
            check(cfg)
    return cfg


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
                node[part] = _override_value(raw, tp, item)
            else:
                section = ".".join(parts[:depth + 1])
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{section} is not a section")
                if node.get(part) is None:
                    node[part] = {}
                elif not isinstance(node[part], dict):
                    raise ConfigError(f"section {section} must be a mapping of keys, got {node[part]!r}")
                node[part] = dict(node[part])  # a copy: the caller's dict is never changed
                node = node[part]
                node_cls = tp
    return data


def _override_value(raw: str, tp: Any, item: str) -> Any:
    """An override's value: YAML, except that a string field takes the text as typed (a path such as
    ``runs/a #2``, ``yes`` or ``[x]`` stays itself) unless it is quoted or, for an optional field, null."""
    if not raw.strip():
        return ""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if str in args and not (raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) > 1):
        return None if type(None) in args and raw.strip().lower() in ("none", "null", "~") else raw
    return _parse_yaml(raw, f"override {item!r}")


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults <- YAML file (which may name a ``base:`` YAML it extends) <- ``key=value`` overrides."""
    data = read_yaml(Path(path)) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or [], cls))


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is merged underneath."""
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} extends itself through 'base:' ({' -> '.join(map(str, _seen))})")
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a YAML text file (not UTF-8)") from None
    data = _parse_yaml(text, f"config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model:, data:, ...), got {data!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base must be the path of the YAML file it extends, got {base!r}")
    return merge(read_yaml((path.parent / base).resolve(), (*_seen, path.resolve())), data)


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose errors are one-line ConfigErrors naming ``where`` and the line. The safe loader
    refuses tags that build Python objects (``!!python/...``): they are reported, never run."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        # where the broken construct starts (an unclosed bracket), else where the parser gave up
        mark = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parts = [getattr(err, "context", None), getattr(err, "problem", None)]
        problem = ": ".join(p for p in parts if p) or str(err)
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += " (config values are plain YAML; tags that build Python objects are refused)"
        raise ConfigError(" ".join(f"{where}{at}: {problem}".split())) from None


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
