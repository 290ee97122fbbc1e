"""Broker addresses: parse ``--broker`` lists and URLs, pick where a client starts, space retries.

One ``--broker`` value names one broker or a cluster: a comma-separated list of addresses, each
``HOST:PORT`` (plain MQTT), or a URL ``mqtt://``, ``mqtts://`` (TLS), ``ws://`` or ``wss://``
(MQTT over WebSockets, TLS for ``wss``) with an optional path (default ``/mqtt``). All addresses
of one list share a scheme: a paho client has one transport, set when it is made. IPv6 hosts are
written in brackets (``[::1]:1883``). Everything here is pure, so the failover policy is tested
without a network: where a client starts in the list (spread by a stable hash of its client id,
so a fleet does not pile onto the first node), the next address after a loss, and the
exponential backoff with full jitter between tries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import SplitResult, urlsplit

from protocol.errors import FedscanError, Reason

__all__ = [
    "BrokerAddress",
    "BrokerAddressError",
    "BrokerList",
    "BrokerScheme",
    "ProxyAddress",
    "backoff_delay",
    "parse_broker_list",
    "parse_proxy",
    "start_index",
]


class BrokerAddressError(FedscanError, ValueError):
    """A ``--broker`` or ``--proxy`` value that does not parse (bad usage: CLI exit code 2)."""

    reason = Reason.BAD_CONFIG


class BrokerScheme(StrEnum):
    """How a client reaches a broker: plain or TLS TCP, or WebSockets (plain or TLS)."""

    MQTT = "mqtt"
    MQTTS = "mqtts"
    WS = "ws"
    WSS = "wss"

    @property
    def default_port(self) -> int:
        """The port used when an address names none (IANA 1883/8883, HTTP 80/443)."""
        return {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}[self.value]

    @property
    def tls(self) -> bool:
        """Whether the connection is wrapped in TLS."""
        return self in (BrokerScheme.MQTTS, BrokerScheme.WSS)

    @property
    def websockets(self) -> bool:
        """Whether MQTT travels inside WebSocket frames."""
        return self in (BrokerScheme.WS, BrokerScheme.WSS)


@dataclass(frozen=True)
class BrokerAddress:
    """One broker endpoint: scheme, host, port and (WebSockets only) the HTTP path."""

    scheme: BrokerScheme
    host: str
    port: int
    path: str = "/mqtt"

    def __str__(self) -> str:
        """The address as a URL (``HOST:PORT`` for plain MQTT), for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme is BrokerScheme.MQTT:
            return f"{host}:{self.port}"
        suffix = self.path if self.scheme.websockets else ""
        return f"{self.scheme.value}://{host}:{self.port}{suffix}"


@dataclass(frozen=True)
class BrokerList:
    """The addresses of one broker or cluster, in the order given, all of one scheme."""

    addresses: tuple[BrokerAddress, ...]

    @property
    def scheme(self) -> BrokerScheme:
        """The scheme every address shares."""
        return self.addresses[0].scheme

    def __len__(self) -> int:
        """How many addresses the list holds."""
        return len(self.addresses)

    def __str__(self) -> str:
        """Comma-separated, as ``--broker`` takes it."""
        return ",".join(str(a) for a in self.addresses)

    def after(self, index: int) -> int:
        """The index tried after ``index``: the next address, wrapping around."""
        return (index + 1) % len(self.addresses)


@dataclass(frozen=True)
class ProxyAddress:
    """An HTTP proxy reached with ``CONNECT`` (``--proxy http://host:port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        """The proxy as a URL, for logs."""
        return f"http://{self.host}:{self.port}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BrokerAddressError(f"{what}: port must be 1-65535, not {text!r}")
    return int(text)


def _url_port(parts: SplitResult, what: str) -> int | None:
    """The port a parsed URL names (None: none), refused outside 1-65535."""
    try:
        port = parts.port
    except ValueError:
        raise BrokerAddressError(f"{what}: port must be 1-65535") from None
    return None if port is None else _port(str(port), what)


def _one(text: str) -> BrokerAddress:
    item = text.strip()
    if not item:
        raise BrokerAddressError("empty broker address (two commas in a row, or a trailing comma?)")
    if "://" not in item:  # HOST:PORT, the historical form: plain MQTT
        host, sep, port_text = item.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host:
            raise BrokerAddressError(f"broker address {item!r} must be HOST:PORT or a URL (mqtt://, mqtts://, "
                                     "ws://, wss://)")
        return BrokerAddress(BrokerScheme.MQTT, host, _port(port_text, item))
    parts = urlsplit(item)
    try:
        scheme = BrokerScheme(parts.scheme.lower())
    except ValueError:
        raise BrokerAddressError(f"broker address {item!r}: scheme must be mqtt, mqtts, ws or wss, "
                                 f"not {parts.scheme!r}") from None
    if parts.username or parts.password or parts.query or parts.fragment:
        raise BrokerAddressError(f"broker address {item!r}: credentials, query and fragment are not accepted")
    if not parts.hostname:
        raise BrokerAddressError(f"broker address {item!r} names no host")
    port = _url_port(parts, f"broker address {item!r}")
    path = parts.path or "/mqtt"
    if not scheme.websockets and parts.path not in ("", "/"):
        raise BrokerAddressError(f"broker address {item!r}: only ws:// and wss:// take a path")
    return BrokerAddress(scheme, parts.hostname, port if port is not None else scheme.default_port, path)


def parse_broker_list(text: str) -> BrokerList:
    """Parse a ``--broker`` value: one address or a comma-separated list of one scheme."""
    addresses = tuple(_one(part) for part in text.split(","))
    schemes = {a.scheme for a in addresses}
    if len(schemes) > 1:
        raise BrokerAddressError(f"broker list {text!r} mixes schemes {sorted(s.value for s in schemes)}: "
                                 "give every node of a cluster the same scheme")
    if len(set(addresses)) != len(addresses):
        raise BrokerAddressError(f"broker list {text!r} names an address twice")
    return BrokerList(addresses)


def parse_proxy(text: str) -> ProxyAddress:
    """Parse ``--proxy http://host:port`` (an HTTP proxy that allows ``CONNECT``)."""
    parts = urlsplit(text.strip())
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise BrokerAddressError(f"proxy {text!r} must be http://HOST:PORT (an HTTP CONNECT proxy)")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise BrokerAddressError(f"proxy {text!r}: credentials, path and query are not accepted")
    port = _url_port(parts, f"proxy {text!r}")
    return ProxyAddress(parts.hostname, port if port is not None else 3128)


def start_index(client_id: str, count: int) -> int:
    """Where ``client_id`` starts in a list of ``count`` addresses: stable, spread evenly over ids."""
    if count < 1:
        raise ValueError("count must be >= 1")
    digest = hashlib.sha256(client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before try ``attempt`` (1-based): exponential, capped, with full jitter.

    Full jitter (a uniform draw from 0 to the capped exponential) spreads a fleet's reconnects
    after a broker node dies instead of sending them back in one wave; the floor of ``base / 2``
    keeps a client from spinning.
    """
    if attempt < 1 or base <= 0 or cap < base:
        raise ValueError("attempt >= 1 and 0 < base <= cap")
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return max(base / 2, rng.uniform(0.0, ceiling))
