"""Typed dataclass files: YAML, dotted ``key=value`` overrides and a table of value rules.

The one loader behind the job configuration (:mod:`align_rl.config`) and the sweep files
(:mod:`align_rl.tune.spec`):

- :func:`yaml_load` reads YAML as in YAML 1.2 (``0x40``, ``0o17``, ``1_000`` and ``1:20`` stay
  strings, ``1e-5`` is a number); :func:`read_yaml_file` reads a file that must hold a mapping;
- :func:`set_dotted` is the one place a dotted key (``dpo.beta``) becomes nested mappings;
  :func:`parse_overrides` reads ``key=value`` items with it, :func:`merge` layers nested mappings;
- :func:`apply` writes a nested mapping into a dataclass, coercing every value to its field's type
  (a nested dataclass field is a section, a ``dict[str, SomeDataclass]`` field a set of named
  sections) and naming an unknown key with the keys allowed there;
- :class:`Rule` (:func:`in_range`, :func:`integer`, :func:`choice`, :func:`registry`) is what a
  value must be, and :func:`check_rules` checks a dataclass against a table ``{dotted key: Rule}``
  (``key[]``: every list entry, ``key.*``: every mapping value), returning every problem.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import yaml

from align_rl.errors import ConfigError


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: only decimal integers are integers (``0x40``, ``0o17``, ``1_000`` and
    the sexagesimal ``1:20`` stay strings) and ``1e-5`` is a float, as in the 1.2 core schema."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _duplicate_keys(node: Any, prefix: str = "") -> list[str]:
    """Full dotted keys given twice in a mapping of the composed YAML ``node`` (and below)."""
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            key = f"{prefix}{name}"
            if name in seen:
                out.append(f"{key} (line {k.start_mark.line + 1})")
            seen.add(name)
            out += _duplicate_keys(v, key + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, f"{prefix[:-1]}[{i}]." if prefix else f"[{i}].")
    return out


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names a key twice (YAML would silently keep the last value)."""


def yaml_load(text: str) -> Any:
    """Parse YAML text as config values are parsed (see :class:`_Loader`); a key given twice in
    one mapping raises :class:`DuplicateKeyError` naming its full dotted key."""
    dups = _duplicate_keys(yaml.compose(text, Loader=_Loader))  # noqa: S506 - a SafeLoader subclass
    if dups:
        raise DuplicateKeyError(f"duplicate key(s) {', '.join(dups)}: each key may be given once "
                                "(YAML would keep only the last); merge them")
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    """The mapping in a YAML file (empty file: ``{}``); ConfigError names ``what`` (``config
    file``, ``sweep file``) when it is missing (``hint`` appended), not YAML or not a mapping."""
    text = str(path).strip()
    if not text:
        raise ConfigError(f"{what} path is empty; give the path of a YAML file")
    p = Path(text).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist{hint}")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder, not a YAML file; give the path of the file inside it")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read ({exc.strerror}); check its permissions") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not a text file (not UTF-8: a binary file?); give the "
                          "path of a YAML file") from None
    if "\x00" in content:
        raise ConfigError(f"{what} {p} is not a text file (it holds NUL bytes); give the path of a "
                          "YAML file")
    try:
        data = yaml_load(content) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of sections")
    return data


# ----------------------------------------------------------------------------- dotted keys


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, merge_mappings: bool = False) -> None:
    """Put ``value`` at ``dotted`` (``"dpo.beta"``) in the nested mapping ``tree``. With
    ``merge_mappings`` a mapping value is merged into a mapping already there (one level)."""
    parts = dotted.split(".")
    d = tree
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"key {dotted!r} goes below a value that is not a section")
    last = parts[-1]
    if merge_mappings and isinstance(value, dict) and isinstance(d.get(last), dict):
        d[last] = {**d[last], **value}
    else:
        d[last] = value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"dpo.beta": 1, "dpo": {"lr": 2}}`` -> ``{"dpo": {"beta": 1, "lr": 2}}`` (dotted keys of
    the top level split; a mapping given twice is merged)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        set_dotted(out, str(k), v, merge_mappings=True)
    return out


def merge(a: dict[str, Any], b: dict[str, Any], replace: Collection[str] = ()) -> dict[str, Any]:
    """``b`` layered over ``a`` (a new mapping): mappings merge key by key, except under a key in
    ``replace`` (a mapping-valued field such as ``rewards.weights``), which ``b`` replaces whole."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace:
            out[k] = merge(out[k], v, replace)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str, item: str) -> Any:
    """One override value parsed as YAML (``""`` stays the empty string)."""
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None


def split_item(item: str) -> tuple[str, str]:
    """``"dpo.beta=8000"`` -> ``("dpo.beta", "8000")``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    k, v = item.split("=", 1)
    return k.strip(), v


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["dpo.beta=8000", "guidance.methods=[dps]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        k, v = split_item(item)
        set_dotted(out, k, parse_value(v, item))
    return out


# ----------------------------------------------------------------------------- typed apply


def _coerce(value: Any, tp: Any, key: str, what: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, what)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            names = ", ".join(f.name for f in dataclasses.fields(tp) if f.init)
            raise ConfigError(f"{key} must be a mapping with keys among {names}, got {value!r}")
        obj = tp()
        apply(obj, value, key + ".", what)
        return obj
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], key, what) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping like {{a: 1, b: 2}}, got {value!r}")
        if not args:
            return dict(value)
        return {str(k): _coerce(v, args[1], f"{key}.{k}" if dataclasses.is_dataclass(args[1]) else key, what)
                for k, v in value.items()}
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise ConfigError(f"{key} is null (YAML reads ~, null and an empty value as null); give a "
                              f"value, quoted if it starts with ~ ({key}='~/runs/x' for a home path)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def apply(obj: Any, updates: dict[str, Any], prefix: str = "", what: str = "config") -> None:
    """Write the nested mapping ``updates`` into the dataclass ``obj`` (in place): a section field
    is updated key by key, every other field replaced by the value coerced to its type. An unknown
    key raises ConfigError ``unknown <what> key '<prefix><key>'; valid keys here: ...``."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj) if f.init}  # init=False: derived, not read
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown {what} key {key!r}; valid keys here: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give it a mapping, e.g. {key}.KEY=VALUE")
            apply(cur, v, key + ".", what)
        else:
            setattr(obj, k, _coerce(v, hints[k], key, what))


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``ok(value)`` and the wording for the error message (``text`` may be
    a function, for choices read from a registry when the rule is checked)."""

    text: str | Callable[[], str]
    ok: Callable[[Any], bool]

    def check(self, key: str, value: Any) -> str | None:
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):
            good = False
        if good:
            return None
        text = self.text() if callable(self.text) else self.text
        return f"{key}={value!r} must be {text}"


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Rule:
    """A finite number within ``lo``..``hi`` (open or closed ends)."""
    if lo is not None and hi is not None:
        text = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = f"a finite number {'<' if hi_open else '<='} {hi:g}"

    def ok(v):
        if not is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return Rule(text, ok)


def integer(lo: int, hi: int | None = None) -> Rule:
    """An integer ``>= lo`` (and ``<= hi``)."""
    text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Rule(text, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
                and (hi is None or v <= hi))


def choice(*allowed: Any) -> Rule:
    """One of ``allowed``."""
    return Rule(f"one of {', '.join(map(str, allowed))}", lambda v: v in allowed)


def registry(module: str, name: str) -> Rule:
    """One of the names in the registry ``module.name`` (a tuple of names or a dict keyed by name),
    read when a value is checked: the module (often a torch one) is imported only then, and a
    name registered after import (``register_reward``) counts."""

    def names() -> tuple:
        return tuple(getattr(importlib.import_module(module), name))

    return Rule(lambda: f"one of {', '.join(map(str, names()))} ({module}.{name})", lambda v: v in names())


def non_finite(key: str, value: Any) -> list[str]:
    """Problems for every non-finite float in ``value`` (lists and mappings included)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value!r} must be a finite number"]
    if isinstance(value, (list, tuple)):
        return [m for i, v in enumerate(value) for m in non_finite(f"{key}[{i}]", v)]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in non_finite(f"{key}.{k}", v)]
    return []


def check_rules(obj: Any, rules: dict[str, Rule], prefix: str = "") -> list[str]:
    """Every problem of the dataclass ``obj`` (recursing into section fields): non-finite floats
    and values that break their rule in ``rules`` (keyed by the full dotted key)."""
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += check_rules(value, rules, key + ".")
            continue
        bad = non_finite(key, value)
        problems += bad
        if bad:
            continue
        if key in rules:
            problems.append(rules[key].check(key, value))
        if f"{key}[]" in rules and isinstance(value, list):
            problems += [rules[f"{key}[]"].check(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if f"{key}.*" in rules and isinstance(value, dict):
            problems += [rules[f"{key}.*"].check(f"{key}.{k}", v) for k, v in value.items()]
    return [p for p in problems if p]


def raise_problems(problems: list[str], what: str = "config") -> None:
    """One ConfigError listing every problem (none: nothing happens)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} bad {what} values: " + "; ".join(problems))
