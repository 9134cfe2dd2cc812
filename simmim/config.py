"""Typed run configuration, the schema: frozen dataclasses hold every default (YAML files hold differences), each
section's ``limits`` table holds the range of its numbers, and :meth:`PretrainConfig.check` /
:meth:`FinetuneConfig.check` hold what must agree between fields (image size vs windows and masks, schedule,
channels, mixup batch). Reading YAML, types, ``key.sub=value`` overrides and the one-line errors are the loader's
(:mod:`simmim.config_loader`); its public names are importable from here too.

Defaults are the official SwinV2-B SimMIM recipe (192 px, W12, 800 epochs); ``configs/`` holds the variations.
Learning rates are per 512 images and scaled linearly by the global batch (:func:`scaled_lr`), never written back.

A new key is one field in its section (with a comment saying why it has its default), plus a ``limits`` entry if it
is a number, plus a line in :meth:`check` if it must agree with another field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from simmim.config_loader import (
    ConfigError,
    Float,
    Int,
    Section,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    replace,
    save_config,
    to_dict,
)
from simmim.errors import UserError
from simmim.masked_modeling import check_norm_target_window
from simmim.models.encoders import check_encoder_geometry, probe_points

__all__ = [
    "ConfigError", "DataConfig", "FinetuneConfig", "FinetuneDataConfig", "PretrainConfig", "Range",
    "apply_overrides", "from_dict", "load_config", "read_yaml", "replace", "save_config", "scaled_lr", "to_dict",
]


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
UNIT = Range(0, 1, low_open=True)  # (0, 1]: crop scales and fractions that cannot be empty


@dataclass(frozen=True)
class ModelConfig(Section):
    name: str = "swinv2_base"  # an encoder variant (simmim models): swinv2_*, swin_*, vit_*
    img_size: Int = 192  # the SimMIM pretraining resolution of the paper
    window_size: Int = 12  # 192 px / W12 gives effective windows 12/12/12/6
    pretrained_window_sizes: tuple[Int, ...] | None = None  # None: no earlier window (pretraining from scratch)
    drop_path_rate: Float = 0.1  # official SwinV2-B SimMIM recipe
    in_chans: Int = 3
    # what blocks recompute in backward: none; attention (the attention core and GELU: ~0.6x memory for a few %
    # of step time); full (activation checkpointing, timm's set_grad_checkpointing). See models/recompute.py
    recompute: Literal["none", "attention", "full"] = "none"
    sequential_attention: Int | None = None  # windows per attention chunk (paper §3.6); None = all at once
    # where float32 CPU Linear products run: auto (oneDNN, ~2x faster than MKL on the project's CPU, where it
    # passes its check; F.linear elsewhere); aten (always F.linear). Same products up to summation order.
    linear_backend: Literal["auto", "aten"] = "auto"

    limits: ClassVar[dict[str, Range]] = {
        "img_size": AT_LEAST_1, "window_size": AT_LEAST_1,
        "pretrained_window_sizes": Range(0, hint=" (0 = not pretrained at that stage)"),
        "drop_path_rate": FRACTION, "in_chans": AT_LEAST_1, "sequential_attention": AT_LEAST_1,
    }
    # a second switch for the same thing once silently overrode recompute: one key now
    removed: ClassVar[dict[str, str]] = {
        "grad_checkpointing": "model.recompute=full for true (false is model.recompute=none, the default)"}


@dataclass(frozen=True)
class ImageDataConfig(Section):
    """What pretraining and fine-tuning data share: where the images are, how they are batched, cropped and
    normalised. Each task's section adds its own keys."""

    path: str = ""  # folder of images, datasets save_to_disk folder, hf:NAME, or embedded[:photos|digits|all]
    image_column: str | None = None  # for datasets sources; None = the first Image column
    batch_size: Int = 128  # per device; the global batch is batch_size x processes x accumulation_steps
    num_workers: Int = 8
    crop_scale: tuple[Float, Float] = (0.67, 1.0)  # RandomResizedCrop scale of the official pretraining
    mean: tuple[Float, ...] = IMAGENET_DEFAULT_MEAN  # one per input channel (model.in_chans); ImageNet's
    std: tuple[Float, ...] = IMAGENET_DEFAULT_STD

    limits: ClassVar[dict[str, Range]] = {
        "batch_size": AT_LEAST_1, "num_workers": AT_LEAST_0, "crop_scale": UNIT, "mean": Range(), "std": POSITIVE,
    }


@dataclass(frozen=True)
class DataConfig(ImageDataConfig):
    split: str = "train"  # for datasets sources
    streaming: bool = False  # iterate a hub dataset without downloading it whole
    shuffle_buffer: Int = 1000  # records per stream reader shuffled together (tar shards, streamed datasets)
    mask_patch_size: Int = 32  # masks are drawn on a 32 px grid, then upsampled to tokens
    mask_ratio: Float = 0.6

    limits: ClassVar[dict[str, Range]] = {
        **ImageDataConfig.limits, "mask_patch_size": AT_LEAST_1, "shuffle_buffer": AT_LEAST_0,
        "mask_ratio": Range(0, 1, low_open=True, high_open=True),
    }


@dataclass(frozen=True)
class OptimConfig(Section):
    base_lr: Float = 1e-4  # per 512 images
    warmup_lr: Float = 5e-7  # per 512 images
    min_lr: Float = 5e-6  # per 512 images (cosine floor)
    weight_decay: Float = 0.05
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-8
    clip_grad: Float | None = 5.0  # max global grad norm; None = no clipping
    accumulation_steps: Int = 1
    layer_decay: Float = 1.0  # layer-wise lr decay (fine-tuning); 1.0 = off
    # ZeRO stage 1 under plain data parallel: each process keeps the AdamW moments of its share of the parameters
    # only (torch's ZeroRedundancyOptimizer), about 1/processes of them; off because it needs the same process
    # count to resume its sharded checkpoint. FSDP and DeepSpeed shard on their own (their accelerate configs)
    shard_state: bool = False

    limits: ClassVar[dict[str, Range]] = {
        "base_lr": POSITIVE, "warmup_lr": AT_LEAST_0, "min_lr": AT_LEAST_0, "weight_decay": AT_LEAST_0,
        "betas": FRACTION, "eps": POSITIVE,
        "clip_grad": Range(0, low_open=True, hint="; optim.clip_grad=null turns clipping off"),
        "accumulation_steps": AT_LEAST_1, "layer_decay": Range(0, 1, low_open=True, hint=" (1 = off)"),
    }


@dataclass(frozen=True)
class ScheduleConfig(Section):
    epochs: Int = 800
    warmup_epochs: Float = 10
    kind: Literal["cosine", "multistep"] = "multistep"
    milestones: tuple[Int, ...] = (700,)  # epochs where multistep multiplies the lr by gamma
    gamma: Float = 0.1
    max_steps: Int | None = None  # stop after this many optimizer steps (short runs, tests); None = epochs

    limits: ClassVar[dict[str, Range]] = {
        "epochs": AT_LEAST_1, "warmup_epochs": AT_LEAST_0, "milestones": AT_LEAST_0, "gamma": POSITIVE,
        "max_steps": Range(1, hint="; schedule.max_steps=null runs schedule.epochs"),
    }


@dataclass(frozen=True)
class SimMIMConfig(Section):
    norm_target: bool = True  # per-pixel normalised target, on in the official SwinV2 recipe
    # odd sliding window of the target normalisation; its rule is simmim.masked_modeling.check_norm_target_window's
    norm_target_window: Int = 47


@dataclass(frozen=True)
class RunConfig(Section):
    output: str = "runs/pretrain"
    seed: Int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: Int = 20  # optimizer steps between scalar logs
    image_every: Int = 1000  # steps between reconstruction grids (0 = only at the end)
    save_every: Int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: Int = 3  # step checkpoints kept
    # write checkpoints on a background thread from a host copy of the state: training waits only for the copy
    # (costs one host-memory copy of weights + optimizer state); same atomic files and rotation as a direct save
    async_save: bool = False
    resume: str | None = None  # "auto" = newest valid checkpoint in output/checkpoints, or a path
    max_bad_steps: Int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True  # tqdm bar on the main process
    compile: bool = False  # torch.compile the encoder (fullgraph, fixed size): faster steps after a compile
    # CPU intra-op threads; 0 = auto: the CPUs this process may use (affinity, cgroup quota) minus one per data
    # worker, never above OMP_NUM_THREADS; more threads than free cores makes a shared CPU much slower, not faster
    threads: Int = 0
    # peak FLOP/s of one device for the logged MFU (perf/mfu), e.g. 989e12 for an H100's bf16; unset: a known
    # GPU's datasheet peak, else (CPUs) only the achieved TFLOP/s is logged
    peak_flops: Float | None = None

    limits: ClassVar[dict[str, Range]] = {
        "peak_flops": Range(0, low_open=True, hint=" (FLOP/s of one device, e.g. 989e12)"),
        "seed": Range(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
        "log_every": AT_LEAST_1, "image_every": Range(0, hint=" (0 = only at the end)"), "save_every": AT_LEAST_1,
        "keep_last": AT_LEAST_1, "max_bad_steps": AT_LEAST_1, "threads": Range(0, hint=" (0 = auto)"),
    }


@dataclass(frozen=True)
class MonitorConfig(Section):
    data: str = ""  # labelled data for k-NN / linear-probe monitoring (e.g. embedded:digits); "" = off
    every: Int = 0  # steps between evaluations during pretraining; 0 = only at the end (when data is set)
    # what is probed: a Swin's stage (pooled; -1 = the last, normed), a ViT's block (0-based, patch tokens pooled);
    # None = the last stage of a Swin, block depth * 2 // 3 - 1 of a ViT (the SimMIM paper's probe: 8th of 12)
    stage: Int | None = None
    knn_k: Int = 20
    img_size: Int | None = None  # None = model.img_size, the only size the encoder runs at (checked)

    limits: ClassVar[dict[str, Range]] = {
        "every": Range(0, hint=" (0 = only at the end)"), "stage": Range(-1), "knn_k": AT_LEAST_1,
        "img_size": AT_LEAST_1,
    }


@dataclass(frozen=True)
class PretrainConfig(Section):
    init: str = ""  # warm start: weights to begin from (ours, official SimMIM, timm, HF); not a resume; "" = random
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self) -> None:
        """Every number in range, then what must hold between fields; the loader calls this on every config it
        builds. Raises a one-line ConfigError naming the keys."""
        _check_limits(self)
        patch, _ = _check_model(self.model)
        d, size = self.data, self.model.img_size
        if d.mask_patch_size % patch:
            raise ConfigError(f"data.mask_patch_size={d.mask_patch_size} must be a multiple of the backbone's patch "
                              f"size {patch} (each mask cell hides whole patches)")
        if size % d.mask_patch_size:
            raise ConfigError(f"model.img_size={size} must be a multiple of data.mask_patch_size={d.mask_patch_size} "
                              "(masks are drawn on a grid of mask_patch_size cells)")
        _check_image_data(d, self.model.in_chans)
        _check_schedule(self.schedule)
        try:
            check_norm_target_window(self.simmim.norm_target_window)
        except UserError as err:
            raise ConfigError(str(err)) from None
        what, count, _ = probe_points(self.model.name)
        if self.monitor.stage is not None and self.monitor.stage >= count:
            raise ConfigError(f"monitor.stage={self.monitor.stage} must be a {what} of {self.model.name}: "
                              f"0..{count - 1}, or -1 for the last")
        if self.monitor.img_size not in (None, size):  # the encoder only runs at the size it is built for
            raise ConfigError(f"monitor.img_size={self.monitor.img_size} differs from model.img_size={size}, the "
                              "only size the monitor can feed the encoder; leave monitor.img_size=null")


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning: the official SwinV2-B recipe (224 px, W14, 100 epochs) as defaults


@dataclass(frozen=True)
class FinetuneModelConfig(ModelConfig):
    img_size: Int = 224
    window_size: Int = 14
    pretrained_window_sizes: tuple[Int, ...] | None = None  # None: the windows the checkpoint was trained at
    num_classes: Int | None = None  # None: the number of classes in the data

    limits: ClassVar[dict[str, Range]] = {**ModelConfig.limits, "num_classes": AT_LEAST_1}


@dataclass(frozen=True)
class FinetuneDataConfig(ImageDataConfig):
    # path: an ImageNet-style folder (train/<class>/, val/<class>/), save_to_disk dir, hf:NAME, embedded:digits
    crop_scale: tuple[Float, Float] = (0.08, 1.0)  # RandomResizedCrop scale of the official fine-tuning
    train_split: str = "train"
    val_split: str = "val"  # "validation" etc. are found too
    label_column: str | None = None
    hflip: Float = 0.5  # horizontal flip probability
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec
    color_jitter: Float = 0.4
    re_prob: Float = 0.25  # random erasing
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = "bicubic"
    crop_pct: Float = 0.875  # eval: resize to img_size / crop_pct (256 for 224), center-crop; 1.0 = plain resize

    limits: ClassVar[dict[str, Range]] = {
        **ImageDataConfig.limits, "hflip": PROBABILITY, "color_jitter": AT_LEAST_0, "re_prob": PROBABILITY,
        "crop_pct": UNIT,
    }


@dataclass(frozen=True)
class MixupConfig(Section):
    mixup: Float = 0.8  # alpha; 0 = off
    cutmix: Float = 1.0  # alpha; 0 = off
    prob: Float = 1.0
    switch_prob: Float = 0.5
    label_smoothing: Float = 0.1

    limits: ClassVar[dict[str, Range]] = {
        "mixup": AT_LEAST_0, "cutmix": AT_LEAST_0, "prob": PROBABILITY, "switch_prob": PROBABILITY,
        "label_smoothing": FRACTION,
    }


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    base_lr: Float = 1.25e-3  # per 512 images
    warmup_lr: Float = 2.5e-7
    min_lr: Float = 2.5e-7
    layer_decay: Float = 0.75


@dataclass(frozen=True)
class FinetuneScheduleConfig(ScheduleConfig):
    epochs: Int = 100
    warmup_epochs: Float = 20
    kind: Literal["cosine", "multistep"] = "cosine"
    milestones: tuple[Int, ...] = ()


@dataclass(frozen=True)
class EMAConfig(Section):
    enabled: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3), evaluated too
    decay: Float = 0.9999

    limits: ClassVar[dict[str, Range]] = {"decay": FRACTION}


@dataclass(frozen=True)
class FinetuneRunConfig(RunConfig):
    output: str = "runs/finetune"
    eval_every: Int = 0  # steps between evaluations; 0 = every epoch

    limits: ClassVar[dict[str, Range]] = {**RunConfig.limits, "eval_every": Range(0, hint=" (0 = every epoch)")}


@dataclass(frozen=True)
class FinetuneConfig(Section):
    pretrained: str = ""  # checkpoint to start from: ours, an exported encoder, official or timm; "" = from scratch
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)

    def check(self) -> None:
        """As :meth:`PretrainConfig.check`, for fine-tuning."""
        _check_limits(self)
        _check_model(self.model)
        d, x = self.data, self.mixup
        _check_image_data(d, self.model.in_chans)
        _check_schedule(self.schedule)
        if self.model.in_chans != 3 and (d.auto_augment or d.color_jitter):
            raise ConfigError(f"data.auto_augment and data.color_jitter work on RGB images only; with "
                              f"model.in_chans={self.model.in_chans} set data.auto_augment=null data.color_jitter=0")
        if d.auto_augment:
            _check_auto_augment(d.auto_augment)
        if (x.mixup > 0 or x.cutmix > 0) and x.prob > 0 and d.batch_size % 2:
            raise ConfigError(f"data.batch_size={d.batch_size} must be even with mixup/cutmix on (timm's Mixup pairs "
                              "each image with another of its batch); use an even batch or mixup.mixup=0 "
                              "mixup.cutmix=0")


# ----------------------------------------------------------------------------------------------------------------
# checks: each number against its section's ``limits``, then what must hold between fields (cheap, before any work)


def _check_limits(cfg: Any) -> None:
    """Every number of every section (each item of a tuple) against ``limits``; an unset optional (None) passes."""
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        for name, limit in getattr(type(section), "limits", {}).items():
            value = getattr(section, name)
            for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
                problem = None if item is None else limit.problem(item)
                if problem:
                    key = f"{f.name}.{name}[{i}]" if isinstance(value, tuple) else f"{f.name}.{name}"
                    raise ConfigError(f"{key}={item!r} {problem}")


def _check_model(m: ModelConfig) -> tuple[int, int]:
    """The variant exists (in any encoder family) and the image tiles into its tokens and windows at every stage;
    the SwinV2-only switches are refused for other families. Returns (patch size, stages)."""
    try:
        family, patch, stages = check_encoder_geometry(m.name)
    except UserError as err:  # the message starts with the name's repr: "'swinv2_tinny' is not an encoder ..."
        raise ConfigError(f"model.name={err}") from None
    try:
        check_encoder_geometry(m.name, m.img_size, m.window_size)
    except UserError as err:
        raise ConfigError(f"model.img_size={m.img_size} with model.window_size={m.window_size}: {err}") from None
    if family.name != "swinv2":
        for key, value, default in (("pretrained_window_sizes", m.pretrained_window_sizes, None),
                                    ("sequential_attention", m.sequential_attention, None)):
            if value != default:
                raise ConfigError(f"model.{key} applies to SwinV2 only, not {m.name} ({family.name}); remove it")
        if m.recompute == "attention":
            raise ConfigError(f"model.recompute=attention applies to SwinV2 only; for {m.name} use "
                              "model.recompute=full (activation checkpointing) or none")
        return patch, stages
    if m.pretrained_window_sizes is not None and len(m.pretrained_window_sizes) != stages:
        raise ConfigError(f"model.pretrained_window_sizes={list(m.pretrained_window_sizes)} needs one window per "
                          f"stage of {m.name} ({stages}), e.g. [12,12,12,6] after 192 px / W12")
    return patch, stages


def _check_image_data(d: ImageDataConfig, in_chans: int) -> None:
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


def scaled_lr(lr_per_512: float, global_batch: int) -> float:
    """The linear scaling rule of the official recipes: learning rates are quoted per 512 images."""
    return lr_per_512 * global_batch / 512
