"""Declared task options and round settings: names, types, defaults and help, checked
before a process does anything with them.

A Task class lists its `--task-opt` keys in `declared_options` and the `--round-config`
keys its `train` reads in `round_settings`, each a `TaskOption`. A key that is not
declared is refused naming the known ones, and a value is parsed as its declared type, so
`hiddn=64` or `lr=abc` stop the process that was given them with one line. A task that
declares nothing (an empty tuple, the default) takes any key, as before declarations
existed; the same holds for round settings separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedstream.common.errors import TaskError

OptionValue = float | int | str | bool

TYPE_NAMES: dict[type, str] = {int: "integer", float: "number", str: "text", bool: "0 or 1"}
"""How each option type is named in help and in errors."""

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class TaskOption:
    """One `--task-opt` key (or `--round-config` key) a task reads."""

    name: str
    type: type[int] | type[float] | type[str] | type[bool]
    default: OptionValue | None
    """The value when the key is not given; None when it is derived (the help says how)."""
    help: str

    def parse(self, text: str) -> OptionValue:
        """`text` as this option's type; ValueError naming what was expected."""
        if self.type is bool:
            lowered = text.strip().lower()
            if lowered in TRUE | FALSE:
                return lowered in TRUE
        elif self.type is int:
            try:
                number = float(text)  # `1e3` is a thousand, as the tasks have always read it
            except ValueError:
                number = float("nan")
            if number.is_integer():
                return int(number)
        elif self.type is float:
            try:
                return float(text)
            except ValueError:
                pass
        else:
            return text
        raise ValueError(f"{self.name}={text!r} is not {_article(TYPE_NAMES[self.type])}")

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return "-"
        if isinstance(self.default, bool):
            return str(int(self.default))
        return str(self.default)


def _article(kind: str) -> str:
    return kind if kind[0].isdigit() else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_values(
    what: str,
    declared: Iterable[TaskOption],
    given: Mapping[str, str],
    noun: str = "option",
) -> dict[str, OptionValue]:
    """`given` parsed as `declared` says, in `given`'s order; TaskError for an unknown key
    (naming the known ones) or a value of the wrong type. Nothing declared: every key
    passes through as text."""
    by_name = {option.name: option for option in declared}
    if not by_name:
        return dict(given)
    values: dict[str, OptionValue] = {}
    for key, text in given.items():
        option = by_name.get(key)
        if option is None:
            known = ", ".join(sorted(by_name))
            raise TaskError(f"{what} has no {noun} {key!r}: known {noun}s are {known}")
        try:
            values[key] = option.parse(text)
        except ValueError as exc:
            raise TaskError(f"{what} {noun} {exc}") from None
    return values


def agreed_values(
    declared: Iterable[TaskOption], given: Mapping[str, str], site: Iterable[str]
) -> dict[str, str]:
    """The options that must be the same in every process of a run, as canonical text:
    every declared option but the site ones, parsed (`hidden=64.0` is `hidden=64`) and
    with its default filled in, so leaving a key out and giving its default agree. A task
    that declares nothing: the keys given, as given, less the site ones."""
    site = set(site)
    by_name = {option.name: option for option in declared}
    if not by_name:
        return {key: value for key, value in sorted(given.items()) if key not in site}
    agreed: dict[str, str] = {}
    for name, option in sorted(by_name.items()):
        if name in site:
            continue
        value = option.parse(given[name]) if name in given else option.default
        if value is not None:
            agreed[name] = str(int(value)) if isinstance(value, bool) else str(value)
    return agreed


def differences(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """`key=MINE (coordinator: THEIRS)` for each key whose values differ; `(unset)` for a
    key one side lacks."""
    return [
        f"{key}={mine.get(key, '(unset)')} (coordinator: {theirs.get(key, '(unset)')})"
        for key in sorted(mine.keys() | theirs.keys())
        if mine.get(key) != theirs.get(key)
    ]


def options_table(declared: Iterable[TaskOption]) -> list[str]:
    """Markdown table rows (header first) of `declared`; empty when nothing is declared."""
    rows = [
        f"| `{o.name}` | {TYPE_NAMES[o.type]} | {o.shown_default} | {o.help} |" for o in declared
    ]
    if not rows:
        return []
    return ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |", *rows]


def options_text(task: str, options: Iterable[TaskOption], settings: Iterable[TaskOption]) -> str:
    """What `--help-task` prints: the task's options and round settings, one a line."""
    lines: list[str] = []
    for title, flag, declared in (
        ("options", "--task-opt", tuple(options)),
        ("round settings", "--round-config", tuple(settings)),
    ):
        if not declared:
            lines.append(f"task {task} declares no {title}: any {flag} KEY=VALUE is passed on")
            continue
        lines.append(f"task {task} {title} ({flag} KEY=VALUE):")
        width = max(len(o.name) for o in declared)
        for o in declared:
            kind = TYPE_NAMES[o.type] + (
                "" if o.default is None else f", default {o.shown_default}"
            )
            lines.append(f"  {o.name:<{width}}  {o.help} ({kind})")
    return "\n".join(lines)
