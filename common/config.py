"""Configuration: one dataclass per component, filled from defaults, a TOML file,
environment variables and command-line flags, in rising order of precedence.

Each field is documented by the string literal under it; that text becomes the flag's
`--help`. Flags are the field names with dashes (`min_clients` -> `--min-clients`);
environment variables are `FEDSTREAM_<SECTION>_<FIELD>` (`FEDSTREAM_SERVER_MIN_CLIENTS`);
the TOML file holds one table per section (`[server]`, `[client]`, `[demo]`).

A section's dataclass may compose component dataclasses by inheritance (`ServerConfig`
inherits `TransportConfig`, `RoundsConfig`, ...): the fields stay flat for flags,
variables and TOML keys, and `--help` lists them under one heading per component, the
component's docstring beneath it.

Mapping-valued fields (`task_opt`, `round_config`) take repeated `KEY=VALUE` flags, a
comma-separated `KEY=VALUE,KEY=VALUE` environment variable, or a TOML table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "FEDSTREAM"


CHOICES = "choices"
"""Field metadata key: the values a str field may take, listed in its `--help` (taken from
the code that defines them, so the help cannot drift from it)."""

ACTION = "action"
"""Field metadata key: a bool field that asks for something to be done instead of setting
the run up (`--help-task`): a plain flag, with no `--no-` form."""

DEFAULT_HELP = "default_help"
"""Field metadata key: what `--help` shows as the field's default, where the value alone
says little (None standing for "each strategy's own default", say)."""


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


def require_positive(name: str, value: float) -> None:
    """ConfigError unless `value` is above 0 (NaN is not)."""
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _docs_declared_in(cls: type) -> dict[str, str]:
    """The string literal under each annotated name in the body of `cls` itself."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name, inherited fields
    included (read where each is declared; a subclass's redeclaration wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_docs_declared_in(klass))
    return docs


def components(cls: type) -> list[tuple[type, list[dataclasses.Field[Any]]]]:
    """The dataclasses `cls` is composed of, each with the fields it declares: `cls` first,
    then its bases in method resolution order; those that declare no field left out."""
    declared: dict[type, list[dataclasses.Field[Any]]] = {}
    for f in dataclasses.fields(cls):
        owner = next(k for k in cls.__mro__ if f.name in k.__dict__.get("__annotations__", {}))
        declared.setdefault(owner, []).append(f)
    return [(klass, declared[klass]) for klass in cls.__mro__ if klass in declared]


def component_title(cls: type) -> str:
    """`TransportConfig` -> `transport`: the heading of its flags in `--help`."""
    return cls.__name__.removesuffix("Config").lower()


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _is_mapping(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping)


def _base_type(tp: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_pairs(items: list[str] | str, what: str) -> dict[str, str]:
    """`["a=1", "b=2"]` or `"a=1,b=2"` -> {"a": "1", "b": "2"}."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _convert(cls: type, name: str, raw: Any, source: str) -> Any:
    tp = _base_type(_field_type(cls, name))
    what = f"{source} {name}"
    if _is_mapping(tp):
        if isinstance(raw, Mapping):
            return {str(k): str(v) for k, v in raw.items()}
        if isinstance(raw, (str, list)):
            return parse_pairs(raw, what)
        raise ConfigError(f"{what}: expected a table of KEY = VALUE")
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            value = float(raw) if isinstance(raw, str) else raw
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(raw)
            return int(value)
        if tp is float:
            return float(raw)
        if tp is Path:
            return Path(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {raw!r} is not a valid {tp.__name__}") from None


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, exclude: frozenset[str] | set[str] = frozenset()
) -> None:
    """One flag per field of `cls` (those in `exclude` left out), each defaulting to 'not
    given' so precedence works.

    A `cls` composed of several dataclasses gets one argument group per component, titled
    by it and described by its docstring; a plain one adds its flags to `parser` itself.
    """
    parts = [(c, [f for f in fields if f.name not in exclude]) for c, fields in components(cls)]
    if len(parts) == 1:
        _add_fields(parser, cls, parts[0][1])
        return
    for component, fields in parts:
        description = component.__dict__.get("__doc__")
        group = parser.add_argument_group(
            component_title(component), " ".join(description.split()) if description else None
        )
        _add_fields(group, cls, fields)


def _add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    fields: list[dataclasses.Field[Any]],
) -> None:
    docs = field_docs(cls)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(_field_type(cls, f.name))
        default = f.metadata.get(DEFAULT_HELP)
        if default is None:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        help_text = docs.get(f.name, "")
        if CHOICES in f.metadata:
            help_text = f"{help_text} One of: {', '.join(f.metadata[CHOICES])}."
        if _is_mapping(tp):
            parser.add_argument(
                flag,
                action="append",
                metavar="KEY=VALUE",
                default=argparse.SUPPRESS,
                help=f"{help_text} (repeatable)",
            )
        elif tp is bool and f.metadata.get(ACTION):
            parser.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        elif tp is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
        else:
            metavar = f.name.upper()
            parser.add_argument(
                flag,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=f"{help_text} (default: {default})",
            )


def load_config(
    cls: type[T],
    section: str,
    cli: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from defaults < TOML `[section]` < environment < CLI values."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
        table = document.get(section, {})
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown [{section}] keys {unknown}")
        values.update({k: _convert(cls, k, v, f"[{section}]") for k, v in table.items()})
    environ = os.environ if environ is None else environ
    prefix = f"{ENV_PREFIX}_{section.upper()}_"
    for name in names:
        key = prefix + name.upper()
        if key in environ:
            values[name] = _convert(cls, name, environ[key], key)
    for name, raw in (cli or {}).items():
        if name in names:
            values[name] = _convert(cls, name, raw, "--" + name.replace("_", "-"))
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
