"""``fedscan demo``: a broker, a coordinator and N agents as separate processes, R rounds on real data split non-IID, then the same training centralized and per site alone; a table, a PNG plot and ``demo-report.json``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.model_repo import ModelRepository
from coordinator.model_spec import model_spec_for
from coordinator.store import open_store
from fedscan import experiments
from fedscan.broker import local_broker, stop_processes
from firmware.profile import find_profile
from learning.data_path import find_data_file, warn_generated
from learning.datasets import ArrayDataset, load_medmnist, make_synthetic
from learning.partition import dirichlet_label_skew
from protocol.messages import TrainingConfig

log = logging.getLogger("fedscan.demo")
console = Console()


@dataclass
class DemoConfig:
    """The settings of ``fedscan demo``."""
    out: Path = Path("demo-out")
    data: str | None = None
    profile: str = "xray-cxr-28"
    agents: int = 4
    rounds: int = 12
    local_epochs: int = 1
    alpha: float = 0.5
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.003
    loss: str = "balanced_ce"
    strategy: str = "fedavg"
    codec: str = "raw"
    downlink_codec: str | None = None  # None: the profile's compression.downlink
    broker: str = "auto"
    timeout_s: float = 900.0


def _load(cfg: DemoConfig) -> tuple[dict[str, ArrayDataset], Path]:
    """Splits and the npz path the agent processes read (generated data is written to one)."""
    path = find_data_file(cfg.data) if cfg.data else find_data_file("pneumoniamnist.npz")
    if path is None:
        warn_generated("the demo")
        path = cfg.out / "generated.npz"
        sets = {s: make_synthetic(n, seed=cfg.seed + i) for i, (s, n) in enumerate((("train", 2000), ("val", 400),
                                                                                     ("test", 400)))}
        arrays = {f"{s}_images": d.images for s, d in sets.items()}
        arrays.update({f"{s}_labels": d.labels[:, None] for s, d in sets.items()})
        np.savez(path, **arrays)  # type: ignore[arg-type]
    return {s: load_medmnist(path, s) for s in ("train", "val", "test")}, path


def _spawn(args: list[str], log_path: Path, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedscan", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end and return its report (also written to ``cfg.out``)."""
    t_start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    profile = find_profile(cfg.profile)
    spec = model_spec_for(profile)
    splits, data_path = _load(cfg)
    train = splits["train"]
    parts = dirichlet_label_skew(train.labels, cfg.agents, cfg.alpha, seed=cfg.seed)
    sites = [f"site-{i + 1}" for i in range(cfg.agents)]
    training = TrainingConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, loss=cfg.loss)
    console.print(f"[bold]fedscan demo[/]: {len(sites)} sites, {cfg.rounds} rounds, {cfg.local_epochs} local epoch(s), "
                  f"Dirichlet α={cfg.alpha}, data {data_path}")
    for name, idx in zip(sites, parts, strict=True):
        counts = np.bincount(train.labels[idx], minlength=train.num_classes)
        console.print(f"  {name}: {len(idx)} images, per class {dict(zip(train.classes, counts.tolist(), strict=True))}")

    coord_dir = cfg.out / "coordinator"
    if coord_dir.exists():
        import shutil

        shutil.rmtree(coord_dir)
    coord_dir.mkdir(parents=True)
    store = open_store(f"sqlite:///{coord_dir / 'state.db'}")
    ensure_signing_key(coord_dir)  # models are signed with it; every agent verifies against keys/trust.json
    for name, idx in zip(sites, parts, strict=True):
        site_dir = cfg.out / "sites" / name
        if site_dir.exists():
            import shutil

            shutil.rmtree(site_dir)
        site_dir.mkdir(parents=True)
        np.save(site_dir / "indices.npy", idx)
        store.enroll_agent(name, profile.name, ["demo"])

    threads = 1  # one torch thread per process: 2 threads in one process ran 5x slower here
    procs: list[subprocess.Popen[bytes]] = []
    with local_broker(cfg.out / "broker", prefer=cfg.broker) as broker:
        console.print(f"  broker: {broker.kind} on 127.0.0.1:{broker.port}")
        addr = f"127.0.0.1:{broker.port}"
        coord = _spawn(["coordinator", "--state", str(coord_dir), "--broker", addr, "--profile", cfg.profile,
                        "--val-data", str(data_path), "--rounds", str(cfg.rounds), "--min-clients", str(cfg.agents),
                        "--local-epochs", str(cfg.local_epochs), "--batch-size", str(cfg.batch_size),
                        "--lr", str(cfg.lr), "--loss", cfg.loss, "--strategy", cfg.strategy, "--codec", cfg.codec,
                        "--seed", str(cfg.seed), "--threads", "1",
                        *(["--downlink-codec", cfg.downlink_codec] if cfg.downlink_codec else [])],
                       coord_dir / "coordinator.log", 1)
        procs.append(coord)
        for name in sites:
            site_dir = cfg.out / "sites" / name
            procs.append(_spawn(["agent", "--id", name, "--broker", addr, "--profile", cfg.profile,
                                 "--state", str(site_dir / "state"), "--data", str(data_path),
                                 "--indices", str(site_dir / "indices.npy"), "--threads", str(threads),
                                 "--no-resource-gates", "--trust", str(trust_path(coord_dir))],
                                site_dir / "agent.log", threads))
        try:
            _follow(store, coord, cfg)
        finally:
            stop_processes(procs)
    if coord.returncode not in (0, None):
        raise RuntimeError(f"coordinator exited with {coord.returncode}; see {coord_dir / 'coordinator.log'}")
    fed_seconds = time.perf_counter() - t_start

    repo = ModelRepository(coord_dir / "models")
    last = store.latest_round()
    rounds_done = [r for r in (store.get_round(i) for i in range(1, (last.round_id if last else 0) + 1))
                   if r is not None and r.status == "complete"]
    fed_curve = [experiments.split_metrics(spec, repo.tensors(r.result_version or ""), splits["test"])
                 for r in rounds_done]
    traffic = [(r.detail or {}).get("traffic", {}) for r in rounds_done]
    store.close()

    console.print("[bold]baselines[/] (same local epochs): centralized and single-site …")
    central, singles = experiments.baselines_parallel(spec, train, parts, splits["test"], rounds=cfg.rounds,
                                                      training=training, seed=cfg.seed)
    local_mean = experiments.mean_curve(singles)
    n_params = sum(int(np.prod(t.shape)) for t in repo.tensors("v0").values())
    report = _report(cfg, sites, fed_curve, central, singles, local_mean, traffic, n_params,
                     time.perf_counter() - t_start, fed_seconds)
    (cfg.out / "demo-report.json").write_text(json.dumps(report, indent=2))
    _plot(cfg.out / "accuracy.png", fed_curve, central, singles, local_mean)
    _print_table(report)
    console.print(f"report: {cfg.out / 'demo-report.json'}   plot: {cfg.out / 'accuracy.png'}")
    return report


def _follow(store: Any, coord: subprocess.Popen[bytes], cfg: DemoConfig) -> None:
    """Print each round as it completes.

    Return once all rounds are done and every agent reports serving the model it is told to serve
    (or 60 s after the last round).
    """
    deadline = time.monotonic() + cfg.timeout_s
    shown = complete = 0
    done_at: float | None = None
    while True:
        if coord.poll() is not None:
            raise RuntimeError(f"coordinator exited early with {coord.returncode}")
        if complete >= cfg.rounds:
            done_at = done_at or time.monotonic()
            # served: the best validated model (--select-metric), recorded active before its round completes
            served = store.latest_model(state="active")
            if (served is not None and all(a.reported_version == a.desired_version == served.version
                                           for a in store.list_agents())) or time.monotonic() - done_at > 60:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo did not finish in {cfg.timeout_s:.0f}s")
        latest = store.latest_round()
        if latest is not None:
            for rid in range(shown + 1, latest.round_id + 1):
                r = store.get_round(rid)
                if r is None or r.status not in ("complete", "failed"):
                    break
                m = (r.detail or {}).get("metrics", {})
                updates = store.list_updates(rid)
                console.print(f"  round {rid}/{cfg.rounds} {r.status}: {len(updates)} updates, "
                              f"val acc {m.get('val_accuracy', float('nan')):.3f}, "
                              f"balanced {m.get('val_balanced_accuracy', float('nan')):.3f}")
                shown = rid
                complete += r.status == "complete"
        time.sleep(1.0)


def _report(cfg: DemoConfig, sites: list[str], fed: list[dict[str, float]], central: experiments.ArmResult,
            singles: list[experiments.ArmResult], local_mean: list[dict[str, float]], traffic: list[dict[str, int]],
            n_params: int, seconds: float, fed_seconds: float) -> dict[str, Any]:
    def by(metric: str) -> dict[str, Any]:
        return {
            "federated": fed[-1][metric] if fed else None,
            "centralized": central.final[metric],
            "local_mean": local_mean[-1][metric],
            "per_site": {a.name: a.final[metric] for a in singles},
            "federated_per_round": [r[metric] for r in fed],
            "centralized_per_round": [r[metric] for r in central.per_round],
            "local_mean_per_round": [r[metric] for r in local_mean],
        }

    rx = [t.get("rx_bytes", 0) for t in traffic]
    tx = [t.get("tx_bytes", 0) for t in traffic]
    return {
        "rounds": len(fed),
        "sites": sites,
        "accuracy": by("accuracy"),
        "balanced_accuracy": by("balanced_accuracy"),
        "auc": by("auc"),
        "bytes": {
            "uplink": rx[-1] if rx else 0,
            "downlink": tx[-1] if tx else 0,
            "uplink_per_round": [b - a for a, b in zip([0, *rx[:-1]], rx, strict=True)],
            "downlink_per_round": [b - a for a, b in zip([0, *tx[:-1]], tx, strict=True)],
            "float32_update": 4 * n_params,
            "parameters": n_params,
        },
        "seconds": round(seconds, 1),
        "seconds_federated": round(fed_seconds, 1),
        "config": {k: str(v) for k, v in vars(cfg).items()},
    }


def _print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"Test split after {report['rounds']} rounds")
    table.add_column("arm")
    for m in ("accuracy", "balanced_accuracy", "auc"):
        table.add_column(m)
    for arm in ("federated", "centralized", "local_mean"):
        table.add_row(arm, *(f"{report[m][arm]:.3f}" if report[m][arm] is not None else "-"
                             for m in ("accuracy", "balanced_accuracy", "auc")))
    for site in report["sites"]:
        table.add_row(f"  {site} alone", *(f"{report[m]['per_site'][site]:.3f}"
                                           for m in ("accuracy", "balanced_accuracy", "auc")))
    console.print(table)
    b = report["bytes"]
    console.print(f"traffic at the coordinator: uplink {b['uplink']:,} B, downlink {b['downlink']:,} B "
                  f"(float32 update {b['float32_update']:,} B; per round up {b['uplink_per_round']})")
    console.print(f"time: {report['seconds']} s in all, {report['seconds_federated']} s for the federated run")


def _plot(path: Path, fed: list[dict[str, float]], central: experiments.ArmResult,
          singles: list[experiments.ArmResult], local_mean: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "balanced_accuracy"), strict=True):
        x = range(1, len(central.per_round) + 1)
        for arm in singles:
            ax.plot(x, [r[metric] for r in arm.per_round], color="0.75", lw=1)
        ax.plot(x, [r[metric] for r in local_mean], "--", color="0.4", label="single-site mean")
        ax.plot(x, [r[metric] for r in central.per_round], "-s", label="centralized")
        ax.plot(range(1, len(fed) + 1), [r[metric] for r in fed], "-o", label="federated")
        ax.set_xlabel("round (= local epochs so far)")
        ax.set_ylabel(f"test {metric.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("fedscan demo: federated vs centralized vs single-site")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
