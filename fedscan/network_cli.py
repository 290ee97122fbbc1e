"""The network commands of ``fedscan``: the embedded broker and the WebSocket bridge for port 443."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedscan.broker import run_embedded
from fedscan.log_setup import setup_logging as _logging
from fedscan.ws_bridge import BridgeConfig, run_bridge
from protocol.broker_address import BrokerAddressError, parse_broker_list

EXIT_CONFIG = 2


def register(app: typer.Typer) -> None:
    """Add the commands to the ``fedscan`` app."""
    app.command(name="broker")(broker_cmd)
    app.command(name="ws-bridge")(ws_bridge_cmd)


def broker_cmd(port: int = 1883) -> None:
    """Run the embedded pure-Python MQTT broker (amqtt) on 127.0.0.1:PORT."""
    _logging(False)
    run_embedded(port)


def ws_bridge_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept MQTT over WebSockets on (443 through a hospital "
                                        "firewall)")] = "0.0.0.0:443",
    upstream: Annotated[str, typer.Option(help="the broker's plain MQTT listener, HOST:PORT (keep it on loopback)")
                        ] = "127.0.0.1:1883",
    path: Annotated[str, typer.Option(help="WebSocket path the clients use (wss://HOST/PATH)")] = "/mqtt",
    tls_cert: Annotated[Path | None, typer.Option(help="server certificate (its SAN must name the host the boxes use)")
                        ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="server private key")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="fleet CA: require client certificates and client id = CN")
                      ] = None,
    plain: Annotated[bool, typer.Option("--plain", help="no TLS at all (a test network only)")] = False,
    max_message_bytes: Annotated[int, typer.Option(help="largest WebSocket message (>= chunk size + header)")
                                 ] = 16 * 1024 * 1024,
    verbose: bool = False,
) -> None:
    """Relay MQTT over WebSockets (+TLS) to a TCP broker: reach the fleet through port 443 only."""
    _logging(verbose)
    try:
        lis, up = parse_broker_list(listen).addresses, parse_broker_list(upstream).addresses
        if len(lis) != 1 or len(up) != 1:
            raise BrokerAddressError("--listen and --upstream take one HOST:PORT each")
    except BrokerAddressError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    given = [f for f in (tls_cert, tls_key) if f is not None]
    problem = None
    if not plain and len(given) != 2:
        problem = "--tls-cert and --tls-key are required (or --plain on a test network)"
    elif plain and (given or tls_ca is not None):
        problem = "--plain takes no TLS files"
    elif not path.startswith("/"):
        problem = f"--path must start with '/', not {path!r}"
    elif missing := [str(f) for f in (tls_cert, tls_key, tls_ca) if f is not None and not f.is_file()]:
        problem = f"TLS file(s) not found: {', '.join(missing)}"
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    run_bridge(BridgeConfig(lis[0].host, lis[0].port, up[0].host, up[0].port, path=path, tls_cert=tls_cert,
                            tls_key=tls_key, tls_ca=tls_ca, max_message_bytes=max_message_bytes))
