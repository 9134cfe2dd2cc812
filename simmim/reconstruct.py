"""What a SimMIM checkpoint reconstructs: for each image a panel of original | masked input | reconstruction |
reconstruction pasted into the visible patches (``simmim reconstruct``).

A model trained with the normalised target (``simmim.norm_target``, the SwinV2 recipe) predicts, per pixel and
channel, ``(t - local mean) / local std`` over a ``norm_target_window`` square (47 px). To show pixels, the prediction
is un-normalised, ``pred * std + mean``; the true local statistics of a masked pixel depend on the hidden pixels, so
they are estimated from what the model saw (:func:`visible_stats`): for each mask cell (``mask_patch_size`` square),
the mean and Bessel-corrected variance per channel of the *visible* input pixels in the cell grown by
``norm_target_window // 2`` pixels on every side (the union of the windows of the cell's pixels), cropped at the
border; ``std = sqrt(var + 1e-6)`` as in training. A cell with fewer than 2 visible pixels in that region takes the
statistics of all visible pixels of the image. The same rule is applied to visible cells, so no hidden pixel is used.

Letters: B batch, C channels, H W pixels, h w token grid, gh gw mask-cell grid, P mask_patch_size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from simmim.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EmbeddedSource,
    MaskGenerator,
    UnreadableImageError,
    decode_tensor,
    read_raw,
)
from simmim.data.file_index import FileIndex
from simmim.data.images import RawImage, is_image_file
from simmim.errors import InputNotFoundError, UserError
from simmim.masked_modeling import SimMIM, check_norm_target_window
from simmim.models import VARIANTS, Family, create_model, detect_family, load_pretrained
from simmim.models.encoders import make_encoder
from simmim.models.swin_transformer_v2 import stage_geometry, to_pair
from simmim.models.variants import variant_of
from simmim.visualize import check_out_dir, reconstruction_grid, save_png, write_output
from simmim.weights import Geometry, Weights, WrongCheckpointError, read_weights

log = logging.getLogger(__name__)

OFFICIAL_NORM_TARGET = (True, 47)  # the released SwinV2 SimMIM recipe (its pickled config is not read)
OFFICIAL_MASK_PATCH = 32


class ImageTooSmall(UserError):
    """An image below the smallest size the model runs at (``--native-size``): skipped with a warning."""


class Reconstruction(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) normalised input
    mask: torch.Tensor  # (B, h, w) bool, True = masked
    pred: torch.Tensor  # (B, C, H, W) reconstruction in the normalised input space (norm_target undone)
    panel: torch.Tensor  # (3, B * (H + 2) + 2, 4 * (W + 2) + 2) in [0, 1], see reconstruction_grid


@dataclass
class MaskedModel:
    """A SimMIM model (encoder + decoder) in eval mode with what its panels need."""

    model: SimMIM
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mask_patch_size: int
    norm_target: bool
    norm_target_window: int
    what: str  # the checkpoint, in words

    @property
    def img_size(self) -> tuple[int, int]:
        return self.model.encoder.img_size


def visible_stats(images: torch.Tensor, pixel_mask: torch.Tensor, cell: int, window: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask cell, the mean and std of the visible pixels around it (module docstring).

    images (B, C, H, W); pixel_mask (B, 1, H, W) True = masked; ``cell`` the mask cell side (divides H and W);
    ``window`` the odd normalisation window. Returns mean and std (B, C, H, W), constant on each cell.
    """
    check_norm_target_window(window)
    r = window // 2
    x, v = images.float(), (~pixel_mask.bool()).float()
    # zero padding adds nothing to the sums, so a stride-`cell` sum pool of side cell + 2r is the cropped region
    pool = dict(kernel_size=cell + 2 * r, stride=cell, padding=r, count_include_pad=True)
    area = (cell + 2 * r) ** 2
    n = F.avg_pool2d(v, **pool) * area  # (B, 1, gh, gw) visible pixels per region
    s1 = F.avg_pool2d(x * v, **pool) * area  # (B, C, gh, gw)
    s2 = F.avg_pool2d(x * x * v, **pool) * area
    n_all = v.sum((2, 3), keepdim=True)  # (B, 1, 1, 1): the fallback, all visible pixels of the image
    if (n_all < 2).any():
        raise UserError("the mask leaves fewer than 2 visible pixels; lower --mask-ratio")
    s1_all, s2_all = (x * v).sum((2, 3), keepdim=True), (x * x * v).sum((2, 3), keepdim=True)
    few = n < 2
    n, s1, s2 = torch.where(few, n_all, n), torch.where(few, s1_all, s1), torch.where(few, s2_all, s2)
    mean = s1 / n
    var = ((s2 - n * mean**2) / (n - 1)).clamp(min=0)
    std = (var + 1e-6).sqrt()

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(cell, 2).repeat_interleave(cell, 3)  # (B, C, H, W)

    return up(mean), up(std)


# ----------------------------------------------------------------------------------------------------------------
# the model


def load_masked_model(path: str | Path | Weights, norm_target: bool | None = None,
                      norm_target_window: int | None = None, mask_patch_size: int | None = None,
                      img_size: int | None = None, window_size: int | None = None) -> MaskedModel:
    """The SimMIM model in a pretraining checkpoint (ours or an official SimMIM release) at its trained geometry.

    The normalised-target setting, its window and the mask cell come from the run's config; for an official file
    (whose pickled config is not read) they default to the SwinV2 recipe (on, 47, 32 px). Arguments override them.
    ``img_size``/``window_size`` give the geometry of a file that does not record it. Raises :class:`UserError`
    for a file without the SimMIM decoder (a fine-tuned classifier, an exported encoder).
    """
    weights = path if isinstance(path, Weights) else read_weights(path)
    sd = weights.state_dict
    if "decoder.0.weight" not in sd or "encoder.mask_token" not in sd:
        raise WrongCheckpointError(
            f"{weights.describe()} has no SimMIM decoder and mask token (a fine-tuned or exported encoder?); "
            "reconstruct needs a pretraining checkpoint: one of simmim pretrain's checkpoints/ckpt-*.pt or an "
            "official SimMIM release")
    encoder_sd = weights.encoder()
    family = detect_family(encoder_sd)
    if family is not None and family.name != "swinv2":  # Swin V1 / ViT: the contract's builder and conversion
        return _load_other(weights, family, norm_target, norm_target_window, mask_patch_size, img_size, window_size)
    geometry = weights.geometry
    if geometry is None:
        if img_size is None or window_size is None:
            raise UserError(f"{weights.describe()} does not record the geometry it was trained at; pass "
                            "--img-size and --window-size (e.g. 192 and 12 for the paper's pretraining)")
        variant = variant_of(encoder_sd)
        if variant is None:
            raise WrongCheckpointError(f"{weights.describe()} matches none of the variants {', '.join(VARIANTS)}")
        geometry = Geometry(variant, to_pair(img_size), to_pair(window_size),
                            [(0, 0)] * len(VARIANTS[variant]["depths"]))
    variant = geometry.variant or weights.meta.get("model") or variant_of(encoder_sd)
    if variant is None:
        raise WrongCheckpointError(f"{weights.describe()} matches none of the variants {', '.join(VARIANTS)}")
    config = weights.meta.get("config") or {}
    recipe = config.get("simmim", {})  # empty for an official file: its defaults are the released recipe's
    if norm_target is None:
        norm_target = recipe.get("norm_target", False) if config else OFFICIAL_NORM_TARGET[0]
    window = norm_target_window or recipe.get("norm_target_window") or OFFICIAL_NORM_TARGET[1]
    cell = mask_patch_size or config.get("data", {}).get("mask_patch_size") or OFFICIAL_MASK_PATCH
    stem = encoder_sd["patch_embed.proj.weight"]
    encoder = create_model(variant, num_classes=0, in_chans=stem.shape[1], drop_path_rate=0.0,
                           **geometry.model_kwargs())
    model = SimMIM(encoder, norm_target=norm_target, norm_target_window=window)
    load_pretrained(model, weights)
    channels = stem.shape[1]
    mean = tuple(weights.meta.get("mean") or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels))
    std = tuple(weights.meta.get("std") or (IMAGENET_STD if channels == 3 else (0.5,) * channels))
    return MaskedModel(model.eval(), mean, std, cell, norm_target, window, weights.describe())


def _load_other(weights: Weights, family: Family, norm_target: bool | None, norm_target_window: int | None,
                mask_patch_size: int | None, img_size: int | None, window_size: int | None) -> MaskedModel:
    """:func:`load_masked_model` for a Swin V1 / ViT SimMIM checkpoint: built at the geometry its metadata records
    (or the one passed; an official file records none); an official file predicts raw pixels (no normalised
    target) and masks 32 px cells, as the official SimMIM recipes."""
    meta, encoder_sd = weights.meta, weights.encoder()
    variant = meta.get("model") or (family.variant_of(encoder_sd) if family.variant_of else None)
    if variant is None:
        raise WrongCheckpointError(f"{weights.describe()} matches none of the {family.name} variants "
                                   f"{', '.join(family.variants)}")
    size = img_size or (meta.get("img_size") or [None])[0]
    window = window_size or (meta.get("window_size") or [None])[0]
    if size is None or (family.windowed and window is None):
        raise UserError(f"{weights.describe()} does not record the geometry it was trained at; pass --img-size and "
                        "--window-size (e.g. 192 and 6 for SimMIM's Swin-B pretraining)")
    stem = encoder_sd["patch_embed.proj.weight"]
    encoder = make_encoder(variant, img_size=size, window_size=window, num_classes=0, in_chans=stem.shape[1])
    config = meta.get("config") or {}
    recipe = config.get("simmim", {})
    norm_target = recipe.get("norm_target", False) if norm_target is None else norm_target
    window_t = norm_target_window or recipe.get("norm_target_window") or OFFICIAL_NORM_TARGET[1]
    cell = mask_patch_size or config.get("data", {}).get("mask_patch_size") or OFFICIAL_MASK_PATCH
    model = SimMIM(encoder, norm_target=norm_target, norm_target_window=window_t)
    load_pretrained(model, family.convert(weights.state_dict, encoder), source="timm")
    channels = stem.shape[1]
    mean = tuple(meta.get("mean") or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels))
    std = tuple(meta.get("std") or (IMAGENET_STD if channels == 3 else (0.5,) * channels))
    return MaskedModel(model.eval(), mean, std, cell, norm_target, window_t, weights.describe())


@torch.no_grad()
def reconstruct(masked: MaskedModel, images: torch.Tensor, mask: torch.Tensor) -> Reconstruction:
    """Run the model on normalised ``images`` (B, C, H, W) at the model's size with ``mask`` (B, h, w), True =
    masked; the prediction is un-normalised as the module docstring says when the model predicts the normalised
    target."""
    out = masked.model(images, mask)
    pred = out.pred.float()
    if masked.norm_target:
        enc = masked.model.encoder
        pixel_mask = mask.repeat_interleave(enc.patch_size, 1).repeat_interleave(enc.patch_size, 2)[:, None]
        mean, std = visible_stats(images, pixel_mask, masked.mask_patch_size, masked.norm_target_window)
        pred = pred * std + mean
    panel = reconstruction_grid(images, mask, pred, masked.mean, masked.std, max_images=len(images))
    return Reconstruction(images, mask, pred, panel)


# ----------------------------------------------------------------------------------------------------------------
# images and files


def tiling_size(height: int, width: int, masked: MaskedModel) -> tuple[int, int]:
    """The largest (H', W') <= (height, width) the model can run at with whole mask cells and windows."""
    enc = masked.model.encoder
    step = math.lcm(enc.encoder_stride, masked.mask_patch_size)
    best = None
    for h in range(height // step * step, 0, -step):
        for w in range(width // step * step, 0, -step):
            if best is not None and h * w <= best[0] * best[1]:
                break
            try:
                stage_geometry((h, w), enc.patch_size, len(enc.layers), enc.window_size)
            except UserError:
                continue
            best = (h, w)
            break
    if best is None:
        raise ImageTooSmall(f"{width}x{height} px is smaller than the model's smallest size, {step} px a side")
    return best


def fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, *size): resized (antialiased bicubic) so it covers ``size``, then centre-cropped."""
    H, W = x.shape[-2:]
    scale = max(size[0] / H, size[1] / W)
    if size != (H, W):
        x = TF.resize(x.float(), [max(size[0], round(H * scale)), max(size[1], round(W * scale))], antialias=True,
                      interpolation=TF.InterpolationMode.BICUBIC)
    return TF.center_crop(x, list(size))


def load_input(item: Input, masked: MaskedModel, native_size: bool) -> torch.Tensor:
    """An input image -> normalised (1, C, H, W) at the model's size (or the image's own size, cropped to tile)."""
    enc = masked.model.encoder
    x, _ = decode_tensor(item.open(enc.in_chans), enc.in_chans)  # (C, H, W)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    size = tiling_size(*x.shape[-2:], masked) if native_size else enc.img_size
    x = fit(x, size).clamp(0, 1)
    mean, std = torch.tensor(masked.mean).view(-1, 1, 1), torch.tensor(masked.std).view(-1, 1, 1)
    return ((x - mean) / std)[None]


@dataclass(frozen=True)
class Input:
    """One image to reconstruct: a file, or item ``index`` of the embedded images (``embedded:photos``...)."""

    name: str  # the panel is <name>.png
    path: Path | None = None
    embedded: EmbeddedSource | None = None
    index: int = 0

    def open(self, channels: int) -> RawImage:
        if self.embedded is not None:
            return self.embedded[self.index]
        return read_raw(self.path, channels)

    def __str__(self) -> str:
        return str(self.path) if self.embedded is None else self.embedded.describe(self.index)


def list_inputs(inputs: Sequence[str | Path]) -> list[Input]:
    """Files as given, folders scanned recursively for images (sorted; hidden files ignored), ``embedded:KIND``
    the images that ship in scikit-image / scikit-learn (``embedded`` = the photos). Panel names are the stems,
    made unique with -2, -3 ... in order."""
    found: list[tuple[str, dict]] = []
    for item in map(str, inputs):
        if item == "embedded" or item.startswith("embedded:"):
            source = EmbeddedSource(item.partition(":")[2] or "photos")
            found += [(Path(source.describe(i).replace(":", "_")).stem, dict(embedded=source, index=i))
                      for i in range(len(source))]
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            index = FileIndex.scan(path, is_image_file)
            if not len(index):
                log.warning("no image files under %s", path)
            found += [(Path(index.path(i)).stem, dict(path=Path(index.path(i)))) for i in range(len(index))]
        elif path.exists():
            found.append((path.stem, dict(path=path)))
        else:
            raise InputNotFoundError(f"image {path} does not exist (check the path)")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    seen: dict[str, int] = {}
    out = []
    for stem, where in found:
        seen[stem] = seen.get(stem, 0) + 1
        out.append(Input(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png", **where))
    return out


def reconstruct_files(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path,
                      mask_ratio: float = 0.6, seed: int = 0, native_size: bool = False, overwrite: bool = False,
                      **model_options) -> list[Path]:
    """One panel PNG per readable image in ``inputs`` (files, folders, ``embedded:photos``), named after it in
    ``out``.

    Each mask is drawn from ``seed`` (images of one size get the same mask). Unreadable images are skipped with a
    warning. ``model_options`` go to :func:`load_masked_model`. Returns the written paths.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise UserError(f"--mask-ratio {mask_ratio} must be in (0, 1), e.g. 0.6")
    items = list_inputs(inputs)
    out = check_out_dir(out, [item.name for item in items], overwrite)
    masked = load_masked_model(checkpoint, **model_options)
    enc = masked.model.encoder
    trained = enc.img_size
    written: list[Path] = []
    for item in items:
        try:
            images = load_input(item, masked, native_size)
        except (UnreadableImageError, ImageTooSmall) as err:
            log.warning("skipped an image: %s", err if str(item) in str(err) else f"{item}: {err}")
            continue
        size = tuple(images.shape[-2:])
        if size != enc.img_size:
            enc.set_input_size(img_size=size)  # the log-CPB stays normalised by the trained windows
        generator = MaskGenerator(size, masked.mask_patch_size, enc.patch_size, mask_ratio)
        mask = generator(np.random.default_rng(seed))[None]  # (1, h, w)
        result = reconstruct(masked, images, mask)
        written.append(write_output(partial(save_png, result.panel), out / item.name, len(written)))
    if enc.img_size != trained:
        enc.set_input_size(img_size=trained)
    return written
