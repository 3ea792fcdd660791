"""Config dataclasses are the one home of defaults; request options, `--conf` options and CLI flags derive from them.

Which fields are options, and their help, is declared once, on the field (`option(...)`): `exposed(cls, "request")`
lists a trainer's options table in Slicer (also its `--conf <prefix>_<name>` app settings), `exposed(cls, "cli")`
its command's flags (`--the-name`, same name, same help); `exposed(cls, "conf")` adds app-only settings.

`config_overrides(defaults, values, names)` reads the fields `names` from any string-keyed source
(a MONAI Label request, the app's `--conf` dict with a prefix), casting each value to its field's
type; `add_arguments` / `from_args` turn the same fields into argparse flags. Hand-written because
neither MONAI Label nor argparse maps a dataclass onto options.

A value a request sends is refused (400, naming the option) unless it is of its field's type and in its field's
range: a number finite and >= 0 unless the field declares another (`bounded`, e.g. `seed: int = bounded(0,
*SEED_RANGE)`), a string one of the field's `choices` if it declares them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from labelfactory.errors import LabelFactoryError

C = TypeVar("C")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SEED_RANGE = (0, 2**32 - 1)  # numpy's seeds (the generator's latents, every training's RNG)


def bounded(default: Any, low: float | None = 0, high: float | None = None) -> Any:
    """A dataclass field whose option values must lie in [low, high] (None: open on that side)."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


def choice(default: str, choices: typing.Sequence[str]) -> Any:
    """A dataclass field whose option values must be one of `choices`."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


WHERE = ("request", "conf", "cli")  # Slicer's options table and requests (and --conf), --conf only, CLI flags


def option(
    default: Any,
    help: str,
    *,
    low: float | None = 0,
    high: float | None = None,
    choices: typing.Sequence[str] | None = None,
    where: typing.Sequence[str] = ("request", "cli"),
) -> Any:
    """A config field that users set: in Slicer's options table and requests and as a CLI flag (`where` narrows it),
    with one `help`; numbers in [low, high], strings one of `choices` when given."""
    if not set(where) <= set(WHERE):
        raise ValueError(f"where must name some of {WHERE}, got {where}")
    meta: dict[str, Any] = {"option": {"help": help, "where": tuple(where)}, "range": (low, high)}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


def exposed(cls: type, where: str) -> tuple[str, ...]:
    """The option fields of config class `cls` shown in `where` ("request", "cli"; "conf": request and conf-only)."""
    wanted = {"request", "conf"} if where == "conf" else {where}
    return tuple(f.name for f in dataclasses.fields(cls) if wanted & set(f.metadata.get("option", {}).get("where", ())))


def option_help(cls: type, name: str) -> str:
    """The help an `option` field declares ("" for another field)."""
    return {f.name: f.metadata.get("option", {}).get("help", "") for f in dataclasses.fields(cls)}[name]


def field_type(cls: type, name: str) -> type:
    """The field's scalar type (bool, int, float or str), `X | None` unwrapped; TypeError for other types."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint not in (bool, int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: only bool, int, float and str fields can be options, not {hint}")
    return hint


def cast(typ: type, name: str, value: Any, low: float | None = 0, high: float | None = None) -> Any:
    """One option value (a string from a form or conf, a JSON scalar, or Slicer's combo list) as `typ`.

    Numbers must be finite, whole for an int, and in [low, high] (None: open on that side)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None  # an options-table combo box sends its list; the first is the choice
    try:
        out = _as(typ, value)
    except (TypeError, ValueError, OverflowError):
        raise LabelFactoryError(f"option {name}={value!r}: expected {_a(typ)}") from None
    if typ in (int, float) and ((low is not None and out < low) or (high is not None and out > high)):
        span = f">= {low}" if high is None else f"<= {high}" if low is None else f"in {low}..{high}"
        raise LabelFactoryError(f"option {name}={value!r}: expected {_a(typ)} {span}")
    return out


def parse_value(cls: type, name: str, value: Any) -> Any:
    """A value for field `name` of dataclass `cls`, as the field's type, in its range or choices."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}.get(name, {})
    out = cast(field_type(cls, name), name, value, *meta.get("range", (0, None)))
    if "choices" in meta and out not in meta["choices"]:
        raise LabelFactoryError(f"option {name}={out!r}: expected one of {', '.join(meta['choices'])}")
    return out


def _as(typ: type, value: Any) -> Any:
    """`value` as `typ`, or ValueError / TypeError: no bool for a number, no fraction for an int, no NaN or inf."""
    if typ is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE + _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
        raise ValueError(value)
    if typ is str:
        if not isinstance(value, str | int | float):
            raise TypeError(value)
        return str(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(value)
    if typ is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value.strip())
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(value)
    return out


def _a(typ: type) -> str:
    names = {bool: "bool (true or false)", int: "int (a whole number)", float: "float (a finite number)", str: "str"}
    return names[typ]


def config_overrides(defaults: C, values: dict[str, Any], names: typing.Iterable[str], prefix: str = "") -> C:
    """`defaults` with each field of `names` that `values` sets (key `prefix + name`, not None or "") replaced."""
    cls = type(defaults)
    changes = {n: parse_value(cls, n, values[prefix + n]) for n in names if values.get(prefix + n) not in (None, "")}
    return dataclasses.replace(defaults, **changes) if changes else defaults


def options(defaults: Any, names: typing.Iterable[str]) -> dict[str, Any]:
    """{name: default} of the fields `names`: a task's options table in Slicer."""
    return {n: getattr(defaults, n) for n in names}


def add_arguments(
    parser: argparse.ArgumentParser,
    defaults: Any,
    names: typing.Iterable[str],
    helps: dict[str, str] | None = None,
    deprecated: dict[str, str] | None = None,
    unset: str | None = None,
) -> None:
    """A flag `--the-name` per field (`deprecated[name]`: an old flag still taken, its help says so), typed and
    defaulted from `defaults` (bool: --x/--no-x),
    helped by `helps[name]` or else the field's `option` help; a field with `choices` offers only those.

    `unset`: the flags default to None (from_args then keeps the field of the defaults it is given, e.g. a
    preset chosen by another flag) and their help says `(default: <unset>)`."""
    helps, deprecated = helps or {}, deprecated or {}
    for n in names:
        typ, default, flag = (
            field_type(type(defaults), n),
            None if unset else getattr(defaults, n),
            "--" + n.replace("_", "-"),
        )
        flags = (flag, deprecated[n]) if n in deprecated else (flag,)
        said = helps.get(n) or option_help(type(defaults), n)
        text = (said + " " if said else "") + f"(default: {unset or default})"
        text += f" ({deprecated[n]}: the old name, deprecated)" if n in deprecated else ""
        choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(defaults)}[n]
        if typ is bool:
            parser.add_argument(*flags, dest=n, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(*flags, dest=n, type=typ, default=default, choices=choices, help=text)


def from_args(defaults: C, args: argparse.Namespace, names: typing.Iterable[str]) -> C:
    """`defaults` with the fields `names` that parsed flags set (not None; see add_arguments).

    With `--config FILE` (add_config_argument) the config JSON replaces `defaults`, and only the flags given a value
    other than their default override it."""
    base, names = defaults, list(names)
    if getattr(args, "config", None) is not None:
        base = config_from_json(type(defaults), args.config)
        names = [n for n in names if getattr(args, n) != getattr(defaults, n)]
    return dataclasses.replace(base, **{n: getattr(args, n) for n in names if getattr(args, n) is not None})


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`: a whole config as JSON (e.g. a model record's `config`, or the server's multi_gpu launch)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="start from this config JSON (all its fields, e.g. a model record's config); flags given override it",
    )


def config_from_json(cls: type[C], path: str | os.PathLike) -> C:
    """The config dataclass `cls` from a JSON object of its fields (JSON lists back to tuples); 400 for another key."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LabelFactoryError(f"--config {path}: not a readable JSON file ({e})") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields) if isinstance(values, dict) else ["(not an object)"]
    if unknown:
        raise LabelFactoryError(f"--config {path}: {', '.join(unknown)} are not fields of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: tuple(v) if isinstance(v, list) and _is_tuple(hints[k]) else v for k, v in values.items()})


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple or any(_is_tuple(a) for a in typing.get_args(hint))
