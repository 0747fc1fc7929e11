"""Per-client tokens: a secret a client presents at Join, checked against its hash.

The coordinator keeps only hashes (`--tokens FILE`, one `NAME SHA256-HEX` a line, `#`
comments), so the file it reads grants nothing if it leaks. `fedstream token NAME` makes
a token and the line for the file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from fedstream.common.config import ConfigError

_LINE = re.compile(r"(\S+)\s+([0-9a-f]{64})")


def new_token() -> str:
    """256 random bits in hex: a token never begins with "-", which `--token TOKEN` would
    read as a missing argument (base64's alphabet has "-" as one of 64 first letters)."""
    return secrets.token_hex(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """NAME -> SHA256-HEX from a tokens file; ConfigError naming the line that is wrong."""
    hashes: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _LINE.fullmatch(text)
        if match is None:
            raise ConfigError(f"{path}:{number}: expected NAME SHA256-HEX")
        name, digest = match.groups()
        if name in hashes:
            raise ConfigError(f"{path}:{number}: {name} has a token already")
        hashes[name] = digest
    return hashes


def token_matches(token: str, digest: str) -> bool:
    """Whether `token` hashes to `digest`, in constant time."""
    return hmac.compare_digest(token_hash(token), digest)
