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

from fedstream.common.tokens import token_matches
from fedstream.server.errors import IdentityMismatch, UnknownClient


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool
    """Proven by a certificate or a token: a new session may replace a live one."""


class Authenticator:
    def __init__(self, mutual_tls: bool, tokens: Mapping[str, str] | None) -> None:
        self.mutual_tls = mutual_tls
        self.tokens = dict(tokens) if tokens is not None else None

    def identify(self, claimed: str, peer_name: str | None, token: str | None) -> Identity:
        """The identity of a Join claiming `claimed`, from the peer certificate's name and
        the token it presented. UnknownClient (UNAUTHENTICATED) for missing or unknown
        credentials; IdentityMismatch (PERMISSION_DENIED) for credentials of another name."""
        if self.mutual_tls:
            if not peer_name:
                raise UnknownClient("the client certificate names no identity (common name)")
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
            owner = next((n for n, h in self.tokens.items() if token_matches(token, h)), None)
            if owner is not None:
                raise IdentityMismatch(f"the token is {owner!r}'s; it cannot join as {claimed!r}")
            raise UnknownClient(
                f"unknown token for {claimed!r}: the client's --token is not in the "
                "coordinator's --tokens file"
            )
        return Identity(claimed, False)
