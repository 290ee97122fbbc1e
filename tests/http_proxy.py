"""A minimal HTTP CONNECT proxy for tests: records each CONNECT target, then relays bytes.

It stands in for a hospital's outbound proxy (squid and the like); nothing but ``CONNECT`` is
served. ``allow`` limits the targets (others get 403), as a proxy's policy would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ConnectProxy:
    """A running proxy: its port, the CONNECT targets it saw, the ones it refused."""

    port: int
    allow: set[str] | None = None
    seen: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve_one(proxy: ConnectProxy, client: socket.socket) -> None:
    with client:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) != 3 or line[0] != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        target = line[1]
        proxy.seen.append(target)
        if proxy.allow is not None and target not in proxy.allow:
            proxy.refused.append(target)
            client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            return
        with upstream:
            upstream.settimeout(None)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join(5)


@contextlib.contextmanager
def connect_proxy(allow: set[str] | None = None) -> Iterator[ConnectProxy]:
    """Run a CONNECT proxy on a free loopback port until the block ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    proxy = ConnectProxy(server.getsockname()[1], allow)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                threading.Thread(target=_serve_one, args=(proxy, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield proxy
    finally:
        server.close()
