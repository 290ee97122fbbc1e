"""The ``fedscan`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config, 3 broker unreachable.

Our modules are imported at the top, except the two that pull torch (``fedscan.compose`` for the
coordinator and agent commands, ``fedscan.demo``): ``fedscan enroll``, ``broker``, ``ws-bridge`` and
the fleet commands start in about a second instead of eight on a loaded two-core box.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from coordinator.store import open_store
from coordinator.strategies import build_strategy, check_round_size, local_work_warning, strategy_options
from fedscan.config_file import apply_config
from fedscan.data_cli import DATA_FORMAT_HELP, data_source_option
from fedscan.data_cli import register as register_data
from fedscan.fleet_cli import register
from fedscan.log_setup import setup_logging as _logging
from fedscan.network_cli import register as register_network
from firmware.profile import ProfileError, find_profile
from learning.recipe import ROUNDS, STEPS_PER_ROUND, default_training, strategy_args_for
from learning.recipe import STRATEGY as RECIPE_STRATEGY
from protocol.errors import Reason, TransportError
from protocol.identifiers import validate_id
from protocol.jobs import Job
from protocol.messages import TrainingConfig
from protocol.transport import TlsConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedscan: federated learning for imaging edge boxes")

EXIT_RUNTIME, EXIT_CONFIG, EXIT_BROKER = 1, 2, 3
BROKER_HELP = ("HOST:PORT, or a URL mqtt://, mqtts://, ws://HOST:PORT/PATH, wss://HOST/mqtt (WebSockets, e.g. port 443); "
               "a cluster: its nodes comma-separated (the client fails over to the next one on loss)")


_OWN_DATA_JOBS = (Job.SEGMENT, Job.ANOMALY)  # jobs whose --data is read by their own loader (fedscan.jobs)
CONFIG_HELP = ("YAML file with these settings, keys as the flags in snake_case (e.g. min_clients: 4); a flag given "
               "on the command line overrides the file")


def _config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config``: read first (eager); its settings become the defaults of the other flags."""
    return apply_config(ctx, value, CONFIGURABLE[ctx.command.name or ""])


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
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP, is_eager=True, callback=_config)] = None,
    state: Annotated[Path, typer.Option()] = Path("fedscan-state"),
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "127.0.0.1:1883",
    profile: Annotated[str, typer.Option()] = "xray-cxr-28",
    val_data: Annotated[Path | None, typer.Option(help="MedMNIST npz whose val split the coordinator holds "
                                                   "(--job segment: a folder with ph2/ and/or brain-mri-flair/), or "
                                                   "a labelled image folder (--val-labels-csv/--val-label-field)")] = None,
    val_data_format: Annotated[str, typer.Option(help=DATA_FORMAT_HELP)] = "auto",
    val_labels_csv: Annotated[Path | None, typer.Option(help="CSV filename,label for a --val-data folder")] = None,
    val_label_field: Annotated[str | None, typer.Option(help="dotted JSON field holding the label")] = None,
    val_indices: Annotated[Path | None, typer.Option(help=".npy positions or .txt ids: the coordinator's share")] = None,
    rounds: int = 5,
    min_clients: int = 2,
    deadline: Annotated[float, typer.Option(help="seconds per round")] = 600.0,
    strategy: Annotated[str | None, typer.Option(help="aggregation step (fedavg, fedavgm, median, krum, ...); "
                                                 "default: fedavg, or the recipe's (fedavgm) with --recipe "
                                                 "default")] = None,
    max_weight_ratio: Annotated[float, typer.Option(help="cap each self-reported sample count at this many median "
                                                    "counts of the round (0: no cap)")] = 4.0,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    loss: Annotated[str, typer.Option(help="ce | balanced_ce (class-balanced over each site's own labels)")] = "ce",
    prox_mu: float = 0.0,
    max_steps: int | None = None,
    recipe: Annotated[str, typer.Option(help="flags: the options above; default: learning/recipe.py (a budget of "
                                        "--steps-per-round steps a round, warm-up + cosine, balanced loss, the "
                                        "profile's augmentation), the same on every dataset")] = "flags",
    steps_per_round: Annotated[int | None, typer.Option(help="--recipe default: local steps per site and round")] = None,
    codec: str = "raw",
    chunk_bytes: Annotated[int, typer.Option(help="update chunk size agents upload (1 KiB .. 8 MiB)")] = 256 * 1024,
    upload_window: Annotated[int, typer.Option(help="chunks an agent sends before waiting for the broker's "
                                               "acknowledgements")] = 8,
    downlink_codec: Annotated[str | None, typer.Option(help="how each new model reaches the boxes: xor|zstd (exact: "
                                                       "whole, or an XOR delta per box on request) or a delta "
                                                       "pipeline, e.g. 'delta|topk:0.05|ef|q:4|zstd' (each version "
                                                       "is the compressed step from its parent, broadcast once) or "
                                                       "auto (exact with a lossless --codec, else the step codec "
                                                       "delta|topk:0.1|q:8|ef|zstd); default: the profile's "
                                                       "compression.downlink, else auto")] = None,
    seed: int = 0,
    fleet: str = "default",
    rollout: Annotated[str, typer.Option(help="auto: every new model is served by all agents; manual: new models "
                                         "are candidates, served after `fedscan model approve` + `rollout start`")
                       ] = "auto",
    mode: Annotated[str, typer.Option(help="sync: every round waits for its own updates; async: MIN_CLIENTS updates "
                                      "close a round and late ones count in a later round, down-weighted")] = "sync",
    max_staleness: Annotated[int, typer.Option(help="async: how many rounds old an update may be")] = 4,
    select_metric: Annotated[str, typer.Option(help="auto rollout serves the round model best on the validation "
                                               "split by: auc | balanced_accuracy | accuracy | loss; 'latest': "
                                               "every round's model")] = "auc",
    store_url: str | None = None,
    threads: int | None = None,
    exit_when_done: Annotated[bool, typer.Option(help="exit after the last round instead of serving on")] = False,
    http_port: Annotated[int | None, typer.Option(help="serve the fleet dashboard and /metrics on this port")] = None,
    export: Annotated[bool, typer.Option(help="export each model to verified ONNX FP32/INT8 (+TensorRT) artifacts")
                      ] = True,
    tls_ca: Annotated[Path | None, typer.Option(help="fleet CA certificate (mTLS to the broker)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="this process's certificate (CN = client id)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="this process's private key")] = None,
    insecure_plaintext_mqtt: Annotated[bool, typer.Option(
        "--insecure-plaintext-mqtt", help="allow plain MQTT to a non-loopback broker (FEDSCAN_ENV=development only)")
    ] = False,
    job: Annotated[str, typer.Option(help="what the federation trains: classify | segment | oneshot | anomaly "
                                     "(docs/jobs.md)")] = "classify",
    job_option: Annotated[list[str] | None, typer.Option(help="a job's own option KEY=VALUE (repeat), e.g. "
                                                         "share=fedbn for segment")] = None,
    verbose: bool = False,
) -> None:
    """Run federated rounds until ROUNDS are complete (resumes after a restart), then keep serving models and fleet state until stopped."""
    _logging(verbose)
    if rollout not in ("auto", "manual"):
        typer.echo(f"error: --rollout must be auto or manual, not {rollout!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if not (1024 <= chunk_bytes <= 8 * 1024 * 1024) or not (1 <= upload_window <= 1024):
        typer.echo("error: --chunk-bytes must be 1024..8388608 and --upload-window 1..1024", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if mode not in ("sync", "async") or max_staleness < 0:
        typer.echo(f"error: --mode must be sync or async (not {mode!r}) and --max-staleness >= 0", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if job not in tuple(Job):
        typer.echo(f"error: --job must be one of {', '.join(Job)}, not {job!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    options = dict(o.split("=", 1) for o in (job_option or []) if "=" in o)
    if len(options) != len(job_option or []):
        typer.echo("error: --job-option takes KEY=VALUE", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if select_metric not in ("latest", "auc", "balanced_accuracy", "accuracy", "loss"):
        typer.echo(f"error: --select-metric must be latest, auc, balanced_accuracy, accuracy or loss, "
                   f"not {select_metric!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    recipe_args: dict[str, float] = {}
    if recipe == "default":
        training = default_training(rounds, steps_per_round or STEPS_PER_ROUND, seed=seed)
        strategy = strategy or RECIPE_STRATEGY
        recipe_args = strategy_args_for(strategy)  # the recipe's server momentum, with its FedAvgM
    elif recipe == "flags" and steps_per_round is None:
        training = TrainingConfig(local_epochs=local_epochs, batch_size=batch_size, lr=lr, prox_mu=prox_mu,
                                  max_steps=max_steps, loss=loss)
    else:
        typer.echo(f"error: --recipe must be flags or default (not {recipe!r}); --steps-per-round goes with "
                   "--recipe default", err=True)
        raise typer.Exit(EXIT_CONFIG)
    strategy = strategy or "fedavg"
    prof = _profile(profile)
    classify = prof.job not in _OWN_DATA_JOBS and job not in _OWN_DATA_JOBS
    if (advice := local_work_warning(strategy, training)) is not None:
        typer.echo(f"warning: {advice}", err=True)
    strategy_args = {**recipe_args, **strategy_options(strategy, max_weight_ratio=max_weight_ratio or None)}
    try:  # an impossible strategy / round size is refused here, not in the middle of a round
        check_round_size(build_strategy(strategy, **strategy_args), min_clients)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    from fedscan.compose import CoordinatorConfig, run_coordinator  # torch: deferred (tests/test_architecture.py)

    cfg = CoordinatorConfig(
        state_dir=state, broker=broker, profile=prof, val_data=val_data, rounds=rounds, val_indices=val_indices,
        val_source=data_source_option(val_data, val_data_format, val_labels_csv, val_label_field) if classify else None,
        select_metric=None if select_metric == "latest" else f"val_{select_metric}",
        min_clients=min_clients, deadline_s=deadline, strategy=strategy, strategy_args=strategy_args, rollout=rollout,
        training=training,
        codec=codec, downlink_codec=downlink_codec, chunk_bytes=chunk_bytes, window=upload_window, seed=seed,
        fleet=fleet, store_url=store_url, threads=threads, mode=mode, max_staleness=max_staleness,
        exit_when_done=exit_when_done, http_port=http_port, export=export, tls=_tls(tls_ca, tls_cert, tls_key),
        insecure_plaintext_mqtt=_plaintext_allowed(insecure_plaintext_mqtt), job=job, job_options=options,
    )
    _run(lambda: run_coordinator(cfg))


@app.command()
def agent(
    id: Annotated[str, typer.Option("--id", help="agent id = MQTT client id")],
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP, is_eager=True, callback=_config)] = None,
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "127.0.0.1:1883",
    profile: Annotated[str, typer.Option()] = "xray-cxr-28",
    state: Annotated[Path, typer.Option()] = Path("agent-state"),
    data: Annotated[Path | None, typer.Option(help="MedMNIST npz (train split = this site's images), a folder of "
                                              "PNG/JPEG/DICOM with --labels-csv or --label-field, a DICOM folder "
                                              "(--data-format dicom); a segment profile: a PH2 or brain-mri-flair "
                                              "folder; an anomaly profile: a MedMNIST npz (its normal images) or a "
                                              "brain-mri-flair folder")] = None,
    data_format: Annotated[str, typer.Option(help=DATA_FORMAT_HELP)] = "auto",
    labels_csv: Annotated[Path | None, typer.Option(help="CSV filename,label (paths under --data)")] = None,
    label_field: Annotated[str | None, typer.Option(help="dotted field of each image's same-stem JSON holding the "
                                                    "label, e.g. meta.clinical.benign_malignant")] = None,
    skip_unlabelled: Annotated[bool, typer.Option(help="leave out (and log) unlabelled images")] = False,
    indices: Annotated[Path | None, typer.Option(help=".npy positions or .txt image ids (fedscan partition) into "
                                                 "--data (segment and anomaly: into the sorted PH2 images / MRI subjects)")] = None,
    threads: int | None = None,
    fleet: str = "default",
    trust: Annotated[Path | None, typer.Option(help="trusted model-signing keys (the coordinator's keys/trust.json); "
                                               "required: every model and rollback order is verified against it")] = None,
    insecure_unsigned_models: Annotated[bool, typer.Option(
        "--insecure-unsigned-models", help="run without a trust store, nothing verified (FEDSCAN_ENV=development only)")
    ] = False,
    http_port: Annotated[int | None, typer.Option(help="diagnosis API port (tokens: FEDSCAN_API_TOKENS)")] = None,
    http_host: Annotated[str, typer.Option(envvar="FEDSCAN_HTTP_HOST",
                                           help="bind address of the diagnosis API (default loopback)")] = "127.0.0.1",
    dicom_port: Annotated[int | None, typer.Option(help="DICOM C-STORE listener port")] = None,
    dicom_host: Annotated[str, typer.Option(envvar="FEDSCAN_DICOM_HOST", help="bind address of the DICOM listener "
                                            "(the scanners' network interface; default loopback)")] = "127.0.0.1",
    dicom_aet: Annotated[list[str] | None, typer.Option(help="calling AE title allowed to store (repeat)")] = None,
    telemetry: bool = True,
    proxy: Annotated[str | None, typer.Option(help="reach the broker through this HTTP CONNECT proxy: http://HOST:PORT")
                     ] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="fleet CA certificate (mTLS to the broker)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="this process's certificate (CN = client id)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="this process's private key")] = None,
    resource_gates: Annotated[bool, typer.Option(help="--no-resource-gates when several simulated agents share "
                                                 "one machine (inference still pauses training)")] = True,
    insecure_plaintext_mqtt: Annotated[bool, typer.Option(
        "--insecure-plaintext-mqtt", help="allow plain MQTT to a non-loopback broker (FEDSCAN_ENV=development only)")
    ] = False,
    verbose: bool = False,
) -> None:
    """Run an edge agent: train on local images, upload updates, install models, serve diagnoses."""
    _logging(verbose)  # before fedscan.compose: opacus configures the root logger on import
    from fedscan.compose import AgentConfig, run_agent  # torch: deferred (tests/test_architecture.py)

    prof = _profile(profile)
    source = (data_source_option(data, data_format, labels_csv, label_field, skip_unlabelled)
              if prof.job not in _OWN_DATA_JOBS else None)
    cfg = AgentConfig(agent_id=id, broker=broker, profile=prof, state_dir=state, data=data, source=source,
                      indices=indices, threads=threads, fleet=fleet, trust=trust,
                      insecure_unsigned_models=insecure_unsigned_models, http_port=http_port,
                      http_host=http_host, dicom_port=dicom_port, dicom_host=dicom_host,
                      dicom_aets=tuple(dicom_aet or ()), telemetry=telemetry, resource_gates=resource_gates, proxy=proxy,
                      tls=_tls(tls_ca, tls_cert, tls_key),
                      insecure_plaintext_mqtt=_plaintext_allowed(insecure_plaintext_mqtt))
    _run(lambda: run_agent(cfg))


@app.command()
def demo(
    out: Path = Path("demo-out"),
    data: Annotated[str | None, typer.Option(help="MedMNIST-format npz (default: ../shared/data/pneumoniamnist.npz)")
                    ] = None,
    profile: str = "xray-cxr-28",
    task: Annotated[str, typer.Option(help="classify: PneumoniaMNIST sites; melanoma: ISIC sites by device, then a "
                                      "PH2 clinic with no labels diagnoses a folder via the API")] = "classify",
    agents: int = 4,
    rounds: Annotated[int | None, typer.Option(help="default 12 (classify), learning.recipe.ROUNDS (melanoma)")] = None,
    steps: Annotated[int | None, typer.Option(help="melanoma: local steps per site and round")] = None,
    baselines: Annotated[bool, typer.Option(help="melanoma: also centralized and each site alone")] = False,
    local_epochs: int = 1,
    alpha: float = 0.5,
    seed: int = 0,
    strategy: str = "fedavg",
    codec: str = "raw",
    downlink_codec: Annotated[str | None, typer.Option(help="see `fedscan coordinator --help`")] = None,
    broker: Annotated[str, typer.Option(help="auto | mosquitto | embedded")] = "auto",
    verbose: bool = False,
) -> None:
    """Broker + coordinator + N agents as processes, R rounds, baselines, report and plot."""
    _logging(verbose)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    if task == "melanoma":
        from fedscan.melanoma_demo import MelanomaDemoConfig, run_melanoma_demo  # torch: deferred

        mcfg = MelanomaDemoConfig(out=out / "melanoma" if out == Path("demo-out") else out, rounds=rounds or ROUNDS,
                                  steps=steps or STEPS_PER_ROUND, seed=seed, broker=broker, baselines=baselines)
        _run(lambda: run_melanoma_demo(mcfg))
        return
    if task != "classify":
        typer.echo(f"error: --task must be classify or melanoma, not {task!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    from fedscan.demo import DemoConfig, run_demo  # torch: deferred (tests/test_architecture.py)

    cfg = DemoConfig(out=out, data=data, profile=profile, agents=agents, rounds=rounds or 12, local_epochs=local_epochs,
                     alpha=alpha, seed=seed, strategy=strategy, codec=codec, downlink_codec=downlink_codec,
                     broker=broker)
    _run(lambda: run_demo(cfg))


def _tls(ca: Path | None, cert: Path | None, key: Path | None):  # type: ignore[no-untyped-def]

    try:
        return TlsConfig.from_paths(ca, cert, key)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def _plaintext_allowed(flag: bool) -> bool:
    """``--insecure-plaintext-mqtt``, refused (exit 2) outside ``FEDSCAN_ENV=development``."""
    if flag and os.environ.get("FEDSCAN_ENV", "production") != "development":
        typer.echo("error: --insecure-plaintext-mqtt is refused outside FEDSCAN_ENV=development", err=True)
        raise typer.Exit(EXIT_CONFIG)
    return flag


def _run(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except TransportError as exc:  # unreachable broker: 3; a transport that cannot be set up as asked: 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG if exc.reason in (Reason.BAD_CONFIG, Reason.PLAINTEXT_REFUSED) else EXIT_BROKER
                         ) from exc
    except (ValueError, ProfileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


register(app)  # the fleet commands (fedscan/fleet_cli.py)
register_data(app)  # partition, diagnose-folder (fedscan/data_cli.py)
register_network(app)  # broker, ws-bridge (fedscan/network_cli.py)


def main() -> None:
    """Run the command line (the ``fedscan`` entry point)."""
    app()


if __name__ == "__main__":
    main()


#: The commands a ``--config`` file can configure (its keys: their parameters).
CONFIGURABLE: dict[str, Callable[..., Any]] = {"coordinator": cast(Callable[..., Any], coordinator),
                                               "agent": cast(Callable[..., Any], agent)}
