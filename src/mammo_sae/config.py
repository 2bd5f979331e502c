"""Config dataclasses are the single source of truth for every stage's options.

Each stage defines a frozen-ish `@dataclass` whose fields carry their help text in
`field(metadata={"help": ...})`. `add_dataclass_args` turns it into argparse options
(`--snake-case-name`), `from_namespace` builds the dataclass back, and `to_dict` /
`load_yaml` round-trip it so the resolved config is saved beside every output.

Supported field types: int, float, str, bool (`--flag/--no-flag`), Path, Optional[...] of
those, Literal[...] (choices), and list/tuple of int/float/str (comma separated).

Whether an option changes a result is declared once, on the field: `opt(..., affects_result=False)`
(progress bars, output paths, worker counts) or `opt(..., resumable=True)` (it changes the result
but may change when a run is continued, e.g. the number of epochs). Every cache, resume and
"same run?" key is built from `result_settings` / `changed_settings`, never from a hand list.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import MammoSaeError

T = TypeVar("T")


def _escape(value: Any) -> str:
    return str(value).replace("%", "%%")


BOUNDS = ("min", "gt", "max", "lt")  # opt(..., min=1): inclusive; gt/lt: exclusive


def opt(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """`field()` with help text; mutable defaults (lists) are wrapped in default_factory.
    Numeric bounds (`min`, `gt`, `max`, `lt`) are checked for CLI and config-file values alike,
    before any work starts. Keys read by `result_settings`: `affects_result=False` (the option
    never changes a result), `resumable=True` (it does, but a continued run may change it) and
    `keyed_when_changed=True` (an option added after keys were recorded: left out of them while
    at its default, so older runs keep their keys). CLI keys: `flag="--from"` spells the option
    differently from its field name (a Python keyword), `metavar=` names a list positional's items
    and `cli=False` leaves the field off the command line."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": help, **kw}
        )
    return dataclasses.field(default=default, metadata={"help": help, **kw})


DEVICE_HELP = "auto (CUDA when available, else Apple mps, else CPU) | cpu | cuda | cuda:N | mps"


def device_opt(**kw: Any) -> Any:
    """The `--device` option, declared once: every command takes it the same way (default auto,
    resolved by `devices.resolve_device`); `kw` adds metadata such as `affects_result=False`."""
    return opt("auto", help=DEVICE_HELP, **kw)


def progress_opt(help: str = "show progress bars") -> Any:
    """The `--progress/--no-progress` option, declared once: progress bars never change a
    result, so the field is left out of every cache and resume key."""
    return opt(True, affects_result=False, help=help)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")
    if tp is Path:
        return Path(text)
    return tp(text)


def _converter(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type=` callable and extra kwargs for a field type."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = list(get_args(tp))
        return type(choices[0]), {"choices": choices}
    if origin in (list, tuple):
        (elem, *_) = get_args(tp) or (str,)
        elem, _ = _unwrap_optional(elem)

        def parse_list(text: str) -> list[Any]:
            if elem is int and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", text):
                text = text.lower().replace("x", ",")  # a size: "512x320" reads as "512,320"
            return [_parse_scalar(elem, t.strip()) for t in text.split(",") if t.strip()]

        return parse_list, {"metavar": f"{getattr(elem, '__name__', 'X').upper()},..."}
    return (lambda s: _parse_scalar(tp, s)), {}


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, positional: tuple[str, ...] = ()
) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        # argparse %-formats help strings; a literal "95%" must not break --help.
        help_text = f.metadata.get("help", "").replace("%", "%%")
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if f.name in positional:
            if get_origin(tp) is list:  # one or more values, each its own argument
                elem, _ = _unwrap_optional(get_args(tp)[0])
                conv, extra = _converter(elem)
                extra.update(nargs="+", metavar=f.metadata.get("metavar"))
            else:
                conv, extra = _converter(tp)
            parser.add_argument(f.name, type=conv, help=help_text, **extra)
            continue
        flag = option_flag(f)
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} (default: {_escape(default)})",
            )
            continue
        conv, extra = _converter(tp)
        shown = _escape(
            ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        )
        # Help that already describes its default (e.g. "default: summaries/ inside the SAE directory") gets no second one.
        says_default = "default" in help_text.lower()
        parser.add_argument(
            flag,
            dest=f.name,
            type=conv,
            default=default,
            required=not has_default,
            help=f"{help_text} (default: {shown})"
            if has_default and not says_default
            else help_text,
            **extra,
        )


def option_flag(f: dataclasses.Field[Any]) -> str:
    """The command-line spelling of a field: `--snake-case-name`, or its `flag=` metadata."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def bound_problem(metadata: Any, value: Any) -> str | None:
    """Why `value` breaks the field's bounds (None if it does not, or has none)."""
    if (
        not any(b in metadata for b in BOUNDS)
        or value is None
        or isinstance(value, bool)
        or not isinstance(value, (int, float))
    ):
        return None
    if value != value:
        return "must be a number"
    for key, broken, sign in (
        ("min", lambda b: value < b, "≥"),
        ("gt", lambda b: value <= b, ">"),
        ("max", lambda b: value > b, "≤"),
        ("lt", lambda b: value >= b, "<"),
    ):
        if key in metadata and broken(metadata[key]):
            return f"must be {sign} {metadata[key]}"
    return None


def check_bounds(cls: type, values: dict[str, Any], label: Any) -> None:
    """Raise MammoSaeError naming the first option (`label(name)`) outside its bounds."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            problem = bound_problem(f.metadata, values[f.name])
            if problem:
                raise MammoSaeError(f"{label(f.name)} {problem}, got {values[f.name]}")


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in fields}
    check_bounds(cls, values, lambda name: option_flag(fields[name]))
    return cls(**values)


def _plain(v: Any) -> Any:
    """A value as JSON/YAML holds it."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build `cls` from a plain dict, converting types and naming unknown keys."""
    kwargs = check_options(cls, data, where=where)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MammoSaeError(f"{where}: {exc}") from exc


def check_options(cls: type, data: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """`data` converted to the types of `cls`'s fields; unknown keys and bad values are named.
    Works on partial dicts (the options a config file overrides), so it runs before any stage."""
    if not isinstance(data, dict):
        raise MammoSaeError(f"{where}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MammoSaeError(f"{where}: unknown key(s) {unknown}; valid: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if value is None:
            kwargs[name] = None
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, where=f"{where}.{name}")
        elif tp is Path:
            kwargs[name] = Path(value)
        elif get_origin(tp) in (list, tuple) and isinstance(value, str):
            try:
                kwargs[name] = _converter(tp)[0](value)
            except (ValueError, argparse.ArgumentTypeError):
                raise MammoSaeError(
                    f"{where}.{name}: expected comma-separated values "
                    f"(or HxW for a size), got {value!r}"
                ) from None
        elif get_origin(tp) is Literal and value not in get_args(tp):
            raise MammoSaeError(f"{where}.{name}: {value!r} is not one of {list(get_args(tp))}")
        elif tp in (int, float, bool):
            kwargs[name] = _scalar_value(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    check_bounds(cls, kwargs, lambda name: f"{where}.{name}")
    return kwargs


def _scalar_value(tp: type, value: Any, where: str) -> Any:
    """A YAML/JSON value as the field's type: YAML reads `1e-3` (no dot) as a string, and a wrong
    type must fail here with the key's name, not deep inside a stage."""
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    try:
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return _parse_scalar(tp, value.strip())
    except (ValueError, argparse.ArgumentTypeError):
        pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    raise MammoSaeError(f"{where}: expected {tp.__name__}, got {value!r}")


def result_settings(cfg: Any, *, resuming: bool = False) -> dict[str, Any]:
    """`to_dict(cfg)` restricted to the options that change the result: the one source of every
    cache key, resume check and "same run?" test. `resuming=True` also leaves out the options a
    continued run may change (`resumable=True`)."""
    values = to_dict(cfg)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not _is_result_field(f, resuming):
            continue
        if f.metadata.get("keyed_when_changed") and values[f.name] == _plain_default(f):
            continue
        out[f.name] = values[f.name]
    return out


def changed_settings(cfg: Any, saved: dict[str, Any], *, resuming: bool = False) -> list[str]:
    """Names of the result options (`result_settings`) whose value in `saved` (a `to_dict` of an
    earlier config, e.g. read back from JSON) differs from `cfg`'s, sorted. A saved key that is no
    longer an option counts as a difference; a `keyed_when_changed` option missing from `saved`
    (recorded before it existed) reads as its default."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    now = to_dict(cfg)
    differ = {k for k in saved if k not in fields}
    for name, f in fields.items():
        if not _is_result_field(f, resuming):
            continue
        old = (
            saved.get(name, _plain_default(f))
            if f.metadata.get("keyed_when_changed")
            else saved.get(name)
        )
        if old != now[name]:
            differ.add(name)
    return sorted(differ)


def _is_result_field(f: dataclasses.Field[Any], resuming: bool) -> bool:
    return f.metadata.get("affects_result", True) and not (resuming and f.metadata.get("resumable"))


def _plain_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default as `to_dict` writes it."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return _plain(default)


MIN_IMAGE_SIDE = 16


def parse_image_size(
    value: Any, *, flag: str = "--image-size", min_side: int = MIN_IMAGE_SIDE
) -> tuple[int, int] | None:
    """The one reader of an image size: `[H, W]` (YAML/JSON, or the list the CLI parses), `"HxW"`
    or `"H,W"` → (H, W); None or empty → None (each image's own size)."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    try:
        parts = (
            value.lower().replace("x", ",").split(",") if isinstance(value, str) else list(value)
        )
        if len(parts) != 2 or any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
        h, w = (int(p) for p in parts)
    except (ValueError, TypeError):
        raise MammoSaeError(
            f"{flag} must look like 512x320 or 512,320 (HxW or H,W), got {value!r}"
        ) from None
    if h < min_side or w < min_side:
        raise MammoSaeError(f"{flag} must be at least {min_side}x{min_side}, got {value!r}")
    return h, w


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MammoSaeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MammoSaeError(f"invalid YAML in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MammoSaeError(f"{path}: expected a mapping at the top level")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
