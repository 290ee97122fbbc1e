"""The ``fedscan`` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config,
3 broker unreachable."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from protocol.errors import TransportError
from protocol.profile import ProfileError, find_profile

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedscan: federated learning for imaging edge boxes")

EXIT_RUNTIME, EXIT_CONFIG, EXIT_BROKER = 1, 2, 3


def _logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("FEDSCAN_LOG", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("amqtt", "transitions", "alembic", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _profile(name: str):  # type: ignore[no-untyped-def]
    try:
        return find_profile(name)
    except ProfileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


@app.command()
def enroll(
    agent_id: str,
    profile: Annotated[str, typer.Option(help="firmware profile name or YAML path")] = "xray-cxr-28",
    tags: Annotated[str, typer.Option(help="comma-separated cohort tags")] = "",
    state: Annotated[Path, typer.Option(help="coordinator state folder")] = Path("fedscan-state"),
    store_url: Annotated[str | None, typer.Option(help="database URL (default: SQLite in --state)")] = None,
    cert_fingerprint: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Make an agent known to the coordinator (its MQTT client id must equal AGENT_ID)."""
    from coordinator.store import open_store
    from protocol.topics import validate_id

    _logging(False)
    p = _profile(profile)
    try:
        validate_id(agent_id, "agent id")
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    state.mkdir(parents=True, exist_ok=True)
    store = open_store(store_url or f"sqlite:///{state / 'state.db'}")
    rec = store.enroll_agent(agent_id, p.name, [t for t in tags.split(",") if t], cert_fingerprint)
    typer.echo(f"enrolled {rec.agent_id} (profile {rec.profile}, tags {rec.tags})")


@app.command()
def coordinator(
    state: Annotated[Path, typer.Option()] = Path("fedscan-state"),
    broker: Annotated[str, typer.Option(help="HOST:PORT")] = "127.0.0.1:1883",
    profile: Annotated[str, typer.Option()] = "xray-cxr-28",
    val_data: Annotated[Path | None, typer.Option(help="MedMNIST npz whose val split the coordinator holds")] = None,
    rounds: int = 5,
    min_clients: int = 2,
    deadline: Annotated[float, typer.Option(help="seconds per round")] = 600.0,
    strategy: str = "fedavg",
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    loss: Annotated[str, typer.Option(help="ce | balanced_ce (class-balanced over each site's own labels)")] = "ce",
    prox_mu: float = 0.0,
    max_steps: int | None = None,
    codec: str = "raw",
    seed: int = 0,
    fleet: str = "default",
    rollout: Annotated[str, typer.Option(help="auto: every new model is served by all agents; manual: new models "
                                         "are candidates, served after `fedscan model approve` + `rollout start`")
                       ] = "auto",
    mode: Annotated[str, typer.Option(help="sync: every round waits for its own updates; async: MIN_CLIENTS updates "
                                      "close a round and late ones count in a later round, down-weighted")] = "sync",
    max_staleness: Annotated[int, typer.Option(help="async: how many rounds old an update may be")] = 4,
    store_url: str | None = None,
    threads: int | None = None,
    exit_when_done: Annotated[bool, typer.Option(help="exit after the last round instead of serving on")] = False,
    http_port: Annotated[int | None, typer.Option(help="serve the fleet dashboard and /metrics on this port")] = None,
    export: Annotated[bool, typer.Option(help="export each model to verified ONNX FP32/INT8 (+TensorRT) artifacts")
                      ] = True,
    tls_ca: Annotated[Path | None, typer.Option(help="fleet CA certificate (mTLS to the broker)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="this process's certificate (CN = client id)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="this process's private key")] = None,
    verbose: bool = False,
) -> None:
    """Run federated rounds until ROUNDS are complete (resumes after a restart), then keep serving
    models and fleet state until stopped."""
    from coordinator.strategies import local_work_warning
    from fedscan.compose import CoordinatorConfig, run_coordinator
    from protocol.messages import TrainingConfig

    _logging(verbose)
    if rollout not in ("auto", "manual"):
        typer.echo(f"error: --rollout must be auto or manual, not {rollout!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if mode not in ("sync", "async") or max_staleness < 0:
        typer.echo(f"error: --mode must be sync or async (not {mode!r}) and --max-staleness >= 0", err=True)
        raise typer.Exit(EXIT_CONFIG)
    training = TrainingConfig(local_epochs=local_epochs, batch_size=batch_size, lr=lr, prox_mu=prox_mu,
                              max_steps=max_steps, loss=loss)  # type: ignore[arg-type]
    if (advice := local_work_warning(strategy, training)) is not None:
        typer.echo(f"warning: {advice}", err=True)
    cfg = CoordinatorConfig(
        state_dir=state, broker=broker, profile=_profile(profile), val_data=val_data, rounds=rounds,
        min_clients=min_clients, deadline_s=deadline, strategy=strategy, rollout=rollout, training=training,
        codec=codec, seed=seed, fleet=fleet, store_url=store_url, threads=threads, mode=mode, max_staleness=max_staleness,
        exit_when_done=exit_when_done, http_port=http_port, export=export, tls=_tls(tls_ca, tls_cert, tls_key),
    )
    _run(lambda: run_coordinator(cfg))


@app.command()
def agent(
    id: Annotated[str, typer.Option("--id", help="agent id = MQTT client id")],
    broker: Annotated[str, typer.Option(help="HOST:PORT")] = "127.0.0.1:1883",
    profile: Annotated[str, typer.Option()] = "xray-cxr-28",
    state: Annotated[Path, typer.Option()] = Path("agent-state"),
    data: Annotated[Path | None, typer.Option(help="MedMNIST npz (train split = this site's images)")] = None,
    indices: Annotated[Path | None, typer.Option(help=".npy of this site's indices into the train split")] = None,
    threads: int | None = None,
    fleet: str = "default",
    trust: Annotated[Path | None, typer.Option(help="trusted model-signing keys (the coordinator's keys/trust.json); "
                                               "without it signatures are not checked")] = None,
    http_port: Annotated[int | None, typer.Option(help="diagnosis API port (tokens: FEDSCAN_API_TOKENS)")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM C-STORE listener port")] = None,
    dicom_aet: Annotated[list[str] | None, typer.Option(help="calling AE title allowed to store (repeat)")] = None,
    telemetry: bool = True,
    tls_ca: Annotated[Path | None, typer.Option(help="fleet CA certificate (mTLS to the broker)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="this process's certificate (CN = client id)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="this process's private key")] = None,
    resource_gates: Annotated[bool, typer.Option(help="--no-resource-gates when several simulated agents share "
                                                 "one machine (inference still pauses training)")] = True,
    verbose: bool = False,
) -> None:
    """Run an edge agent: train on local images, upload updates, install models, serve diagnoses."""
    from fedscan.compose import AgentConfig, run_agent

    _logging(verbose)
    cfg = AgentConfig(agent_id=id, broker=broker, profile=_profile(profile), state_dir=state, data=data,
                      indices=indices, threads=threads, fleet=fleet, trust=trust, http_port=http_port,
                      dicom_port=dicom_port, dicom_aets=tuple(dicom_aet or ()), telemetry=telemetry,
                      resource_gates=resource_gates, tls=_tls(tls_ca, tls_cert, tls_key))
    _run(lambda: run_agent(cfg))


@app.command(name="broker")
def broker_cmd(port: int = 1883) -> None:
    """Run the embedded pure-Python MQTT broker (amqtt) on 127.0.0.1:PORT."""
    from fedscan.broker import run_embedded

    _logging(False)
    run_embedded(port)


@app.command()
def demo(
    out: Path = Path("demo-out"),
    data: Annotated[str | None, typer.Option(help="MedMNIST-format npz (default: ../shared/data/pneumoniamnist.npz)")
                    ] = None,
    profile: str = "xray-cxr-28",
    agents: int = 4,
    rounds: int = 12,
    local_epochs: int = 1,
    alpha: float = 0.5,
    seed: int = 0,
    strategy: str = "fedavg",
    codec: str = "raw",
    broker: Annotated[str, typer.Option(help="auto | mosquitto | embedded")] = "auto",
    verbose: bool = False,
) -> None:
    """Broker + coordinator + N agents as processes, R rounds, baselines, report and plot."""
    from fedscan.demo import DemoConfig, run_demo

    _logging(verbose)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    cfg = DemoConfig(out=out, data=data, profile=profile, agents=agents, rounds=rounds, local_epochs=local_epochs,
                     alpha=alpha, seed=seed, strategy=strategy, codec=codec, broker=broker)
    _run(lambda: run_demo(cfg))


def _tls(ca: Path | None, cert: Path | None, key: Path | None):  # type: ignore[no-untyped-def]
    from fedscan.compose import tls_config

    try:
        return tls_config(ca, cert, key)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def _run(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except TransportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BROKER) from exc
    except (ValueError, ProfileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def _register_fleet_commands() -> None:
    from fedscan.fleet_cli import register

    register(app)


_register_fleet_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
