"""Where the box listens: the bind addresses of the diagnosis API and of the DICOM listener.

They are separate because a hospital deploys them differently: the DICOM listener must be
reachable by the scanners on the imaging network (``--dicom-host``, e.g. that interface's
address), while the HTTP API may stay on loopback behind the hospital's reverse proxy
(``--http-host``). Both default to ``127.0.0.1`` (nothing is exposed until someone decides to);
an address must be an IP literal (``0.0.0.0`` / ``::`` for every interface) or ``localhost``, so
a typo fails at start-up (exit 2), not at the first scanner's association.
"""

from __future__ import annotations

import ipaddress
import logging

from protocol.errors import FedscanError, Reason

log = logging.getLogger("fedscan.agent.listeners")

DEFAULT_HOST = "127.0.0.1"


class ListenerConfigError(FedscanError, ValueError):
    """A bind address that is not an IP literal or ``localhost``."""

    reason = Reason.BAD_CONFIG


def bind_host(value: str, what: str) -> str:
    """Return ``value`` when it is a valid bind address for ``what``, else raise :class:`ListenerConfigError`."""
    host = value.strip()
    if host == "localhost":
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ListenerConfigError(f"{what} bind address {value!r} is not an IP address (or localhost)") from exc
    return host


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a listener bound to ``host``."""
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def announce(what: str, host: str, port: int) -> None:
    """Log where a listener is, and say so when nobody else can reach it."""
    if is_loopback(host):
        log.info("%s on %s:%d (loopback only: other machines cannot reach it)", what, host, port)
    else:
        log.warning("%s on %s:%d: reachable from the network", what, host, port)
