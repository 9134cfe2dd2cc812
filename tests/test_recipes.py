"""Recipes are code: every bundled pretraining and fine-tuning YAML takes one optimizer step here (real arithmetic
up to 150M parameters, below), at its own model size, image size, window, transforms, schedule and precision, at
batch 2 on embedded images. A dependency upgrade that breaks a recipe (Pillow 13 and timm's posterize did) fails
here, not in a user's first epoch.

Only what a recipe cannot be wrong about is reduced: the batch (2), the steps (1), DataLoader workers (0), the data
(embedded photos) and the checkpoint writes (skipped: about 1 GB each for a B model), except for the smallest recipe,
which writes its checkpoint for real and resumes from it.
Models above 150M parameters (Swin-L, SwinV2-L, -H, -G) take their step on the meta device: every shape, the
recipe's transform and mask on real images, forward, backward, clipping and AdamW, but no arithmetic. A real step
of an L model costs 15-20 s of the suite's time, and its arithmetic is the B model's code at another width and
depth: the B recipe of each family, at the same image size, takes its step for real (and a last stage whose window
is clamped to a smaller map, as in Swin-L's 12/12/12/6, is computed for real by the tiny Swin V1 tests).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment

from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.configs import CONFIG_DIR
from simmim.data.augment import posterize
from simmim.data.samples import sample_photos
from simmim.data.transforms import finetune_transform
from simmim.engine import Engine

PRETRAIN = sorted((CONFIG_DIR / "pretrain").glob("*.yaml"))
FINETUNE = sorted((CONFIG_DIR / "finetune").glob("*.yaml"))
ON_META = ("swin_large", "swinv2_large", "swinv2_huge", "swinv2_giant")  # 197M-3.0B parameters: shapes only
META_ABOVE = 150e6  # parameters
SAVED = CONFIG_DIR / "pretrain" / "swinv2_tiny_192_w12_800ep.yaml"  # its step writes and resumes a checkpoint
SMOKE = ["data.batch_size=2", "data.num_workers=0", "schedule.max_steps=1", "run.progress=false"]


def recipe_id(path: Path) -> str:
    return path.relative_to(CONFIG_DIR).with_suffix("").as_posix()


def recipe(cls: type, path: Path, *overrides: str):
    return load_config(cls, path, [*SMOKE, *overrides])


def labelled_folder(root: Path) -> Path:
    """ImageNet layout (train/<class>/, val/<class>/) of embedded photos: 2 classes, 2 train + 1 val image each."""
    photos = sample_photos()
    for split, per_class in (("train", 2), ("val", 1)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                photos[(3 * c + i) % len(photos)].save(folder / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# the fine-tuning transform (RandAugment rand-m9-mstd0.5-inc1) on every Pillow


def test_posterize_to_zero_bits_is_black_as_before_pillow_13():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    old_lut = [i & ~(2 ** 8 - 1) for i in range(256)]  # Pillow < 13's posterize(img, 0): keep no bit
    assert np.array_equal(np.asarray(posterize(img, 0)), np.asarray(img.point(old_lut * 3)))
    assert not np.asarray(posterize(img, 0)).any()
    assert not np.asarray(posterize(img.convert("L"), -2)).any()  # mmax > 10 drives the level below 0
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    assert posterize(img, 8) is img


def test_finetune_transform_posterizes_at_the_top_magnitude_without_patching_timm():
    tf = finetune_transform(32)
    (randaug,) = [t for t in tf.transforms if isinstance(t, auto_augment.RandAugment)]
    (op,) = [op for op in randaug.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the clipped draw that killed workers on Pillow 13
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert not np.asarray(op(img)).any()
    # timm itself is untouched: a RandAugment built directly still calls timm's own posterize
    plain = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    assert [o.aug_fn for o in plain.ops if o.name == "PosterizeIncreasing"] == [auto_augment.posterize]
    pickle.loads(pickle.dumps(tf))  # DataLoader workers started with spawn receive it pickled


def test_the_finetune_recipe_transform_survives_thousands_of_seeded_samples():
    """The bundled recipe's training transform over 4000 seeded draws (7 of them ask posterize for 0 bits), at 32 px
    so it takes seconds; the image size does not enter RandAugment's magnitudes."""
    d = load_config(FinetuneConfig, CONFIG_DIR / "finetune" / "swinv2_base_224_w14_100ep.yaml").data
    assert d.auto_augment == "rand-m9-mstd0.5-inc1"
    tf = finetune_transform(32, d.crop_scale, d.hflip, d.auto_augment, d.color_jitter, d.re_prob,
                            interpolation=d.interpolation, mean=d.mean, std=d.std)
    photos = [p.resize((48, 48)) for p in sample_photos()]
    failures = []
    for i in range(4000):
        random.seed(i)  # timm's ops draw from python's and numpy's global RNGs, the crop from torch's
        np.random.seed(i)
        torch.manual_seed(i)
        try:
            x = tf(photos[i % len(photos)])
        except Exception as err:  # collect, so the message says how often and why
            failures.append(f"sample {i}: {type(err).__name__}: {err}")
            continue
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    assert not failures, f"{len(failures)} of 4000 samples failed, e.g. {failures[:3]}"


# ----------------------------------------------------------------------------------------------------------------
# one optimizer step per recipe


def _no_checkpoints():
    return mock.patch.object(Engine, "save", lambda self, name=None: None)


@pytest.mark.parametrize("path", [p for p in PRETRAIN if p != SAVED], ids=recipe_id)  # SAVED: below
def test_pretrain_recipe_takes_one_step(path, tmp_path):
    cfg = recipe(PretrainConfig, path, "data.path=embedded:photos", f"run.output={tmp_path / 'run'}")
    if cfg.model.name in ON_META:
        return _pretrain_step_on_meta(cfg)
    from simmim.pretrain import run

    with _no_checkpoints():
        summary = run(cfg)
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0 and summary["finite"]


@pytest.mark.parametrize("path", FINETUNE, ids=recipe_id)
def test_finetune_recipe_takes_one_step(path, tmp_path):
    data = labelled_folder(tmp_path / "data")
    cfg = recipe(FinetuneConfig, path, f"data.path={data}", f"run.output={tmp_path / 'run'}")
    if cfg.model.name in ON_META:
        return _finetune_step_on_meta(cfg)
    from simmim.finetune import run

    with _no_checkpoints():
        summary = run(cfg)
    assert summary["steps"] == 1 and np.isfinite(summary["last_loss"])
    assert 0 <= summary["last_top1"] <= 100  # the end-of-run evaluation ran on the val split


def test_a_recipe_saves_and_resumes_for_real(tmp_path):
    """The smallest pretraining recipe (SwinV2-T) writes its step-1 checkpoint for real; a second run with
    ``run.resume=auto`` reads it back (weights, AdamW state, counters) and continues to step 2."""
    from simmim.pretrain import run

    args = ("data.path=embedded:photos", f"run.output={tmp_path / 'run'}")
    first = run(recipe(PretrainConfig, SAVED, *args))
    saved = torch.load(first["checkpoint"], weights_only=True)  # plain data, as any reader gets it
    assert first["steps"] == saved["step"] == 1 and saved["meta"]["config"]["model"]["name"] == "swinv2_tiny"
    adam_steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert adam_steps == {1.0}

    second = run(recipe(PretrainConfig, SAVED, *args, "schedule.max_steps=2", "run.resume=auto"))
    final = torch.load(second["checkpoint"], weights_only=True)
    assert second["steps"] == final["step"] == 2 and second["finite"]
    # AdamW's own step count goes on from the saved state (a fresh optimizer would be at 1)
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {2.0}
    assert final["train_state"]["step"] == 2
    moved = [k for k, v in final["model"].items() if not torch.equal(v, saved["model"][k])]
    assert moved  # the second step started from the saved weights and changed them


def test_exactly_the_models_too_big_for_a_cpu_step_are_checked_on_meta():
    """ON_META is checked against the models' sizes, not against itself: every recipe whose model has more than
    META_ABOVE parameters takes its step on meta, and no smaller one skips the real arithmetic."""
    from simmim.models import create_encoder

    names = {load_config(PretrainConfig if p in PRETRAIN else FinetuneConfig, p).model.name
             for p in [*PRETRAIN, *FINETUNE]}
    sizes = {}
    for name in names:
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in create_encoder(name, num_classes=0).parameters())
    assert {name for name, n in sizes.items() if n > META_ABOVE} == set(ON_META), sizes


def _meta_step(model: torch.nn.Module, loss: torch.Tensor, groups_of, schedule, optim) -> None:
    """backward, clip and one AdamW step with the recipe's schedule, all on the meta device."""
    from simmim.optim import build_optimization, plan_training

    assert loss.device.type == "meta" and loss.dim() == 0
    loss.backward()
    plan = plan_training(schedule, optim, 2, 1, batches_per_process=1)
    optimizer, scheduler = build_optimization(groups_of(model), schedule, optim, plan)
    scheduler.step_update(0)
    assert all(p.grad is not None for g in optimizer.param_groups for p in g["params"])
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
    optimizer.step()


def _pretrain_step_on_meta(cfg: PretrainConfig) -> None:
    from simmim.masked_modeling import SimMIM
    from simmim.optim import param_groups
    from simmim.pretrain import build_dataset, build_encoder

    with torch.device("meta"):
        encoder = build_encoder(cfg)
        model = SimMIM(encoder, norm_target=cfg.simmim.norm_target, norm_target_window=cfg.simmim.norm_target_window)
    dataset = build_dataset(cfg, encoder.patch_size)  # the recipe's transform and masks, on real images
    items = [dataset[i] for i in range(2)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    size = cfg.model.img_size
    assert images.shape == (2, 3, size, size) and masks.shape == (2, size // 4, size // 4)
    model.train()
    out = model(images.to("meta"), masks.to("meta"))
    assert out.pred.shape == (2, 3, size, size)
    _meta_step(model, out.loss, lambda m: param_groups(m, cfg.optim.weight_decay), cfg.schedule, cfg.optim)


def _finetune_step_on_meta(cfg: FinetuneConfig) -> None:
    from simmim.finetune import FinetuneTask, build_classifier, build_data
    from simmim.optim import param_groups

    train, _, classes = build_data(cfg, cfg.run.seed)
    with torch.device("meta"):
        model, _ = build_classifier(cfg, len(classes))
    items = [train[i] for i in range(2)]
    size = cfg.model.img_size
    batch = {"image": torch.stack([it["image"] for it in items]).to("meta"),
             "label": torch.stack([it["label"] for it in items]).to("meta")}
    assert batch["image"].shape == (2, 3, size, size)
    model.train()
    task = FinetuneTask(cfg, len(classes), accelerator=None, model=model, val_loader=None, eval_every=1)
    loss, logits = task.loss(model, batch)  # the recipe's mixup / cutmix and soft-target loss
    assert logits.shape == (2, len(classes))
    o = cfg.optim
    _meta_step(model, loss, lambda m: param_groups(m, o.weight_decay, o.layer_decay), cfg.schedule, o)
