"""Who a joining client is: the identity its updates are booked under.

    mutual TLS      the client certificate's common name; the Join must claim it
    --tokens FILE   the name whose token the client presents; the Join must claim it
    neither         the name the client claims, first come first served

An authenticated client that joins again replaces its old session (a restarted process);
an unauthenticated claim to the name of a live session is refused, so nobody can evict a
client by joining under its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedstream.common.config import ConfigError
from fedstream.common.tokens import token_matches
from fedstream.server.admission.names import BadName, normalise_name
from fedstream.server.errors import IdentityMismatch, UnknownClient


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool
    """Proven by a certificate or a token: a new session may replace a live one."""


class Authenticator:
    def __init__(self, mutual_tls: bool, tokens: Mapping[str, str] | None) -> None:
        self.mutual_tls = mutual_tls
        self.tokens = _normalised(tokens) if tokens is not None else None

    @property
    def authenticates(self) -> bool:
        """Whether every client proves its identity (a certificate or a token)."""
        return self.mutual_tls or self.tokens is not None

    def token_owner(self, token: str | None) -> str | None:
        """The name whose client token `token` is; None for none or an unknown one."""
        if not token or self.tokens is None:
            return None
        return next((n for n, h in self.tokens.items() if token_matches(token, h)), None)

    def identify(self, claimed: str, peer_name: str | None, token: str | None) -> Identity:
        """The identity of a Join claiming `claimed` (normalised), from the peer
        certificate's name and the token it presented. UnknownClient (UNAUTHENTICATED)
        for missing or unknown credentials; IdentityMismatch (PERMISSION_DENIED) for
        credentials of another name."""
        if self.mutual_tls:
            if not peer_name:
                raise UnknownClient("the client certificate names no identity (common name)")
            try:
                peer_name = normalise_name(peer_name, "the client certificate's common name")
            except BadName as exc:
                raise UnknownClient(str(exc)) from None
            if claimed != peer_name:
                raise IdentityMismatch(
                    f"client certificate is for {peer_name!r}; it cannot join as {claimed!r}"
                )
            return Identity(peer_name, True)
        if self.tokens is not None:
            if not token:
                raise UnknownClient("this coordinator needs a client token (--token)")
            expected = self.tokens.get(claimed)
            if expected is not None and token_matches(token, expected):
                return Identity(claimed, True)
            owner = self.token_owner(token)
            if owner is not None:
                raise IdentityMismatch(f"the token is {owner!r}'s; it cannot join as {claimed!r}")
            raise UnknownClient(
                f"unknown token for {claimed!r}: the client's --token is not in the "
                "coordinator's --tokens file"
            )
        return Identity(claimed, False)


def _normalised(tokens: Mapping[str, str]) -> dict[str, str]:
    """The tokens by normalised name; ConfigError for a name that is not usable or that
    two lines spell differently."""
    named: dict[str, str] = {}
    for name, digest in tokens.items():
        try:
            normal = normalise_name(name, "the --tokens file's name")
        except BadName as exc:
            raise ConfigError(str(exc)) from None
        if normal in named:
            raise ConfigError(f"the --tokens file names {normal!r} twice (once as {name!r})")
        named[normal] = digest
    return named
