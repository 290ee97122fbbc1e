"""``fedscan fleet|model|rollout|keys``: fleet management from the command line.

These commands talk to the coordinator's state store directly (same ``--state`` folder or
``--store-url`` as the coordinator); the running coordinator's rollout driver picks changes up
from the store within a second. Output is a table (rich) or, with ``--json``, one JSON document.
A refused command prints ``error: [reason] message`` (or ``{"error": ..., "reason": ...}``) and
exits with code 1; the store is unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.keys import ensure_signing_key, load_trust, rotate, trust_path
from coordinator.lifecycle import LifecycleError, transition
from coordinator.presence import agent_presence
from coordinator.rollout import GateConfig, RolloutController, RolloutError, stage_agents
from coordinator.states import AgentPresence
from coordinator.store import Store, open_store

EXIT_REFUSED = 1

StateOpt = Annotated[Path, typer.Option("--state", help="coordinator state folder")]
StoreOpt = Annotated[str | None, typer.Option("--store-url", help="database URL (default: SQLite in --state)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]

fleet_app = typer.Typer(no_args_is_help=True, help="enrolled agents: profile, tags, presence, versions")
model_app = typer.Typer(no_args_is_help=True, help="model registry and lifecycle")
rollout_app = typer.Typer(no_args_is_help=True, help="staged rollouts with health gates")
keys_app = typer.Typer(no_args_is_help=True, help="model-signing keys (Ed25519)")


def register(app: typer.Typer) -> None:
    """Add the fleet commands (``fleet``, ``model``, ``rollout``, ``keys``) to ``app``."""
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(model_app, name="model")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(keys_app, name="keys")


@contextmanager
def _store(state: Path, store_url: str | None) -> Iterator[Store]:
    if store_url is None and not (state / "state.db").exists():
        _fail(f"no coordinator state in {state} (use --state or --store-url)", "no_state", False)
    s = open_store(store_url or f"sqlite:///{state / 'state.db'}")
    try:
        yield s
    finally:
        s.close()


def _fail(message: str, reason: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"error": message, "reason": reason}))
    else:
        typer.echo(f"error: [{reason}] {message}", err=True)
    raise typer.Exit(EXIT_REFUSED)


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _table(title: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    Console().print(t)


# ---------------------------------------------------------------------------------- fleet
@fleet_app.command("ls")
def fleet_ls(state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Enrolled agents: profile, tags, online, last seen, desired and reported model version."""
    with _store(state, store_url) as store:
        agents = store.list_agents()
    now = time.time()  # presence as the dashboard shows it (coordinator.presence): one answer
    presence = {a.agent_id: agent_presence(a, now) for a in agents}
    if as_json:
        typer.echo(json.dumps([{**asdict(a), "online": presence[a.agent_id] is AgentPresence.ONLINE,
                                "presence": presence[a.agent_id].value} for a in agents], indent=1))
        return
    _table(f"fleet ({len(agents)} agents)", ["agent", "profile", "tags", "online", "last seen", "desired", "reported"],
           [[a.agent_id, a.profile, ",".join(a.tags), presence[a.agent_id].value, _ago(a.last_seen),
             a.desired_version, a.reported_version + ("" if a.reported_version == a.desired_version else " *")
             if a.reported_version else None] for a in agents])


# ---------------------------------------------------------------------------------- models
@model_app.command("ls")
def model_ls(state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Model versions: parent, lifecycle state, metrics, signing key, agents serving it."""
    with _store(state, store_url) as store:
        models = store.list_models()
        serving: dict[str, int] = {}
        for a in store.list_agents():
            if a.reported_version:
                serving[a.reported_version] = serving.get(a.reported_version, 0) + 1
    if as_json:
        typer.echo(json.dumps([{"version": m.version, "parent": m.parent, "round_id": m.round_id, "state": m.state,
                                "metrics": m.manifest.get("metrics", {}),
                                "tensor_hash": m.manifest.get("tensor_hash"),
                                "key_id": (m.manifest.get("signature") or {}).get("key_id"),
                                "serving": serving.get(m.version, 0), "created_at": m.created_at} for m in models],
                              indent=1))
        return
    _table("models", ["version", "parent", "state", "metrics", "signed by", "serving", "created"],
           [[m.version, m.parent, m.state,
             " ".join(f"{k}={v:.3f}" for k, v in sorted(m.manifest.get("metrics", {}).items())),
             (m.manifest.get("signature") or {}).get("key_id", "unsigned"), serving.get(m.version, 0),
             _ago(m.created_at)] for m in models])


def _lifecycle(version: str, target: str, state: Path, store_url: str | None, as_json: bool) -> None:
    with _store(state, store_url) as store:
        try:
            rec = transition(store, version, target)
        except LifecycleError as exc:
            _fail(str(exc.args[0]), exc.reason, as_json)
            return
    typer.echo(json.dumps({"version": rec.version, "state": rec.state}) if as_json
               else f"model {rec.version} is now {rec.state}")


@model_app.command("approve")
def model_approve(version: str, state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None,
                  as_json: JsonOpt = False) -> None:
    """A person approves a candidate model for rollout (candidate → approved)."""
    _lifecycle(version, "approved", state, store_url, as_json)


@model_app.command("retire")
def model_retire(version: str, state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Retire a model: it can no longer be rolled out."""
    _lifecycle(version, "retired", state, store_url, as_json)


# ---------------------------------------------------------------------------------- rollouts
def _rollout_json(r: Any) -> dict[str, Any]:
    d = asdict(r)
    d["stage_agents"] = stage_agents(r)
    return d


def _print_rollout(store: Store, r: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_rollout_json(r), indent=1))
        return
    agents = {a.agent_id: a for a in store.list_agents()}
    reached = set(stage_agents(r))
    typer.echo(f"rollout {r.rollout_id}: {r.version} {r.state}  stage {r.stage + 1}/{len(r.stages)} "
               f"(agents per stage {r.stages}, percents {r.config.get('percents')})  cohort {r.cohort}"
               + (f"  reason {r.reason} {r.detail or ''}" if r.reason else ""))
    _table("agents", ["#", "agent", "in stage", "previous", "desired", "reported"],
           [[i + 1, a, "yes" if a in reached else "", r.previous.get(a),
             agents[a].desired_version if a in agents else "(removed)",
             agents[a].reported_version if a in agents else None] for i, a in enumerate(r.agents)])


def _controller(store: Store, state: Path | None = None) -> Any:
    return RolloutController(store, trust=load_trust(state) if state is not None else None)


@rollout_app.command("start")
def rollout_start(
    version: str,
    cohort_tags: Annotated[str, typer.Option(help="comma-separated tags every cohort agent must carry")] = "",
    profile: Annotated[str | None, typer.Option(help="firmware profile of the cohort (default: any)")] = None,
    stages: Annotated[str, typer.Option(help="cumulative percentages, last must be 100")] = "5,25,100",
    soak: Annotated[float, typer.Option(help="seconds a stage must stay healthy before the next")] = 30.0,
    stage_timeout: Annotated[float, typer.Option(help="seconds for a stage's agents to install")] = 600.0,
    max_error_rate: Annotated[float | None, typer.Option(help="gate on agents' reported error_rate")] = 0.05,
    max_p95_ms: Annotated[float | None, typer.Option(help="gate on agents' reported p95_ms")] = None,
    accuracy_margin: Annotated[float, typer.Option(help="allowed val_accuracy drop vs the active model")] = 0.02,
    state: StateOpt = Path("fedscan-state"),
    store_url: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of an approved model to a cohort (signature checked against keys/trust.json)."""
    try:
        percents = [float(p) for p in stages.split(",") if p.strip()]
    except ValueError:
        _fail(f"--stages must be comma-separated numbers, got {stages!r}", "bad_stages", as_json)
        return
    with _store(state, store_url) as store:
        try:
            gates = GateConfig(soak_s=soak, stage_timeout_s=stage_timeout, max_error_rate=max_error_rate,
                               max_p95_ms=max_p95_ms, accuracy_margin=accuracy_margin)
            r = _controller(store, state).start(version, profile=profile,
                                                tags=[t for t in cohort_tags.split(",") if t],
                                                stages=percents, gates=gates)
        except RolloutError as exc:
            _fail(str(exc.args[0]), exc.reason, as_json)
            return
        _print_rollout(store, r, as_json)


@rollout_app.command("status")
def rollout_status(rollout_id: Annotated[int | None, typer.Argument(help="default: the open or latest one")] = None,
                   state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None, as_json: JsonOpt = False,
                   all_: Annotated[bool, typer.Option("--all", help="list every rollout")] = False) -> None:
    """Where a rollout is: stage, agents reached, desired vs reported versions."""
    with _store(state, store_url) as store:
        if all_:
            rs = store.list_rollouts()
            if as_json:
                typer.echo(json.dumps([_rollout_json(r) for r in rs], indent=1))
            else:
                _table("rollouts", ["id", "version", "state", "stage", "agents", "reason", "started"],
                       [[r.rollout_id, r.version, r.state, f"{r.stage + 1}/{len(r.stages)}", len(r.agents), r.reason,
                         _ago(r.created_at)] for r in rs])
            return
        try:
            r = _controller(store).get(rollout_id)
        except RolloutError as exc:
            _fail(str(exc.args[0]), exc.reason, as_json)
            return
        _print_rollout(store, r, as_json)


def _command(name: str, rollout_id: int | None, state: Path, store_url: str | None, as_json: bool) -> None:
    with _store(state, store_url) as store:
        c = _controller(store)
        try:
            r = getattr(c, name)(rollout_id)
        except RolloutError as exc:
            _fail(str(exc.args[0]), exc.reason, as_json)
            return
        _print_rollout(store, r, as_json)


RolloutArg = Annotated[int | None, typer.Argument(help="default: the open rollout")]


@rollout_app.command("pause")
def rollout_pause(rollout_id: RolloutArg = None, state: StateOpt = Path("fedscan-state"), store_url: StoreOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Hold a running rollout at its stage (agents keep what they were given)."""
    _command("pause", rollout_id, state, store_url, as_json)


@rollout_app.command("resume")
def rollout_resume(rollout_id: RolloutArg = None, state: StateOpt = Path("fedscan-state"),
                   store_url: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Continue a paused rollout (the stage's gates and soak start over)."""
    _command("resume", rollout_id, state, store_url, as_json)


@rollout_app.command("rollback")
def rollout_rollback(rollout_id: RolloutArg = None, state: StateOpt = Path("fedscan-state"),
                     store_url: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Return every agent the rollout reached to the version it had before; the model goes back to approved."""
    _command("rollback", rollout_id, state, store_url, as_json)


# ---------------------------------------------------------------------------------- keys
@keys_app.command("ls")
def keys_ls(state: StateOpt = Path("fedscan-state"), as_json: JsonOpt = False) -> None:
    """The current signing key and the trust store agents should hold."""
    current = ensure_signing_key(state).key_id
    trust = load_trust(state)
    if as_json:
        typer.echo(json.dumps({"current": current, "trusted": sorted(trust.keys), "retired": sorted(trust.retired),
                               "trust_file": str(trust_path(state))}))
        return
    _table(f"signing keys ({trust_path(state)})", ["key id", "status"],
           [[k, "current" if k == current else "trusted"] for k in sorted(trust.keys)]
           + [[k, "retired"] for k in sorted(trust.retired)])


@keys_app.command("rotate")
def keys_rotate(state: StateOpt = Path("fedscan-state"),
                retire_old: Annotated[bool, typer.Option(help="stop trusting the old key at once")] = False,
                as_json: JsonOpt = False) -> None:
    """New signing key, announced signed by the old one.

    Restart the coordinator to sign with it, and provision the updated keys/trust.json to the agents.
    """
    ann = rotate(state, retire_old=retire_old)
    if as_json:
        typer.echo(ann.model_dump_json())
    else:
        typer.echo(f"new signing key {ann.key_id} (announced by {ann.signed_by}"
                   + (f", retired {', '.join(ann.retires)})" if ann.retires else ")"))
