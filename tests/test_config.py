"""Tests for the typed run configuration (simmim.config): precedence, type coercion, errors that name the key,
round-trips, immutability and the bundled YAML recipes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from simmim.config import (
    ConfigError,
    DataConfig,
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
from simmim.models import list_encoders
from simmim.models.encoders import check_encoder_geometry


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
          "base: root.yaml\noptim:\n  weight_decay: 0.1\n  base_lr: 1e-3\nschedule:\n  epochs: 50\n  kind: cosine\n"
          "run:\n  seed: 2\n")
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
    cfg = load("data.batch_size=64", "optim.weight_decay=0", "data.streaming=yes",
               "run.progress=false", "schedule.warmup_epochs=2")
    assert type(cfg.data.batch_size) is int and cfg.data.batch_size == 64
    assert type(cfg.optim.weight_decay) is float and cfg.optim.weight_decay == 0.0
    assert cfg.data.streaming is True and cfg.run.progress is False
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


def test_string_overrides_are_taken_as_typed():
    # a path from --data/--output is not YAML: ` #` would start a comment, yes/[x] would become a bool/list
    for text in ["/data/my images #1", "yes", "[x]", "a: b", "runs/exp#2"]:
        assert load(f"data.path={text}", f"run.output={text}").data.path == text
    assert load('data.path="quoted #1"').data.path == "quoted #1"  # YAML quotes still work
    assert load("data.image_column=null").data.image_column is None  # an optional string can be unset
    assert load("data.image_column=img").data.image_column == "img"


def test_literal_fields_accept_only_their_choices():
    assert load("schedule.kind=cosine").schedule.kind == "cosine"
    assert load("run.mixed_precision=fp16").run.mixed_precision == "fp16"
    with pytest.raises(ConfigError) as err:
        load("schedule.kind=linear")
    msg = str(err.value)
    assert "schedule.kind" in msg and "'cosine'" in msg and "'multistep'" in msg and "linear" in msg


def test_mixed_precision_no_is_the_string_no(tmp_path):
    # YAML 1.1 reads a bare `no` as False: the Literal branch must map it back to 'no' (the CPU setting), on the
    # command line and in an unquoted `mixed_precision: no` in a file
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
    "run.compile=maybe",
    "optim.base_lr=fast",
    "optim.base_lr=true",
    # int(float('inf')) raises OverflowError and NaN a bare ValueError: both must become errors naming the key
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
# ranges and consistency: checked when the config is built, one line naming the real key


@pytest.mark.parametrize("override, message", [
    ("model.window_size=0", "model.window_size=0 must be >= 1"),
    ("run.save_every=0", "run.save_every=0 must be >= 1"),
    ("run.log_every=0", "run.log_every=0 must be >= 1"),
    ("schedule.epochs=0", "schedule.epochs=0 must be >= 1"),
    ("optim.accumulation_steps=0", "optim.accumulation_steps=0 must be >= 1"),
    ("schedule.max_steps=-3", "schedule.max_steps=-3 must be >= 1"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate=1.5 must be in [0, 1)"),
    ("run.max_bad_steps=0", "run.max_bad_steps=0 must be >= 1"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be > 0; optim.clip_grad=null turns clipping off"),
    ("optim.clip_grad=0", "optim.clip_grad=0.0 must be > 0"),  # `clip_grad or inf` would read 0 as "off"
    ("optim.base_lr=.nan", "optim.base_lr=nan must be a finite number"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]=1.0 must be in [0, 1)"),
    ("data.crop_scale=[0,1]", "data.crop_scale[0]=0.0 must be in (0, 1]"),
    ("data.std=[0.2,0.2,0]", "data.std[2]=0.0 must be > 0"),
    ("run.seed=-1", "run.seed=-1 must be in [0, 4294967295]"),
    ("model.pretrained_window_sizes=[12,12,12,-1]", "model.pretrained_window_sizes[3]=-1 must be >= 0"),
])
def test_out_of_range_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, keys", [
    (["model.name=swinv2_tinny"], ["model.name", "did you mean 'swinv2_tiny'"]),
    (["model.img_size=200"], ["model.img_size=200", "model.window_size=12", "use e.g. 192"]),
    (["model.img_size=224"], ["model.img_size=224", "window_size"]),  # 224 / W12: stage grid 56 is not 12k
    (["model.pretrained_window_sizes=[12,6]"], ["model.pretrained_window_sizes", "one window per stage"]),
    (["data.mask_patch_size=30"], ["data.mask_patch_size=30", "patch size 4"]),
    (["data.mask_patch_size=128"], ["model.img_size=192", "data.mask_patch_size=128"]),
    (["schedule.warmup_epochs=900"], ["schedule.warmup_epochs=900", "schedule.epochs=800"]),
    (["schedule.epochs=100"], ["schedule.milestones=[700]", "schedule.epochs=100", "schedule.kind=cosine"]),
    (["schedule.milestones=[600,300]"], ["schedule.milestones=[600, 300] must increase"]),
    (["data.crop_scale=[0.9,0.5]"], ["data.crop_scale=[0.9, 0.5]", "min <= max"]),
    (["model.in_chans=1"], ["data.mean", "model.in_chans is 1"]),
    (["simmim.norm_target_window=46"], ["simmim.norm_target_window=46 must be odd"]),
    (["monitor.stage=4"], ["monitor.stage=4", "0..3"]),
    (["monitor.img_size=96"], ["monitor.img_size=96", "model.img_size=192", "monitor.img_size=null"]),
])
def test_values_that_do_not_fit_together_fail_naming_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert all(k in str(err.value) for k in keys), str(err.value)


def test_consistent_changes_across_fields_are_accepted():
    cfg = load("model.in_chans=1", "data.mean=[0.5]", "data.std=[0.25]", "schedule.epochs=100",
               "schedule.milestones=[80,90]", "model.img_size=256", "model.window_size=16",
               "data.mask_patch_size=32")
    assert cfg.data.mean == (0.5,) and cfg.schedule.milestones == (80, 90)
    assert load("schedule.epochs=100", "schedule.kind=cosine").schedule.epochs == 100  # milestones unused


def test_finetune_specific_checks():
    def ft(*overrides: str) -> FinetuneConfig:
        return load_config(FinetuneConfig, None, list(overrides))

    for override, key in [("data.auto_augment=rnd-m9", "data.auto_augment='rnd-m9'"),
                          ("data.interpolation=bicubik", "data.interpolation"),
                          ("data.batch_size=3", "data.batch_size=3 must be even"),
                          ("mixup.label_smoothing=1", "mixup.label_smoothing=1.0"),
                          ("ema.decay=1", "ema.decay=1.0"),
                          ("data.crop_pct=0", "data.crop_pct=0.0"),
                          ("model.num_classes=0", "model.num_classes=0"),
                          ("run.eval_every=-1", "run.eval_every=-1")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            ft(override)
    assert ft("data.batch_size=3", "mixup.mixup=0", "mixup.cutmix=0").data.batch_size == 3  # no mixup: any batch
    assert ft("data.auto_augment=augmix-m5-w4-d2").data.auto_augment == "augmix-m5-w4-d2"
    assert ft("data.auto_augment=null").data.auto_augment is None


def test_a_section_that_is_not_a_mapping_fails_naming_it(tmp_path):
    path = write(tmp_path / "c.yaml", "data: 5\n")
    for overrides in ([], ["data.path=embedded"]):  # the CLI's --data adds an override into that section
        with pytest.raises(ConfigError, match=r"section data must be a mapping of keys, got 5"):
            load(*overrides, path=path)
    empty = write(tmp_path / "e.yaml", "data:\nmodel:\n  name: swinv2_tiny\n")  # an empty section is no change
    assert load("data.batch_size=4", path=empty).data == dataclasses.replace(DataConfig(), batch_size=4)
    with pytest.raises(ConfigError, match=r"config .*l\.yaml must be a mapping of sections"):
        load(path=write(tmp_path / "l.yaml", "- 1\n- 2\n"))


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "model:\n  name: swinv2_tiny\n  img_size: [64\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 3, column 13: .*flow sequence"):
        load(path=path)
    with pytest.raises(ConfigError, match=r"override 'model\.img_size=\[64'.*flow sequence"):
        load("model.img_size=[64")
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x80\x02}q\x00")  # e.g. a checkpoint passed as the config
    with pytest.raises(ConfigError, match=r"model\.yaml is not a YAML text file"):
        load(path=binary)


def test_yaml_is_read_with_yaml_1_2_words_and_numbers(tmp_path):
    """PyYAML's YAML 1.1 reads `no` as False and 1e-4 as a string; configs are read as YAML 1.2: a string key
    keeps the word (it became 'False'), a bool key still takes yes/no/on/off, numbers are numbers."""
    path = write(tmp_path / "c.yaml", "data:\n  path: no\n  streaming: yes\n  split: on\n"
                                      "optim:\n  base_lr: 1e-4\nschedule:\n  epochs: 1e3\n  kind: cosine\n")
    cfg = load(path=path)
    assert (cfg.data.path, cfg.data.streaming, cfg.data.split) == ("no", True, "on")
    assert cfg.optim.base_lr == 1e-4 and cfg.schedule.epochs == 1000 and type(cfg.schedule.epochs) is int


def test_keys_that_are_not_names_fail_naming_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 1 in section data must be a name$"):
        load(path=write(tmp_path / "c.yaml", "data:\n  1: 2\n"))
    with pytest.raises(ConfigError, match=r"^config key 1 must be a name$"):
        load(path=write(tmp_path / "d.yaml", "1: 2\n"))


def test_removed_keys_name_their_replacement_in_both_configs(tmp_path):
    path = write(tmp_path / "old.yaml", "model:\n  grad_checkpointing: false\n")  # a config.yaml saved before
    for cls in (PretrainConfig, FinetuneConfig):
        for source in ({"path": path}, {"overrides": ["model.grad_checkpointing=true"]}):
            with pytest.raises(ConfigError, match=r"'model\.grad_checkpointing' was removed; use model\.recompute="
                                                  r"full for true \(false is model\.recompute=none"):
                load_config(cls, **source)


def test_variant_geometry_is_the_one_source_of_model_shape():
    from simmim.errors import UserError
    from simmim.models import variant_geometry

    assert variant_geometry("swinv2_giant")[:2] == (4, 4)
    assert [w for _, w in variant_geometry("swinv2_base", 192, 12).stages] == [(12, 12)] * 3 + [(6, 6)]
    with pytest.raises(UserError, match="did you mean 'swinv2_tiny'"):
        variant_geometry("swinv2_tinny")
    with pytest.raises(UserError, match="window_size"):
        variant_geometry("swinv2_tiny", 224, 12)


def test_python_tags_are_refused_naming_the_file_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = write(tmp_path / "evil.yaml", f"run:\n  seed: 1\nmodel:\n  name: {tag}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml, line 4, column 9: .*python/object/apply:os\.system.*refused"):
        load(path=path)
    with pytest.raises(ConfigError, match=r"override 'model\.img_size=.*refused"):
        load(f"model.img_size={tag}")
    with pytest.raises(ConfigError, match=r"model\.name='!!python.* is not an encoder variant"):
        load(f"model.name={tag}")  # a string field takes the text as typed: never YAML, never run
    assert not marker.exists()


def test_cli_prints_config_errors_as_one_line_and_exits_2(tmp_path, capsys):
    from simmim.cli import main

    bad = write(tmp_path / "bad.yaml", "model:\n  name: !!python/name:os.system\n")
    for argv, start in [(["pretrain", "demo/pretrain", "model.window_size=0"], "model.window_size=0 must be"),
                        (["pretrain", str(bad)], f"config {bad}, line 2"),
                        (["finetune", "demo/finetune", "optim.clip_grad=-1"], "optim.clip_grad=-1.0 must be"),
                        (["pretrain", "demo/pretrain", "--data", "embedded", "run.max_bad_steps=0"],
                         "run.max_bad_steps=0 must be")]:
        assert main([*argv, "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {start}") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------------------------
# messages quote real keys

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "warn", "print", "_fail",
                 "add_argument", "add_parser"}  # logging, the CLI's output and argparse help


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts too) inside a ``raise``, an exception constructed for
    later, a logging/warnings/print call or an argparse help text."""
    import ast

    out, seen = [], set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if not (name in MESSAGE_CALLS or name.endswith(("Error", "Exception", "Warning"))):
                continue
        elif not isinstance(node, ast.Raise):
            continue
        for leaf in ast.walk(node):
            if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str) and id(leaf) not in seen:
                seen.add(id(leaf))
                out.append((leaf.lineno, leaf.value))
    return out


def _schema() -> dict[str, set[str]]:
    """section -> keys, over PretrainConfig and FinetuneConfig together."""
    out: dict[str, set[str]] = {}
    for cfg in (PretrainConfig(), FinetuneConfig()):
        for f in dataclasses.fields(cfg):
            section = getattr(cfg, f.name)
            if dataclasses.is_dataclass(section):
                out.setdefault(f.name, set()).update(g.name for g in dataclasses.fields(section))
    return out


def test_every_key_named_in_a_message_exists():
    """``(data.img_size)`` in a message once pointed at a key that never existed; every ``section.key`` that a
    message, log line or help text of simmim/, models/ or data/ names must be a real key of PretrainConfig or
    FinetuneConfig. A parenthesised ``(word.word)`` counts even when the section is unknown (``checkpoint.x``)."""
    schema = _schema()
    sections = "|".join(sorted(schema))
    named = re.compile(rf"(?<![\w.])((?:{sections})\.[a-z_]+)\b(?!\.\w|\()")  # not a module path or a call
    parenthesised = re.compile(r"\(([a-z_]+\.[a-z_]+(?:, [a-z_]+\.[a-z_]+)*)\)")
    found, wrong = set(), []
    for folder in ("simmim", "models", "data"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _message_strings(path):
                keys = set(named.findall(text))
                keys |= {k for group in parenthesised.findall(text) for k in group.split(", ")}
                for key in keys:
                    section, name = key.split(".")
                    if name in ("safetensors", "json", "yaml", "pt", "pth", "bin", "onnx"):  # model.safetensors
                        continue
                    found.add(key)
                    if name not in schema.get(section, ()):
                        wrong.append(f"{path.relative_to(ROOT)}:{line}: {key}")
    assert not wrong, "messages name keys that do not exist:\n" + "\n".join(sorted(wrong))
    assert len(found) >= 25 and {"data.batch_size", "run.keep_last", "model.img_size"} <= found  # the scan works


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
    assert cfg.model.name in list_encoders()  # SwinV2 or another family's variant
    if isinstance(cfg, PretrainConfig):
        assert cfg.model.img_size % cfg.data.mask_patch_size == 0
        assert cfg.simmim.norm_target_window % 2 == 1
    # the image must tile into the family's tokens (and windows at every stage of a Swin; raises otherwise)
    check_encoder_geometry(cfg.model.name, cfg.model.img_size, cfg.model.window_size)


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
