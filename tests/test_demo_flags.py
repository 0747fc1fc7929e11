"""`fedstream demo` passes the server's strategy, codec and other flags through."""

from __future__ import annotations

import pytest

from fedstream.common.config import ConfigError, load_config
from fedstream.demo import DemoConfig


def test_strategy_codec_and_server_opts_become_server_flags() -> None:
    cli = {
        "strategy": "fedadam",
        "uplink_codec": "int8",
        "server_opt": ["server-lr=0.05", "uplink-zstd=true", "--round-timeout=60"],
    }
    config = load_config(DemoConfig, "demo", cli, environ={})
    assert config.server_flags() == [
        "--strategy", "fedadam", "--uplink-codec", "int8",
        "--server-lr", "0.05", "--uplink-zstd", "--round-timeout", "60",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("cli", "named"),
    [
        ({"strategy": "fedbest"}, "strategy 'fedbest' is unknown"),
        ({"uplink_codec": "jpeg"}, "uplink_codec must be one of"),
        ({"server_opt": ["rounds=3"]}, "server_opt rounds: the demo sets it"),
    ],
)
def test_a_bad_pass_through_is_refused_before_anything_starts(cli: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(DemoConfig, "demo", cli, environ={})
