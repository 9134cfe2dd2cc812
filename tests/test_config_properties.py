"""Property-based config tests (hypothesis): for every number field of PretrainConfig and FinetuneConfig, values
outside its declared range are rejected when the config is loaded, by one line naming the key; values inside it
(with the fields they must agree with set to match) build a config holding exactly that value.

The strategies are read from each section's ``limits`` table, so a new number field is covered as soon as it
declares its range, and :func:`test_every_number_field_declares_a_range` fails until it does. Those properties
cannot catch a wrong range (a test drawn from the table agrees with the table), so the last section checks the
schema against :data:`EXPECTED`, a second table written from the README and the paper's recipes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simmim.config import ConfigError, FinetuneConfig, PretrainConfig, Range, load_config

# number fields whose rule is not a range but a named function of the library (tested through EXPECTED below)
RULES = {"simmim.norm_target_window": "simmim.masked_modeling.check_norm_target_window"}
FAST = settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
NUMBER = (int, float)


def _number_fields() -> list[tuple[type, str, type, bool, Range | None]]:
    """(config class, dotted key, item type, is a tuple, declared range) for every int/float field and every tuple
    of them, Optional included."""
    out = []
    for cls in (PretrainConfig, FinetuneConfig):
        for section in dataclasses.fields(cls):
            section_cls = typing.get_type_hints(cls)[section.name]
            if not dataclasses.is_dataclass(section_cls):
                continue
            hints = typing.get_type_hints(section_cls)
            for f in dataclasses.fields(section_cls):
                tp = hints[f.name]
                if typing.get_origin(tp) in (typing.Union, types.UnionType):
                    tp = next(a for a in typing.get_args(tp) if a is not type(None))
                is_tuple = typing.get_origin(tp) is tuple
                item = typing.get_args(tp)[0] if is_tuple else tp
                if item in NUMBER and item is not bool and f"{section.name}.{f.name}" not in RULES:
                    limit = section_cls.limits.get(f.name) if hasattr(section_cls, "limits") else None
                    out.append((cls, f"{section.name}.{f.name}", item, is_tuple, limit))
    return out


FIELDS = _number_fields()
IDS = [f"{cls.__name__}:{key}" for cls, key, *_ in FIELDS]


def _text(v: Any) -> str:
    """An override value as a user types it (YAML): 1e-05, .nan, [1, 2]."""
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_text(i) for i in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf")
    return repr(v)


def _default(cls: type, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cls(), section), name)


# ----------------------------------------------------------------------------------------------------------------
# strategies from a Range


def _inside(item: type, r: Range) -> st.SearchStrategy:
    if item is int:
        low = None if r.low is None else math.floor(r.low) + 1 if r.low_open else math.ceil(r.low)
        high = None if r.high is None else math.ceil(r.high) - 1 if r.high_open else math.floor(r.high)
        return st.integers(min_value=low, max_value=high if high is not None else (low or 0) + 10**6)
    return st.floats(min_value=r.low, max_value=r.high, exclude_min=r.low_open and r.low is not None,
                     exclude_max=r.high_open and r.high is not None, allow_nan=False, allow_infinity=False,
                     **({} if r.low is not None or r.high is not None else {"min_value": -1e6, "max_value": 1e6}))


def _outside(item: type, r: Range) -> st.SearchStrategy:
    options = []
    if item is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if r.low is not None:
        if item is int:
            options.append(st.integers(max_value=math.ceil(r.low) - (0 if r.low_open else 1)))
        else:
            options.append(st.floats(max_value=r.low, exclude_max=not r.low_open, allow_nan=False,
                                     allow_infinity=False))
    if r.high is not None:
        if item is int:
            options.append(st.integers(min_value=math.floor(r.high) + (0 if r.high_open else 1)))
        else:
            options.append(st.floats(min_value=r.high, exclude_min=not r.high_open, allow_nan=False,
                                     allow_infinity=False))
    if item is int:  # an int field given a fraction is a type error, also named
        options.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not v.is_integer()))
    return st.one_of(options)


# ----------------------------------------------------------------------------------------------------------------
# valid values of fields that must agree with others: (overrides, expected value)

def _geometry(which: str) -> st.SearchStrategy:
    """img_size = 32 * window * j tiles into windows at every stage (no clamping, every grid a multiple of W)."""
    def build(w: int, j: int) -> tuple[list[str], int]:
        img = 32 * w * j
        return [f"model.img_size={img}", f"model.window_size={w}", f"monitor.img_size={img}"], \
            img if which == "img_size" else w
    return st.builds(build, st.integers(1, 12), st.integers(1, 3))


def _channels() -> st.SearchStrategy:
    # RandAugment and colour jitter are RGB operations: other channel counts build with them off
    return st.integers(1, 8).map(lambda n: ([f"model.in_chans={n}", f"data.mean={[0.5] * n}",
                                             f"data.std={[0.25] * n}"], n))


def _finetune_channels() -> st.SearchStrategy:
    return _channels().map(lambda case: (case[0] + ([] if case[1] == 3 else ["data.auto_augment=null",
                                                                              "data.color_jitter=0"]), case[1]))


def _sorted_pair() -> st.SearchStrategy:
    unit = st.floats(min_value=0, max_value=1, exclude_min=True)
    return st.tuples(unit, unit).map(lambda p: tuple(sorted(p)))


SPECIAL = {
    "model.img_size": _geometry("img_size"),
    "model.window_size": _geometry("window_size"),
    "model.in_chans": _channels(),
    "model.pretrained_window_sizes": st.tuples(*[st.integers(0, 64)] * 4),
    "data.crop_scale": _sorted_pair(),
    "data.mean": st.tuples(*[st.floats(-10, 10)] * 3),
    "data.mask_patch_size": st.sampled_from([4, 8, 12, 16, 24, 32, 48, 64, 96, 192]),  # x4, dividing 192
    "schedule.epochs": st.integers(1, 10**6).map(
        lambda e: ([f"schedule.epochs={e}", "schedule.kind=cosine", "schedule.warmup_epochs=0"], e)),
    "schedule.warmup_epochs": st.floats(0, 100).map(
        lambda w: ([f"schedule.warmup_epochs={w!r}", "schedule.epochs=100", "schedule.kind=cosine"], w)),
    "schedule.milestones": st.lists(st.integers(0, 800), max_size=4, unique=True).map(
        lambda m: ([f"schedule.milestones={sorted(m)}", "schedule.kind=multistep", "schedule.epochs=800"],
                   tuple(sorted(m)))),
    "monitor.stage": st.integers(-1, 3),
    "monitor.img_size": st.just(192),  # the encoder's own size is the only one
    "data.batch_size": st.integers(1, 4096).map(
        lambda b: ([f"data.batch_size={b}", "mixup.mixup=0", "mixup.cutmix=0"], b)),  # mixup needs even ones
}


def _as_case(cls: type, key: str, drawn: Any) -> tuple[list[str], Any]:
    """The overrides to load and the value expected; context for sections ``cls`` lacks (mixup, monitor) dropped."""
    if not (isinstance(drawn, tuple) and len(drawn) == 2 and isinstance(drawn[0], list)):
        return [f"{key}={_text(drawn)}"], drawn
    sections = {f.name for f in dataclasses.fields(cls)}
    return [o for o in drawn[0] if o.split(".")[0] in sections], drawn[1]


# ----------------------------------------------------------------------------------------------------------------
# the properties


def test_every_number_field_declares_a_range():
    assert len(FIELDS) > 60  # both configs, every section
    missing = [key for cls, key, _, _, limit in FIELDS if limit is None]
    assert not missing, f"number fields without a range in their section's limits: {missing}"


@pytest.mark.parametrize("cls, key, item, is_tuple, limit", FIELDS, ids=IDS)
@FAST
@given(data=st.data())
def test_values_outside_the_range_are_rejected_naming_the_key(cls, key, item, is_tuple, limit, data):
    bad = data.draw(_outside(item, limit), label="bad")
    if is_tuple:  # one bad item among valid ones (the default, or one valid item for an empty tuple)
        good = list(_default(cls, key) or [data.draw(_inside(item, limit))])
        good[data.draw(st.integers(0, len(good) - 1))] = bad
        bad = good
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [f"{key}={_text(bad)}"])
    message = str(err.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize("cls, key, item, is_tuple, limit", FIELDS, ids=IDS)
@FAST
@given(data=st.data())
def test_values_inside_the_range_build(cls, key, item, is_tuple, limit, data):
    if cls is FinetuneConfig and key == "model.in_chans":
        drawn = data.draw(_finetune_channels(), label="value")
    elif key in SPECIAL:
        drawn = data.draw(SPECIAL[key], label="value")
    elif is_tuple:
        size = len(_default(cls, key)) or 2
        drawn = tuple(data.draw(st.lists(_inside(item, limit), min_size=size, max_size=size)))
    else:
        drawn = data.draw(_inside(item, limit), label="value")
    overrides, expected = _as_case(cls, key, drawn)
    cfg = load_config(cls, None, overrides)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected


# ----------------------------------------------------------------------------------------------------------------
# the schema against an independent table: what the README and the paper's recipes say each number may be, written
# by hand in interval notation (not read from the code). "odd >= 3" is the normalised target's sliding window.

EXPECTED = {
    # model: sizes and counts are positive; 0 in pretrained_window_sizes means "not pretrained at that stage";
    # stochastic depth is a drop probability (the recipes use 0.1-0.2; 1 would drop every block)
    "model.img_size": ">= 1", "model.window_size": ">= 1", "model.pretrained_window_sizes": ">= 0",
    "model.drop_path_rate": "[0, 1)", "model.in_chans": ">= 1", "model.sequential_attention": ">= 1",
    "model.num_classes": ">= 1",
    # data: the paper masks a fraction of patches (0.6; neither none nor all), crops keep a non-empty share of the
    # image, std divides; flip/erase are probabilities, crop_pct a share of the resized image
    "data.batch_size": ">= 1", "data.num_workers": ">= 0", "data.mask_patch_size": ">= 1",
    "data.shuffle_buffer": ">= 0",  # records shuffled together per stream reader; 0 = stream order
    "data.mask_ratio": "(0, 1)", "data.crop_scale": "(0, 1]", "data.mean": "any", "data.std": "> 0",
    "data.hflip": "[0, 1]", "data.color_jitter": ">= 0", "data.re_prob": "[0, 1]", "data.crop_pct": "(0, 1]",
    # optim: AdamW (lr > 0, betas in [0, 1), eps > 0), clip 5 (null turns it off, 0 is not "off"), layer decay
    # 0.75-0.8 where 1 is off
    "optim.base_lr": "> 0", "optim.warmup_lr": ">= 0", "optim.min_lr": ">= 0", "optim.weight_decay": ">= 0",
    "optim.betas": "[0, 1)", "optim.eps": "> 0", "optim.clip_grad": "> 0", "optim.accumulation_steps": ">= 1",
    "optim.layer_decay": "(0, 1]",
    # schedule: 800 / 100 epochs, 10 / 20 warmup epochs (0 = none), milestone 700, gamma 0.1
    "schedule.epochs": ">= 1", "schedule.warmup_epochs": ">= 0", "schedule.milestones": ">= 0",
    "schedule.gamma": "> 0", "schedule.max_steps": ">= 1",
    "simmim.norm_target_window": "odd >= 3",
    # run: numpy's seed range; intervals in steps (0 = only at the end / every epoch where the README says so)
    "run.seed": "[0, 4294967295]", "run.log_every": ">= 1", "run.image_every": ">= 0", "run.save_every": ">= 1",
    "run.keep_last": ">= 1", "run.max_bad_steps": ">= 1", "run.eval_every": ">= 0",
    # CPU threads: 0 = auto (the usable CPUs minus the data workers), else a count
    "run.threads": ">= 0",
    # the peak FLOP/s of one device for MFU: a positive rate (unset = unknown)
    "run.peak_flops": "> 0",
    # monitor: -1 is the last stage; every 0 = only at the end
    "monitor.every": ">= 0", "monitor.stage": ">= -1", "monitor.knn_k": ">= 1", "monitor.img_size": ">= 1",
    # mixup/cutmix alphas (0 = off), probabilities, label smoothing 0.1 (1 would be a uniform target); EMA 0.9999
    "mixup.mixup": ">= 0", "mixup.cutmix": ">= 0", "mixup.prob": "[0, 1]", "mixup.switch_prob": "[0, 1]",
    "mixup.label_smoothing": "[0, 1)", "ema.decay": "[0, 1)",
}


def _allowed(spec: str, value: float) -> bool:
    """Whether ``value`` is in ``spec`` ("[0, 1)", "> 0", ">= -1", "any", "odd >= 3"); never for NaN or inf."""
    if not math.isfinite(value):
        return False
    if spec == "any":
        return True
    if spec.startswith("odd "):
        return value % 2 == 1 and _allowed(spec[4:], value)
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        return (low < value if spec[0] == "(" else low <= value) and (value < high if spec[-1] == ")" else
                                                                        value <= high)
    op, bound = spec.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def _probes(spec: str, item: type) -> list[float]:
    """Values on both sides of every bound of ``spec`` (the next representable number for floats), far values,
    and for floats NaN and inf."""
    bounds = [float(b) for b in spec.replace("odd", "").strip(" [()]>=").split(",") if b.strip()] \
        if spec != "any" else []
    out: list[float] = [-1e30, 1e30] if item is float else [-(10**9), 10**9]
    for b in bounds:
        out += [b - 1, b, b + 1] if item is int else [math.nextafter(b, -math.inf), b, math.nextafter(b, math.inf)]
    if item is float:
        out += [math.nan, math.inf, -math.inf]
    return [int(v) if item is int else v for v in out]


def _schema_allows(cls: type, key: str, value: float) -> bool:
    """What the schema says about ``value`` for ``key``: its section's range, or the library rule it names."""
    section, name = key.split(".")
    limit = getattr(type(getattr(cls(), section)), "limits", {}).get(name)  # read now: a test may patch it
    if limit is not None:
        return limit.problem(value) is None
    assert key in RULES, key
    try:
        load_config(cls, None, [f"{key}={_text(value)}"])
    except ConfigError as err:
        assert key in str(err), str(err)
        return False
    return True


def _schema_fields() -> list[tuple[type, str, type]]:
    """(config class, dotted key, item type) of every number field, those checked by a RULES function too."""
    fields = [(cls, key, item) for cls, key, item, _, _ in FIELDS]
    for key in RULES:
        section, name = key.split(".")
        fields.append((PretrainConfig, key, type(getattr(getattr(PretrainConfig(), section), name))))
    return fields


def _disagreements(fields: list[tuple[type, str, type]]) -> list[str]:
    out = []
    for cls, key, item in fields:
        for value in _probes(EXPECTED[key], item):
            schema = _schema_allows(cls, key, value)
            if schema != _allowed(EXPECTED[key], value):
                verdict = "allows" if schema else "refuses"
                out.append(f"{cls.__name__} {key}={value!r}: schema {verdict} it, expected {EXPECTED[key]}")
    return out


def test_every_number_field_is_in_the_independent_table():
    keys = {key for _, key, _ in _schema_fields()}
    assert keys == set(EXPECTED), f"missing from EXPECTED: {keys - set(EXPECTED)}; not in the schema: " \
                                  f"{set(EXPECTED) - keys}"


def test_the_schema_ranges_agree_with_the_independent_table():
    wrong = _disagreements(_schema_fields())
    assert not wrong, "\n".join(wrong)


def test_values_outside_the_independent_table_are_refused_when_loaded():
    """The table's bounds, one step outside, are refused by load_config naming the key (not only by ``limits``)."""
    for cls, key, item in _schema_fields():
        if EXPECTED[key] == "any":
            continue
        bad = [v for v in _probes(EXPECTED[key], item) if not _allowed(EXPECTED[key], v)]
        is_tuple = any(f[1] == key and f[3] for f in FIELDS if f[0] is cls)
        for value in bad:  # a tuple gets the bad value in every item (checked before its length)
            text = _text([value] * len(_default(cls, key) or [0])) if is_tuple else _text(value)
            with pytest.raises(ConfigError, match=re.escape(key)):
                load_config(cls, None, [f"{key}={text}"])


def test_the_independent_check_catches_a_wrong_range(monkeypatch):
    """A range widened by mistake (drop_path_rate up to 2, mask_ratio including 1) is what the check is for."""
    from simmim import config

    monkeypatch.setitem(config.ModelConfig.limits, "drop_path_rate", Range(0, 2))
    monkeypatch.setitem(config.DataConfig.limits, "mask_ratio", Range(0, 1, low_open=True))
    wrong = _disagreements([f for f in _schema_fields() if f[1] in ("model.drop_path_rate", "data.mask_ratio")])
    assert any("model.drop_path_rate=1.0: schema allows" in w for w in wrong), wrong
    assert any("data.mask_ratio=1.0: schema allows" in w for w in wrong), wrong
