"""``fedscan ws-bridge``: MQTT over WebSockets + TLS on port 443, relayed to a TCP broker.

Hospital firewalls often open nothing but 443. MQTT over WebSockets carries the MQTT byte
stream in binary WebSocket messages, so a bridge that terminates TLS and WebSockets and copies
the bytes to the broker's plain TCP listener (on loopback, beside it) lets boxes reach any
broker we run, with its queue limits and persistence unchanged: the installed mosquitto has no
WebSocket support, and the NATS cluster keeps its MQTT listeners. This is the job a TLS reverse
proxy (nginx, HAProxy) does in a hospital's DMZ; the ``websockets`` library does the protocol.

Identity: with ``--tls-ca`` the bridge requires a client certificate from the fleet CA and
refuses a connection whose MQTT CONNECT client id differs from the certificate's CN (a box
cannot pose as another box). The broker behind it sees the bridge as the peer, so per-agent
topic ACLs keyed on the certificate (``deploy/mosquitto``) do not apply to bridged clients; a
broker with native WebSockets (EMQX, newer NATS, mosquitto built with libwebsockets) keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from protocol.errors import FedscanError, Reason

log = logging.getLogger("fedscan.ws_bridge")

MAX_CONNECT_BYTES = 65536  # a CONNECT larger than this is not a fedscan client


class BridgeRefusal(FedscanError, ValueError):
    """A bridged connection refused before it reached the broker (bad CONNECT, identity mismatch)."""

    reason = Reason.PROTOCOL_ERROR


@dataclass(frozen=True)
class BridgeConfig:
    """Where the bridge listens and relays to, and its TLS material."""

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    path: str = "/mqtt"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # require client certificates from this CA and bind client id = CN
    max_message_bytes: int = 16 * 1024 * 1024


def _remaining_length(data: bytes, start: int) -> tuple[int, int]:
    """Decode MQTT's variable-length integer at ``start``: (value, offset after it)."""
    value, shift = 0, 0
    for i in range(start, min(start + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    raise BridgeRefusal("incomplete or malformed MQTT remaining length", reason=Reason.TRUNCATED)


def connect_client_id(data: bytes) -> str:
    """The client id of the MQTT 3.1.1 CONNECT packet at the start of ``data``.

    Raises ``BridgeRefusal`` (reason ``truncated``) when more bytes are needed, and
    ``BridgeRefusal`` (``protocol_error``) when the bytes are not a CONNECT.
    """
    if not data:
        raise BridgeRefusal("no data", reason=Reason.TRUNCATED)
    if data[0] != 0x10:
        raise BridgeRefusal(f"first packet is not CONNECT (type byte {data[0]:#04x})")
    length, body = _remaining_length(data, 1)
    if len(data) < body + length:
        raise BridgeRefusal("CONNECT not complete yet", reason=Reason.TRUNCATED)
    packet = data[body : body + length]
    if len(packet) < 2:
        raise BridgeRefusal("CONNECT too short")
    name_len = int.from_bytes(packet[0:2], "big")
    pos = 2 + name_len + 1 + 1 + 2  # protocol name, level, flags, keepalive
    if packet[2 : 2 + name_len] not in (b"MQTT", b"MQIsdp") or len(packet) < pos + 2:
        raise BridgeRefusal("CONNECT has no MQTT protocol name or is too short")
    id_len = int.from_bytes(packet[pos : pos + 2], "big")
    raw = packet[pos + 2 : pos + 2 + id_len]
    if len(raw) != id_len:
        raise BridgeRefusal("CONNECT client id truncated")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BridgeRefusal("CONNECT client id is not UTF-8") from exc


def server_tls(cfg: BridgeConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+; client certificates required with ``tls_ca``)."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(cfg.tls_ca))
    return ctx


def _peer_cn(ws: ServerConnection) -> str | None:
    ssl_object = ws.transport.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class Bridge:
    """The running bridge: accepts WebSocket connections and relays each to the broker over TCP."""

    def __init__(self, cfg: BridgeConfig) -> None:
        self.cfg = cfg
        self.connections = 0
        self.refused: dict[str, int] = {}

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != self.cfg.path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"MQTT is served on {self.cfg.path}\n")
        return None

    def _refuse(self, peer: object, why: FedscanError) -> None:
        self.refused[why.reason.value] = self.refused.get(why.reason.value, 0) + 1
        log.warning("ws-bridge: refused %s: %s", peer, why)

    async def _first_packet(self, ws: ServerConnection) -> bytes:
        """Read WebSocket messages until they hold the whole CONNECT (the client id must be known)."""
        buf = b""
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                raise BridgeRefusal("text WebSocket message: MQTT travels in binary messages")
            buf += msg
            try:
                connect_client_id(buf)
                return buf
            except BridgeRefusal as exc:
                if exc.reason is not Reason.TRUNCATED or len(buf) > MAX_CONNECT_BYTES:
                    raise

    async def handle(self, ws: ServerConnection) -> None:
        """Relay one client: check its CONNECT against its certificate, then copy bytes both ways."""
        peer = ws.remote_address
        try:
            first = await self._first_packet(ws)
            client_id = connect_client_id(first)
            cn = _peer_cn(ws)
            if self.cfg.tls_ca is not None and cn != client_id:
                raise BridgeRefusal(f"client id {client_id!r} is not the certificate's CN {cn!r}")
        except BridgeRefusal as exc:
            self._refuse(peer, exc)
            await ws.close(1008, exc.reason.value)
            return
        except ConnectionClosed:
            return
        try:
            reader, writer = await asyncio.open_connection(self.cfg.upstream_host, self.cfg.upstream_port)
        except OSError as exc:
            log.error("ws-bridge: broker %s:%d unreachable: %s", self.cfg.upstream_host, self.cfg.upstream_port, exc)
            await ws.close(1011, "broker unavailable")
            return
        self.connections += 1
        log.info("ws-bridge: %s (client id %s) -> %s:%d", peer, client_id, self.cfg.upstream_host,
                 self.cfg.upstream_port)
        writer.write(first)

        async def to_broker() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for msg in ws:
                    writer.write(msg if isinstance(msg, bytes) else msg.encode())
                    await writer.drain()

        async def to_client() -> None:
            while data := await reader.read(65536):
                await ws.send(data)

        tasks = [asyncio.ensure_future(to_broker()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            await ws.close()

    async def serve(self, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
        """Listen until ``stop`` is set; set ``started`` once the socket is bound."""
        async with serve(self.handle, self.cfg.listen_host, self.cfg.listen_port, ssl=server_tls(self.cfg),
                         subprotocols=[Subprotocol("mqtt")], max_size=self.cfg.max_message_bytes, ping_interval=None,
                         process_request=self._process_request):
            scheme = "wss" if self.cfg.tls_cert else "ws"
            log.info("ws-bridge: %s://%s:%d%s -> %s:%d", scheme, self.cfg.listen_host, self.cfg.listen_port,
                     self.cfg.path, self.cfg.upstream_host, self.cfg.upstream_port)
            if started is not None:
                started.set()
            await stop.wait()


def run_bridge(cfg: BridgeConfig) -> None:
    """Run the bridge until SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Bridge(cfg).serve(stop)

    asyncio.run(main())
