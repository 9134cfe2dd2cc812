"""Loading a typed config: defaults <- YAML file (with its ``base:`` chain) <- ``key.sub=value`` overrides, validated
into the schema's frozen dataclasses (:mod:`simmim.config`) by pydantic.

What this module adds to pydantic and PyYAML is the user's view: every problem is one :class:`ConfigError` line that
names the dotted key (``optim.base_lr``), the file and line for YAML errors, and the closest key for a misspelt one.
It knows nothing about the fields themselves; the schema's sections derive from :class:`Section` and the top-level
configs have a ``check()`` method (ranges and cross-field rules) that :func:`from_dict` calls.

YAML is read with YAML 1.2's numbers and booleans (``1e-4`` is a float, ``no`` is the string "no": PyYAML's 1.1
rules would make them a string and False), PyYAML's safe constructors (tags that build Python objects are refused,
aliases are shared, never expanded), at most :data:`MAX_DEPTH` levels deep and :data:`MAX_BYTES` long.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from simmim.errors import InputNotFoundError, UserError

MAX_DEPTH = 32  # a config is sections of keys holding short lists: 3 levels; 32 leaves room and stays far from
# Python's recursion limit (PyYAML composes nested nodes recursively: 20000 levels were a RecursionError)
MAX_BYTES = 1 << 20  # a config is a few KB of YAML; a bigger file is most likely the wrong file


class ConfigError(UserError):
    """A config file or override cannot be read, a key is unknown, a value has the wrong type or is out of range, or
    values do not fit together; the one-line message names the key (and the file and line for YAML errors)."""


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax mode reads true as 1; a flag given for a number is a mistake
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# number types of the schema: pydantic's lax parsing ('5' -> 5, 1000.0 -> 1000), bools refused
Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


class Section:
    """Base of every config dataclass: unknown keys are refused; a number given for a string key is its text.
    ``removed`` maps a key that no longer exists to the setting that replaces it (named in the error)."""

    __pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    removed: ClassVar[dict[str, str]] = {}


# ----------------------------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans and floats, a nesting limit and one-line integer errors."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep (a config holds sections of keys with "
                    "numbers, strings or short lists)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to parse integers of more than 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} digits is too long", node.start_mark) from None


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?  # 1.5, .5, 1.5e-3
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                                  # 1e-4 (a string in YAML 1.1)
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data; errors are one-line ConfigErrors naming ``where`` and the line. The safe loader
    refuses tags that build Python objects (``!!python/...``): they are reported, never run."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as err:
        # where the broken construct starts (an unclosed bracket), else where the parser gave up
        mark = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parts = [getattr(err, "context", None), getattr(err, "problem", None)]
        problem = ": ".join(p for p in parts if p) or str(err)
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += " (config values are plain YAML; tags that build Python objects are refused)"
        raise ConfigError(" ".join(f"{where}{at}: {problem}".split())) from None


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is merged underneath."""
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} extends itself through 'base:' ({' -> '.join(map(str, _seen))})")
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"config {path} is {path.stat().st_size:,} bytes, more than a config's {MAX_BYTES:,}; "
                          "is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a YAML text file (not UTF-8)") from None
    data = _parse_yaml(text, f"config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model:, data:, ...), got {_short(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base must be the path of the YAML file it extends, got {_short(base)}")
    return merge(read_yaml((path.parent / base).resolve(), (*_seen, path.resolve())), data)


def merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``diff`` wins."""
    out = dict(base)
    for k, v in diff.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# overrides


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars), checking keys against ``cls``."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {_short(item)} must look like key.sub=value (e.g. optim.base_lr=2e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node_cls, node = cls, data
        for depth, part in enumerate(parts):
            if part not in {f.name for f in dataclasses.fields(node_cls)}:
                raise _unknown(".".join(parts[:depth + 1]), node_cls)
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
                    raise ConfigError(f"section {section} must be a mapping of keys, got {_short(node[part])}")
                node[part] = dict(node[part])  # a copy: the caller's dict is never changed
                node = node[part]
                node_cls = tp
    return data


def _override_value(raw: str, tp: Any, item: str) -> Any:
    """An override's value: YAML, except that a string field takes the text as typed (a path such as
    ``runs/a #2``, ``yes`` or ``[x]`` stays itself) unless it is quoted, and an optional field takes null/None/~."""
    if not raw.strip():
        return ""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if type(None) in args and raw.strip().lower() in ("none", "null", "~"):
        return None
    if str in args and not (raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) > 1):
        return raw
    return _parse_yaml(raw, f"override {_short(item)}")


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build and check config ``cls`` from a nested dict; keys not given keep their defaults, an empty section
    (``data:`` with nothing under it) is no change."""
    if isinstance(data, dict):
        sections = {name for name, tp in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(tp)}
        data = {k: {} if v is None and k in sections else v for k, v in data.items()}
    try:
        cfg = _adapter(cls).validate_python({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(_message(err.errors(include_url=False)[0], cls)) from None
    if callable(getattr(cfg, "check", None)):
        cfg.check()
    return cfg


def _message(error: dict[str, Any], cls: type) -> str:
    """One pydantic error as one line naming the dotted key (``optim.betas[1]``)."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    names = [p for p in error["loc"] if isinstance(p, str) and p.isidentifier()]  # no union/validator tags
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"] if isinstance(p, int) or
                  p in names).lstrip(".")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return str(_unknown(key, _field_type(cls, names[:-1])))
    if kind == "invalid_key":  # YAML allows `1: x`; the int is the key itself, not an index
        return f"config key {_short(value)}{f' in section {names[-1]}' if names else ''} must be a name"
    if kind in ("dataclass_type", "dataclass_args_type"):
        return f"{f'section {key}' if key else 'a config'} must be a mapping of keys, got {_short(value)}"
    if kind in ("missing", "too_short", "too_long"):  # a tuple of the wrong length (every field has a default)
        key = key.rsplit("[", 1)[0] if kind == "missing" else key
        expected = len(typing.get_args(_field_type(cls, names)))
        got = len(value) if isinstance(value, (list, tuple)) else "?"
        return f"{key}: expected {expected} values, got {got} ({_short(value)})"
    if kind == "literal_error":
        return f"{key}: {_short(value)} is not one of {ctx['expected'].replace(' or ', ', ')}"
    if kind == "value_error":
        return f"{key}: {ctx['error']}"
    what = _EXPECTED.get(kind.split("_")[0], f"{error['msg'][0].lower()}{error['msg'][1:]}")
    return f"{key}: expected {what}, got {_short(value)}"


# pydantic's error kinds (int_parsing, int_from_float, float_type, ...) by their first word, in the user's words
_EXPECTED = {"int": "an integer", "float": "a number", "finite": "a finite number", "bool": "true/false",
             "string": "a string", "tuple": "a list", "list": "a list"}


def _field_type(cls: type, names: list[str]) -> Any:
    """The declared type at dotted path ``names`` below ``cls`` (Optional unwrapped)."""
    tp = cls
    for name in names:
        tp = typing.get_type_hints(tp)[name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _unknown(key: str, section: type) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    if name in getattr(section, "removed", {}):
        return ConfigError(f"config key {key!r} was removed; use {section.removed[name]}")
    choices = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(choices)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlevel = 1


def _short(value: Any) -> str:
    """``repr`` cut to about a line: a value in an error may be a shared-alias structure of billions of items."""
    return _REPR.repr(value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): fit for YAML and for checkpoints loaded with ``weights_only``."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(i) for i in v]
        return v
    return plain(cfg)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults <- YAML file (which may name a ``base:`` YAML it extends) <- ``key=value`` overrides."""
    data = read_yaml(Path(path)) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or [], cls))


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
                raise ConfigError(f"unknown config section {key.rsplit('.', 1)[0]!r} in {key!r}")
            node = node[part]
        node[last] = value
    return from_dict(type(cfg), data)
