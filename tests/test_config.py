"""Tests for the typed run configuration (simmim.config): precedence, type coercion, errors that name the key,
round-trips, immutability and the bundled YAML recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from simmim.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    replace,
    save_config,
    scaled_lr,
    to_dict,
)
from simmim.configs import CONFIG_DIR
from simmim.models import VARIANTS
from simmim.models.swin_transformer_v2 import stage_geometry, to_pair


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load(*overrides: str, path: Path | None = None) -> PretrainConfig:
    return load_config(PretrainConfig, path, list(overrides))


# ----------------------------------------------------------------------------------------------------------------
# precedence


def test_no_file_no_overrides_gives_the_defaults():
    assert load() == PretrainConfig()
    assert from_dict(PretrainConfig, None) == PretrainConfig()


def test_precedence_defaults_yaml_base_chain_overrides(tmp_path):
    write(tmp_path / "common" / "root.yaml", "optim:\n  eps: 1.0e-6\nrun:\n  seed: 1\n")
    write(tmp_path / "common" / "base.yaml",
          "base: root.yaml\noptim:\n  weight_decay: 0.1\n  base_lr: 1e-3\nschedule:\n  epochs: 50\nrun:\n  seed: 2\n")
    child = write(tmp_path / "exp" / "child.yaml",
                  "base: ../common/base.yaml\noptim:\n  base_lr: 2e-3\nschedule:\n  epochs: 60\n")
    defaults = PretrainConfig()

    cfg = load(path=child)
    assert cfg.optim.eps == 1e-6  # from the grand-parent
    assert cfg.run.seed == 2  # the parent overrides the grand-parent
    assert cfg.optim.weight_decay == 0.1  # from the parent, merged under the child's optim section
    assert cfg.optim.base_lr == 2e-3 and cfg.schedule.epochs == 60  # the child overrides its base
    assert cfg.optim.warmup_lr == defaults.optim.warmup_lr and cfg.model == defaults.model  # untouched defaults

    cfg = load("schedule.epochs=70", "run.seed=3", path=child)
    assert cfg.schedule.epochs == 70 and cfg.run.seed == 3  # overrides beat every file
    assert cfg.optim.base_lr == 2e-3


def test_later_override_wins_and_input_dict_is_not_mutated():
    data = {"optim": {"base_lr": 1.0}}
    out = apply_overrides(data, ["optim.base_lr=2", "optim.base_lr=3", "data.batch_size=8"], PretrainConfig)
    assert data == {"optim": {"base_lr": 1.0}}
    assert from_dict(PretrainConfig, out).optim.base_lr == 3.0
    assert from_dict(PretrainConfig, out).data.batch_size == 8


# ----------------------------------------------------------------------------------------------------------------
# coercion


def test_scientific_notation_is_a_float_in_yaml_and_on_the_cli(tmp_path):
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"  # the PyYAML quirk this guards against
    path = write(tmp_path / "c.yaml", "optim:\n  base_lr: 1e-4\n  min_lr: 5e-6\n")
    for cfg in (load(path=path), load("optim.base_lr=1e-4", "optim.min_lr=5e-6")):
        assert type(cfg.optim.base_lr) is float and cfg.optim.base_lr == 1e-4
        assert type(cfg.optim.min_lr) is float and cfg.optim.min_lr == 5e-6


def test_ints_floats_and_bools_are_coerced():
    cfg = load("data.batch_size=64", "optim.weight_decay=0", "model.grad_checkpointing=true",
               "run.progress=false", "schedule.warmup_epochs=2")
    assert type(cfg.data.batch_size) is int and cfg.data.batch_size == 64
    assert type(cfg.optim.weight_decay) is float and cfg.optim.weight_decay == 0.0
    assert cfg.model.grad_checkpointing is True and cfg.run.progress is False
    assert type(cfg.schedule.warmup_epochs) is float and cfg.schedule.warmup_epochs == 2.0


def test_tuples_are_coerced_and_their_length_checked(tmp_path):
    cfg = load("data.crop_scale=[0.5,1.0]", "model.pretrained_window_sizes=[12,12,12,6]", "schedule.milestones=[3]")
    assert cfg.data.crop_scale == (0.5, 1.0) and isinstance(cfg.data.crop_scale, tuple)
    assert cfg.model.pretrained_window_sizes == (12, 12, 12, 6)
    assert cfg.schedule.milestones == (3,)
    path = write(tmp_path / "c.yaml", "data:\n  crop_scale: [0.2, 1]\noptim:\n  betas: [0.9, 0.95]\n")
    cfg = load(path=path)
    assert cfg.data.crop_scale == (0.2, 1.0) and cfg.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"data\.crop_scale"):
        load("data.crop_scale=[0.5]")


@pytest.mark.parametrize("value", ["null", "None", "~"])
def test_optional_fields_accept_null(value):
    cfg = load(f"model.sequential_attention={value}", f"optim.clip_grad={value}")
    assert cfg.model.sequential_attention is None and cfg.optim.clip_grad is None
    assert load("model.sequential_attention=4").model.sequential_attention == 4


def test_literal_fields_accept_only_their_choices():
    assert load("schedule.kind=cosine").schedule.kind == "cosine"
    assert load("run.mixed_precision=fp16").run.mixed_precision == "fp16"
    with pytest.raises(ConfigError) as err:
        load("schedule.kind=linear")
    msg = str(err.value)
    assert "schedule.kind" in msg and "'cosine'" in msg and "'multistep'" in msg and "linear" in msg


def test_mixed_precision_no_is_the_string_no(tmp_path):
    # BUG (simmim/config.py, _coerce's Literal branch): YAML 1.1 reads a bare `no` as False, and the Literal check
    # compares False with 'no', so `run.mixed_precision=no` (the CPU setting) raises ConfigError instead of
    # giving 'no'. Same for an unquoted `mixed_precision: no` in a YAML file.
    assert load("run.mixed_precision=no").run.mixed_precision == "no"
    path = write(tmp_path / "c.yaml", "run:\n  mixed_precision: no\n")
    assert load(path=path).run.mixed_precision == "no"


# ----------------------------------------------------------------------------------------------------------------
# errors name the key


def test_unknown_yaml_key_names_the_dotted_key_with_a_hint(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  base_lrr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"'optim\.base_lrr'.*'base_lr'"):
        load(path=path)
    path = write(tmp_path / "d.yaml", "optimizer:\n  base_lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"'optimizer'.*'optim'"):
        load(path=path)


def test_unknown_override_key_names_the_dotted_key_with_a_hint():
    with pytest.raises(ConfigError, match=r"'optim\.base_lrr'.*did you mean 'base_lr'"):
        load("optim.base_lrr=1e-4")
    with pytest.raises(ConfigError, match=r"'zzz'"):
        load("zzz.a=1")
    with pytest.raises(ConfigError, match=r"optim\.base_lr is not a section"):
        load("optim.base_lr.x=1")


@pytest.mark.parametrize("override", [
    "data.batch_size=abc",
    "data.batch_size=1.5",
    "data.batch_size=[1,2]",
    "model.grad_checkpointing=maybe",
    "optim.base_lr=fast",
    "optim.base_lr=true",
    # BUG (simmim/config.py, _coerce's int branch): int(float('inf')) raises OverflowError (and NaN a bare
    # ValueError) outside the try, so these escape as non-ConfigErrors that do not name the key.
    "data.batch_size=.inf",
    "data.batch_size=.nan",
])
def test_wrong_types_fail_naming_the_key(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(override)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  batch_size: abc\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load(path=path)


def test_override_without_equals_fails():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load("optim.base_lr")


def test_a_whole_section_cannot_be_set():
    with pytest.raises(ConfigError, match=r"optim is a section"):
        load("optim=3")
    with pytest.raises(ConfigError, match="optim"):
        from_dict(PretrainConfig, {"optim": 3})


# ----------------------------------------------------------------------------------------------------------------
# round-trip, immutability, replace


def test_save_then_load_round_trips(tmp_path):
    cfg = load("optim.base_lr=3e-4", "data.crop_scale=[0.3,0.9]", "model.pretrained_window_sizes=[8,8,8,4]",
               "model.sequential_attention=2", "optim.clip_grad=null", "schedule.kind=cosine",
               "run.mixed_precision=fp16", "data.image_column=img", "schedule.milestones=[10,20]")
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load(path=path) == cfg
    saved = yaml.safe_load(path.read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(PretrainConfig)}
    assert set(saved["optim"]) == {f.name for f in dataclasses.fields(type(cfg.optim))}  # every key is written
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg


def test_configs_are_frozen():
    cfg = PretrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.base_lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None


def test_replace_returns_a_checked_copy():
    cfg = PretrainConfig()
    new = replace(cfg, **{"optim.base_lr": "2e-4", "run.output": "elsewhere"})
    assert new.optim.base_lr == 2e-4 and type(new.optim.base_lr) is float and new.run.output == "elsewhere"
    assert cfg == PretrainConfig()  # the original is untouched
    assert new.data == cfg.data
    with pytest.raises(ConfigError, match=r"optim\.base_lr"):
        replace(cfg, **{"optim.base_lr": "fast"})
    with pytest.raises(ConfigError, match=r"optim\.nope"):
        replace(cfg, **{"optim.nope": 1})
    with pytest.raises(ConfigError, match=r"schedule\.kind"):
        replace(cfg, **{"schedule.kind": "linear"})


def test_scaled_lr_is_linear_in_the_global_batch():
    assert scaled_lr(1e-4, 2048) == 4e-4
    assert scaled_lr(1e-4, 512) == 1e-4
    assert scaled_lr(3.2e-2, 16) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------------------
# bundled recipes

BUNDLED = sorted([*(CONFIG_DIR / "pretrain").glob("*.yaml"), *(CONFIG_DIR / "finetune").glob("*.yaml"),
                  *(CONFIG_DIR / "demo").glob("*.yaml")])


def config_class(path: Path) -> type:
    """Fine-tuning recipes live in finetune/ or are named finetune; the rest are pretraining recipes."""
    return FinetuneConfig if "finetune" in path.relative_to(CONFIG_DIR).as_posix() else PretrainConfig


def test_bundled_recipes_are_found():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in BUNDLED}
    assert {"pretrain/swinv2_base_192_w12_800ep.yaml", "pretrain/swinv2_base_192_w12_100ep.yaml",
            "demo/pretrain.yaml"} <= names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_bundled_recipe_loads(path):
    cfg = load_config(config_class(path), path)
    assert isinstance(cfg, config_class(path))
    assert cfg.model.name in VARIANTS
    if isinstance(cfg, PretrainConfig):
        assert cfg.model.img_size % cfg.data.mask_patch_size == 0
        assert cfg.simmim.norm_target_window % 2 == 1
    # the image must tile into windows at every stage (raises otherwise)
    stage_geometry(to_pair(cfg.model.img_size), 4, 4, to_pair(cfg.model.window_size))


def test_base_800ep_recipe_is_the_defaults():
    cfg = load(path=CONFIG_DIR / "pretrain" / "swinv2_base_192_w12_800ep.yaml")
    assert cfg.model.name == "swinv2_base"
    defaults = PretrainConfig()
    assert cfg == dataclasses.replace(defaults, model=dataclasses.replace(defaults.model, name=cfg.model.name))
    # and the defaults are the official SwinV2-B recipe
    assert (cfg.model.img_size, cfg.model.window_size, cfg.schedule.epochs) == (192, 12, 800)
    assert (cfg.optim.base_lr, cfg.optim.warmup_lr, cfg.optim.weight_decay) == (1e-4, 5e-7, 0.05)
    assert (cfg.schedule.kind, cfg.schedule.milestones, cfg.schedule.gamma) == ("multistep", (700,), 0.1)
    assert (cfg.data.mask_patch_size, cfg.data.mask_ratio, cfg.optim.clip_grad) == (32, 0.6, 5.0)
    assert cfg.simmim.norm_target and cfg.simmim.norm_target_window == 47


def test_100ep_recipe_is_short_and_cosine():
    cfg = load(path=CONFIG_DIR / "pretrain" / "swinv2_base_192_w12_100ep.yaml")
    assert cfg.schedule.epochs == 100 and cfg.schedule.kind == "cosine"
    assert cfg.model.name == "swinv2_base"  # inherited through base:
    assert type(cfg.optim.base_lr) is float and cfg.optim.base_lr == 2e-4


def test_finetune_recipe_defaults_are_the_official_swinv2_b_recipe():
    cfg = load_config(FinetuneConfig, CONFIG_DIR / "finetune" / "swinv2_base_224_w14_100ep.yaml")
    assert (cfg.model.img_size, cfg.model.window_size, cfg.model.pretrained_window_sizes) == (224, 14, None)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.kind) == (100, 20, "cosine")
    assert (cfg.optim.base_lr, cfg.optim.layer_decay, cfg.optim.weight_decay) == (1.25e-3, 0.75, 0.05)
    assert (cfg.mixup.mixup, cfg.mixup.cutmix, cfg.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.data.auto_augment, cfg.data.re_prob, cfg.data.interpolation) == ("rand-m9-mstd0.5-inc1", 0.25,
                                                                                "bicubic")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from simmim.models import swin_transformer_v2

    cfg = load_config_from_file(str(CONFIG_DIR / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    if name == "fsdp":  # the wrap unit must name a real class
        assert hasattr(swin_transformer_v2, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
