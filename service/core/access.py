"""Who may call: accepted secrets (several at once, for rotation) and source address ranges.

Plain rules, no transport: the gRPC interceptor and the webhook route ask these.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenSet:
    """Secrets of which any one is accepted: the new and the old during a rotation.

    Every accepted token is compared, in constant time, whatever the answer: the time taken
    tells nothing about which token, or how much of one, matched.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def accepts(self, given: str) -> bool:
        candidate = given.encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched


BEARER = "bearer "


def bearer_token(authorization: str) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value, or None when it is not one."""
    if authorization[: len(BEARER)].lower() != BEARER:
        return None
    token = authorization[len(BEARER) :].strip()
    return token or None


def parse_networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDR ranges ("1.179.112.0/20", "::1/128", or a single address). Raises ValueError
    naming the one that is not a range."""
    networks: list[IpNetwork] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address range like 1.179.112.0/20") from None
    return tuple(networks)


@dataclass(frozen=True)
class SourceAllowList:
    """Which peers may post webhooks. Empty ``networks``: any.

    Behind a proxy the peer is the proxy; when ``proxy_header`` is set (say
    X-Forwarded-For), the address the trusted proxy appended, the last one in that header,
    is judged instead. Never set it without such a proxy in front: anyone could then write
    the header themselves.
    """

    networks: tuple[IpNetwork, ...] = ()
    proxy_header: str = ""

    def source(self, peer: str | None, header_values: Sequence[str]) -> str | None:
        """The address to judge: the peer's, or the last one in the trusted header."""
        if not self.proxy_header:
            return peer
        forwarded = [part.strip() for value in header_values for part in value.split(",")]
        forwarded = [part for part in forwarded if part]
        return forwarded[-1] if forwarded else None

    def allows(self, address: str | None) -> bool:
        if not self.networks:
            return True
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
