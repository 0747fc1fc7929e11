"""Configuration: flag > environment > TOML file > default, for every kind of field."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedstream.client.config import ClientConfig
from fedstream.common.config import (
    CHOICES,
    DEFAULT_HELP,
    ConfigError,
    add_arguments,
    components,
    field_docs,
    load_config,
)
from fedstream.server.config import (
    DurabilityConfig,
    EvaluationConfig,
    PrivacyConfig,
    RoundsConfig,
    SafeguardsConfig,
    SecurityConfig,
    ServerConfig,
    StatusConfig,
    StrategyConfig,
    StreamingConfig,
    TransportConfig,
    UplinkConfig,
)


@dataclass
class Sample:
    count: int = 1
    """How many."""
    ratio: float = 0.5
    """A share,
    spread over   two lines."""
    verbose: bool = False
    """Talk more."""
    label: str = "plain"
    """A name."""
    path: Path = Path("default/dir")
    """Where things go."""
    extra: dict[str, str] = field(default_factory=dict)
    """Extra KEY=VALUE settings."""
    maybe_dir: Path | None = None
    """An optional folder."""
    undocumented: int = 0


SECTION = "sample"


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """What the CLI hands load_config: only the flags actually given."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, Sample)
    return vars(parser.parse_args(argv))


def load(
    tmp_path: Path,
    flags: list[str] | None = None,
    env: dict[str, str] | None = None,
    toml: str | None = None,
) -> Sample:
    config_file = None
    if toml is not None:
        config_file = tmp_path / "fedstream.toml"
        config_file.write_text(toml)
    return load_config(Sample, SECTION, parse_flags(flags or []), config_file, env or {})


# field, TOML value, environment value, flags, and the value each layer must produce.
PRECEDENCE_CASES = [
    ("count", "7", "8", ["--count", "9"], 7, 8, 9),
    ("ratio", "0.25", "0.125", ["--ratio", "0.75"], 0.25, 0.125, 0.75),
    ("verbose", "true", "off", ["--verbose"], True, False, True),
    ("verbose", "false", "yes", ["--no-verbose"], False, True, False),
    ("label", '"file"', "env", ["--label", "flag"], "file", "env", "flag"),
    ("path", '"f/dir"', "e/dir", ["--path", "g/dir"], Path("f/dir"), Path("e/dir"), Path("g/dir")),
    ("maybe_dir", '"f"', "e", ["--maybe-dir", "g"], Path("f"), Path("e"), Path("g")),
    (
        "extra",
        '{ a = "1", b = 2 }',
        "a=3, c=4",
        ["--extra", "a=5", "--extra", "d=6"],
        {"a": "1", "b": "2"},
        {"a": "3", "c": "4"},
        {"a": "5", "d": "6"},
    ),
]


@pytest.mark.parametrize(
    ("name", "toml_value", "env_value", "flags", "from_file", "from_env", "from_flag"),
    PRECEDENCE_CASES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(PRECEDENCE_CASES)],
)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path,
    name: str,
    toml_value: str,
    env_value: str,
    flags: list[str],
    from_file: Any,
    from_env: Any,
    from_flag: Any,
) -> None:
    toml = f"[{SECTION}]\n{name} = {toml_value}\n"
    env = {f"FEDSTREAM_{SECTION.upper()}_{name.upper()}": env_value}
    default = getattr(Sample(), name)

    def value(config: Sample, expected: Any) -> Any:
        got = getattr(config, name)
        assert type(got) is type(expected), f"{name}: {got!r} is not a {type(expected)}"
        return got

    assert getattr(load(tmp_path), name) == default
    assert value(load(tmp_path, toml=toml), from_file) == from_file
    assert value(load(tmp_path, env=env), from_env) == from_env
    assert value(load(tmp_path, flags=flags), from_flag) == from_flag
    assert value(load(tmp_path, env=env, toml=toml), from_env) == from_env
    assert value(load(tmp_path, flags=flags, toml=toml), from_flag) == from_flag
    assert value(load(tmp_path, flags=flags, env=env, toml=toml), from_flag) == from_flag


def test_only_the_given_fields_change(tmp_path: Path) -> None:
    config = load(tmp_path, flags=["--count", "3"], env={"FEDSTREAM_SAMPLE_LABEL": "x"})
    assert dataclasses.replace(config, count=1, label="plain") == Sample()


def test_a_mapping_from_a_higher_layer_replaces_the_lower_one_whole(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        flags=["--extra", "a=1"],
        env={"FEDSTREAM_SAMPLE_EXTRA": "b=2"},
        toml=f"[{SECTION}.extra]\nc = 3\n",
    )
    assert config.extra == {"a": "1"}


def test_toml_table_form_of_a_mapping(tmp_path: Path) -> None:
    toml = f'[{SECTION}]\ncount = 2\n\n[{SECTION}.extra]\nlr = 0.05\nname = "x"\nflag = true\n'
    config = load(tmp_path, toml=toml)
    assert config.count == 2
    assert config.extra == {"lr": "0.05", "name": "x", "flag": "True"}


def test_mapping_values_may_contain_equals_signs(tmp_path: Path) -> None:
    config = load(tmp_path, flags=["--extra", "expr=a=b"], env={})
    assert config.extra == {"expr": "a=b"}


@pytest.mark.parametrize(("text", "expected"), [("12", 12), ("1e3", 1000), ("-4", -4), ("3.0", 3)])
def test_int_fields_accept_integral_numbers(tmp_path: Path, text: str, expected: int) -> None:
    config = load(tmp_path, env={"FEDSTREAM_SAMPLE_COUNT": text})
    assert config.count == expected and type(config.count) is int


@pytest.mark.parametrize("text", ["1", "TRUE", "yes", "On", " true "])
def test_bool_true_spellings(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, env={"FEDSTREAM_SAMPLE_VERBOSE": text}).verbose is True


@pytest.mark.parametrize("text", ["0", "False", "no", "OFF"])
def test_bool_false_spellings(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, toml=f'[{SECTION}]\nverbose = "{text}"\n').verbose is False


def test_other_sections_of_the_file_are_ignored(tmp_path: Path) -> None:
    toml = f"[other]\nanything = 1\n\n[{SECTION}]\ncount = 4\n"
    assert load(tmp_path, toml=toml).count == 4


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown \[sample\] keys \['cuont'\]"):
        load(tmp_path, toml=f"[{SECTION}]\ncuont = 4\n")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(Sample, SECTION, {}, missing, {})


def test_malformed_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedstream.toml"):
        load(tmp_path, toml=f"[{SECTION}\ncount = 4\n")


@pytest.mark.parametrize(
    ("layer", "name", "raw"),
    [
        ("flag", "count", "many"),
        ("env", "count", "2.5"),
        ("toml", "count", '"lots"'),
        ("flag", "ratio", "fast"),
        ("env", "verbose", "maybe"),
        ("toml", "verbose", "3"),
        ("flag", "extra", "novalue"),
        ("env", "extra", "a=1,=2"),
        ("toml", "extra", "3"),
    ],
)
def test_bad_value_error_names_the_field(tmp_path: Path, layer: str, name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as error:
        if layer == "flag":
            load(tmp_path, flags=[f"--{name.replace('_', '-')}", raw])
        elif layer == "env":
            load(tmp_path, env={f"FEDSTREAM_SAMPLE_{name.upper()}": raw})
        else:
            load(tmp_path, toml=f"[{SECTION}]\n{name} = {raw}\n")
    assert name in str(error.value)


def test_env_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDSTREAM_SAMPLE_RATIO"):
        load(tmp_path, env={"FEDSTREAM_SAMPLE_RATIO": "half"})


def test_validate_runs_after_every_layer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rounds"):
        load_config(ServerConfig, "server", {}, None, {"FEDSTREAM_SERVER_ROUNDS": "0"})
    config = load_config(
        ServerConfig, "server", {"rounds": "3"}, None, {"FEDSTREAM_SERVER_ROUNDS": "0"}
    )
    assert config.rounds == 3


def test_env_names_of_real_configs(tmp_path: Path) -> None:
    server = load_config(
        ServerConfig,
        "server",
        {},
        None,
        {"FEDSTREAM_SERVER_MIN_CLIENTS": "4", "FEDSTREAM_SERVER_RUN_DIR": "runs/x"},
    )
    assert (server.min_clients, server.run_dir) == (4, Path("runs/x"))
    client = load_config(
        ClientConfig,
        "client",
        {},
        None,
        {"FEDSTREAM_CLIENT_TASK_OPT": "params=1e6,dtype=bfloat16", "FEDSTREAM_SERVER_SEED": "9"},
    )
    assert client.task_opt == {"params": "1e6", "dtype": "bfloat16"}
    assert client.seed == 0, "another section's variable leaked in"


def test_field_docs_reads_the_string_under_each_field() -> None:
    docs = field_docs(Sample)
    assert docs["count"] == "How many."
    assert docs["ratio"] == "A share, spread over two lines."
    assert docs["maybe_dir"] == "An optional folder."
    assert "undocumented" not in docs
    assert set(docs) == {f.name for f in dataclasses.fields(Sample)} - {"undocumented"}


def test_flags_carry_docs_and_defaults_but_default_to_not_given() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Sample)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["count"] == "How many. (default: 1)"
    assert helps["extra"] == "Extra KEY=VALUE settings. (repeatable)"
    assert helps["path"] == "Where things go. (default: default/dir)"
    assert vars(parser.parse_args([])) == {}


# ---- configuration by component ------------------------------------------------------


@dataclass
class Wire:
    """How bytes move."""

    port: int = 1
    """Port to listen on."""
    label: str = "wire"
    """Redeclared below."""


@dataclass
class Schedule:
    """When things happen."""

    every: float = 2.0
    """Seconds between runs."""


@dataclass
class Composed(Wire, Schedule):
    """The whole thing."""

    label: str = "whole"
    """The composed class's own label."""
    name: str = "x"
    """A name of its own."""


def test_field_docs_reads_inherited_fields_where_declared() -> None:
    docs = field_docs(Composed)
    assert docs == {
        "port": "Port to listen on.",
        "every": "Seconds between runs.",
        "label": "The composed class's own label.",
        "name": "A name of its own.",
    }


def test_components_are_the_declaring_classes_in_method_resolution_order() -> None:
    parts = [(cls, [f.name for f in fields]) for cls, fields in components(Composed)]
    assert parts == [(Composed, ["label", "name"]), (Wire, ["port"]), (Schedule, ["every"])]
    assert [cls for cls, _ in components(Sample)] == [Sample]


def test_a_composed_config_gets_one_argument_group_per_component() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Composed)
    groups = {
        g.title: (g.description, [a.dest for a in g._group_actions]) for g in parser._action_groups
    }
    assert groups["composed"] == ("The whole thing.", ["label", "name"])
    assert groups["wire"] == ("How bytes move.", ["port"])
    assert groups["schedule"] == ("When things happen.", ["every"])
    assert vars(parser.parse_args(["--port", "3", "--every", "1"])) == {"port": "3", "every": "1"}


def test_a_plain_config_adds_its_flags_to_the_parser_itself() -> None:
    parser = argparse.ArgumentParser()
    before = len(parser._action_groups)
    add_arguments(parser, Sample)
    assert len(parser._action_groups) == before


def test_choices_and_default_help_metadata_show_in_help() -> None:
    @dataclass
    class Picky:
        mode: str = field(default="a", metadata={CHOICES: ("a", "b")})
        """How to go."""
        rate: float | None = field(default=None, metadata={DEFAULT_HELP: "per mode"})
        """How fast."""

    parser = argparse.ArgumentParser()
    add_arguments(parser, Picky)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["mode"] == "How to go. One of: a, b. (default: a)"
    assert helps["rate"] == "How fast. (default: per mode)"


SERVER_COMPONENTS = [
    ServerConfig,
    TransportConfig,
    SecurityConfig,
    RoundsConfig,
    UplinkConfig,
    StreamingConfig,
    DurabilityConfig,
    StrategyConfig,
    SafeguardsConfig,
    PrivacyConfig,
    EvaluationConfig,
    StatusConfig,
]


def test_server_config_is_composed_of_its_components() -> None:
    assert [cls for cls, _ in components(ServerConfig)] == SERVER_COMPONENTS
    for component in SERVER_COMPONENTS[1:]:
        assert isinstance(ServerConfig(), component)
        assert component.__doc__ and not component.__doc__.startswith(component.__name__ + "(")
    assert ServerConfig().spool_path == Path("runs/latest/spool")


# A field of each component: TOML value, environment value, flag, and what each gives.
SERVER_PRECEDENCE = [
    ("run_dir", '"f/run"', "e/run", "g/run", Path("f/run"), Path("e/run"), Path("g/run")),
    ("address", '"127.0.0.1:1"', "127.0.0.2:2", "::1:3", "127.0.0.1:1", "127.0.0.2:2", "::1:3"),
    ("min_clients", "3", "4", "5", 3, 4, 5),
    ("uplink_codec", '"int8"', "fp16", "topk", "int8", "fp16", "topk"),
    ("server_lr", "0.5", "0.25", "0.125", 0.5, 0.25, 0.125),
    ("eval_every", "2", "3", "4", 2, 3, 4),
    ("status_address", '"127.0.0.1:7"', "127.0.0.1:8", "", "127.0.0.1:7", "127.0.0.1:8", ""),
]


@pytest.mark.parametrize(
    ("name", "toml_value", "env_value", "flag_value", "from_file", "from_env", "from_flag"),
    SERVER_PRECEDENCE,
    ids=[case[0] for case in SERVER_PRECEDENCE],
)
def test_precedence_holds_for_a_field_of_each_server_component(
    tmp_path: Path,
    name: str,
    toml_value: str,
    env_value: str,
    flag_value: str,
    from_file: Any,
    from_env: Any,
    from_flag: Any,
) -> None:
    config_file = tmp_path / "fedstream.toml"
    config_file.write_text(f"[server]\n{name} = {toml_value}\n")
    env = {f"FEDSTREAM_SERVER_{name.upper()}": env_value}
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    flags = vars(parser.parse_args(["--" + name.replace("_", "-"), flag_value]))

    def value(cli: dict[str, Any], file: Path | None, environ: dict[str, str]) -> Any:
        return getattr(load_config(ServerConfig, "server", cli, file, environ), name)

    assert value({}, None, {}) == getattr(ServerConfig(), name)
    assert value({}, config_file, {}) == from_file
    assert value({}, config_file, env) == from_env
    assert value(flags, config_file, env) == from_flag


# A bad value for fields of each component; the error must name the field.
BAD_VALUES: list[tuple[type, str, Any]] = [
    (TransportConfig, "address", "no-port"),
    (TransportConfig, "chunk_bytes", 10),
    (TransportConfig, "chunk_bytes", 32 << 20),
    (TransportConfig, "poll_timeout", 0.0),
    (TransportConfig, "client_timeout", -1.0),
    (TransportConfig, "stall_timeout", 0.0),
    (RoundsConfig, "rounds", 0),
    (RoundsConfig, "min_clients", 0),
    (RoundsConfig, "fraction", 1.5),
    (RoundsConfig, "min_reports", 0),
    (RoundsConfig, "round_timeout", 0.0),
    (RoundsConfig, "proximal_mu", -0.1),
    (RoundsConfig, "done_grace", -1.0),
    (UplinkConfig, "uplink_codec", "gzip"),
    (UplinkConfig, "topk_fraction", 0.0),
    (StrategyConfig, "strategy", "no-such-strategy"),
    (StrategyConfig, "client_weight", {"a": "-1"}),
    (StrategyConfig, "server_lr", 0.0),
    (StrategyConfig, "server_momentum", 1.0),
    (StrategyConfig, "server_optimizer", "rmsprop"),
    (StrategyConfig, "beta1", 1.0),
    (StrategyConfig, "beta2", -0.1),
    (StrategyConfig, "tau", 0.0),
    (EvaluationConfig, "eval_every", -1),
    (EvaluationConfig, "eval_timeout", 0.0),
    (StatusConfig, "status_address", "no-port"),
    (ServerConfig, "keep_checkpoints", 0),
    (ServerConfig, "threads", -1),
]


@pytest.mark.parametrize(
    ("component", "name", "bad"),
    BAD_VALUES,
    ids=[f"{c.__name__}.{n}={b!r}" for c, n, b in BAD_VALUES],
)
def test_each_component_validates_its_own_fields(component: type, name: str, bad: Any) -> None:
    component().validate()
    with pytest.raises(ConfigError, match=name):
        component(**{name: bad}).validate()
    with pytest.raises(ConfigError, match=name):
        ServerConfig(**{name: bad}).validate()


def test_a_status_page_off_loopback_needs_tls_or_insecure() -> None:
    with pytest.raises(ConfigError, match="status_address 0.0.0.0:8080 is not loopback"):
        ServerConfig(status_address="0.0.0.0:8080").validate()
    ServerConfig(status_address="0.0.0.0:8080", insecure=True).validate()
    ServerConfig(status_address="").validate()  # no status page
