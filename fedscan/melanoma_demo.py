"""``fedscan demo --task melanoma``: device sites train over the broker, then a label-less clinic diagnoses.

Dermoscopy sites split by device run rounds over the broker; then a clinic with no labels
diagnoses a folder through the API.

1. ISIC UDA-1 (``../shared/data/isic-uda1``) split as ``bench/melanoma.py`` splits it
   (``learning/isic.py``): the fixed test split (only reported), the coordinator's validation
   split, the rest into sites by acquisition device (original camera resolution). Each site is
   an agent process reading the shared folder through ``--data … --label-field … --indices
   ids.txt``; the coordinator holds ``--val-data`` the same way.
2. A broker (mosquitto, else the embedded one), the coordinator with ``--recipe default`` (the
   step budget, schedule, class-balanced loss and the profile's augmentation) and
   ``--select-metric auc``: the fleet serves the best validated round model.
3. After the last round a new box, ``ph2-clinic``, is enrolled with no images of its own: the
   coordinator's rollout driver hands it the served model; it verifies and installs it and serves
   ``POST /v1/diagnose`` behind a bearer token.
4. ``fedscan diagnose-folder`` logic (``fedscan/diagnose_folder.py``) sends every PH2 image, plus one
   truncated copy to show a refusal, and writes ``ph2-diagnoses.csv``.
5. The report (``melanoma-report.json``): test-split AUC, balanced accuracy and sensitivity at
   90 % specificity of every round's model and of the served one, beside logistic regression on
   the same pixels and the majority-class floor (``--baselines`` adds centralized and each site
   alone under the same budget, in this process, as ``bench/melanoma.py`` does for 3 seeds).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.model_repo import ModelRepository
from coordinator.store import Store, open_store
from fedscan.baselines import (
    ArmSettings,
    Budget,
    centralized_arm,
    logistic_regression_arm,
    majority_floor,
    model_probs,
    report,
    single_site_arm,
)
from fedscan.broker import free_port, local_broker, stop_processes
from fedscan.compose import model_spec_for, spec_normalize
from fedscan.diagnose_folder import run_folder
from firmware.profile import find_profile
from learning import isic, recipe
from learning.augment import build_augment
from learning.data_path import find_data_file

console = Console()
PROFILE = "dermoscope-melanoma"
CLINIC = "ph2-clinic"
METRICS = ("auc", "balanced_accuracy", "sensitivity_at_90_specificity", "accuracy")


@dataclass
class MelanomaDemoConfig:
    """What ``fedscan demo --task melanoma`` runs."""

    out: Path = Path("demo-out/melanoma")
    rounds: int = recipe.ROUNDS
    steps: int = recipe.STEPS_PER_ROUND
    min_site: int = 40  # images of one device to make it a site (smaller devices join the nearest)
    seed: int = 0
    broker: str = "auto"
    baselines: bool = False
    ph2: Path | None = None  # default: ../shared/data/ph2/images
    timeout_s: float = 3600.0


def _spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedscan", *args], stdout=fh, stderr=subprocess.STDOUT, env=full)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _wait(cond: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a process exited while waiting for {what}: {dead[0]!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def _rounds_done(store: Store, rounds: int, shown: list[int]) -> bool:
    latest = store.latest_round()
    for rid in range(shown[0] + 1, (latest.round_id if latest else 0) + 1):
        r = store.get_round(rid)
        if r is None or r.status not in ("complete", "failed"):
            break
        m = (r.detail or {}).get("metrics", {})
        model = store.get_model(r.result_version) if r.result_version else None
        served = " served" if model is not None and model.state == "active" else ""
        console.print(f"  round {rid}/{rounds} {r.status}: {len(store.list_updates(rid))} updates, "
                      f"val AUC {m.get('val_auc', float('nan')):.3f}{served}")
        shown[0] = rid
    return shown[0] >= rounds


def _batch_folder(ph2: Path, out: Path) -> Path:
    """PH2's images (links, nothing copied) and one truncated copy to show a refused upload."""
    folder = _fresh(out / "ph2-batch")
    images = sorted(ph2.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"{ph2}: no PNG images")
    for p in images:
        (folder / p.name).symlink_to(p.resolve())
    data = images[0].read_bytes()
    (folder / "zz-truncated-upload.png").write_bytes(data[: len(data) // 3])
    return folder


def run_melanoma_demo(cfg: MelanomaDemoConfig) -> dict[str, Any]:
    """Run the scenario; return (and write) the report."""
    t0 = time.perf_counter()
    root = isic.data_root()
    assert root is not None
    ph2 = cfg.ph2 or find_data_file("ph2/images")
    if ph2 is None:
        raise FileNotFoundError("ph2/images not found in the shared data folder (set FEDSCAN_DATA)")
    profile = find_profile(PROFILE)
    spec = model_spec_for(profile)
    size = profile.input.height
    cfg.out.mkdir(parents=True, exist_ok=True)
    splits = isic.load_splits(size, steps=profile.preprocessing)
    train, val, test = splits["train"], splits["val"], splits["test"]
    sites = isic.device_sites(train, min_size=cfg.min_site)
    names = [f"derm-{i + 1}" for i in range(len(sites.parts))]
    console.print(f"[bold]fedscan melanoma demo[/]: ISIC UDA-1 {len(train)} train / {len(val)} val (coordinator) / "
                  f"{len(test)} test (fixed ids, report only); {len(names)} sites by device; {cfg.rounds} rounds x "
                  f"{cfg.steps} steps")
    coord_dir = _fresh(cfg.out / "coordinator")
    (coord_dir / "val.txt").write_text("".join(f"{i}\n" for i in val.ids))
    store = open_store(f"sqlite:///{coord_dir / 'state.db'}")
    ensure_signing_key(coord_dir)
    site_dirs = {}
    for name, device, idx in zip(names, sites.names, sites.parts, strict=True):
        d = site_dirs[name] = _fresh(cfg.out / "sites" / name)
        (d / "ids.txt").write_text("".join(f"{train.ids[i]}\n" for i in idx))
        store.enroll_agent(name, PROFILE, ["melanoma", f"device-{device}"])
        console.print(f"  {name} (device {device}): {len(idx)} images, {int(train.labels[idx].sum())} melanoma")
    data_args = ["--label-field", isic.LABEL_FIELD]
    procs: list[subprocess.Popen[bytes]] = []
    token = secrets.token_hex(16)
    clinic_port = free_port()
    with local_broker(cfg.out / "broker", prefer=cfg.broker) as broker:
        addr = f"127.0.0.1:{broker.port}"
        console.print(f"  broker: {broker.kind} on {addr}")
        try:
            procs.append(_spawn(["coordinator", "--state", str(coord_dir), "--broker", addr, "--profile", PROFILE,
                                 "--val-data", str(root), "--val-label-field", isic.LABEL_FIELD,
                                 "--val-indices", str(coord_dir / "val.txt"), "--rounds", str(cfg.rounds),
                                 "--min-clients", str(len(names)), "--recipe", "default",
                                 "--steps-per-round", str(cfg.steps), "--select-metric", "auc",
                                 "--seed", str(cfg.seed), "--threads", "1"], coord_dir / "coordinator.log"))
            for name in names:
                d = site_dirs[name]
                procs.append(_spawn(["agent", "--id", name, "--broker", addr, "--profile", PROFILE,
                                     "--state", str(d / "state"), "--data", str(root), *data_args,
                                     "--indices", str(d / "ids.txt"), "--threads", "1", "--no-resource-gates",
                                     "--no-telemetry", "--trust", str(trust_path(coord_dir))], d / "agent.log"))
            shown = [0]
            _wait(lambda: _rounds_done(store, cfg.rounds, shown), cfg.timeout_s, "the rounds", procs)
            served = store.latest_model(state="active")
            assert served is not None
            console.print(f"  served model: {served.version} (best validation AUC "
                          f"{served.manifest.get('metrics', {}).get('val_auc', float('nan')):.3f})")
            # a clinic with no labels joins: enrolled, it is handed the served model and installs it
            clinic = _fresh(cfg.out / CLINIC)
            store.enroll_agent(CLINIC, PROFILE, ["melanoma", "no-labels"])
            procs.append(_spawn(["agent", "--id", CLINIC, "--broker", addr, "--profile", PROFILE,
                                 "--state", str(clinic / "state"), "--threads", "1", "--no-resource-gates",
                                 "--no-telemetry", "--trust", str(trust_path(coord_dir)),
                                 "--http-port", str(clinic_port)], clinic / "agent.log",
                                {"FEDSCAN_API_TOKENS": f"clinician:{token}"}))
            url = f"http://127.0.0.1:{clinic_port}"
            _wait(lambda: _ready(url, served.version), 600, f"{CLINIC} to serve {served.version}", procs)
            batch = _batch_folder(ph2, cfg.out)
            csv_path = cfg.out / "ph2-diagnoses.csv"
            summary = run_folder(batch, url, csv_path, token=token, timeout=120)
            console.print(f"  {CLINIC}: {summary.answered} PH2 images diagnosed, {summary.refused} refused "
                          f"(the truncated upload), {summary.failed} unreachable -> {csv_path}")
        finally:
            stop_processes(procs)
    repo = ModelRepository(coord_dir / "models")
    norm = spec_normalize(spec)
    rounds = [r for r in (store.get_round(i) for i in range(1, cfg.rounds + 1)) if r is not None]
    per_round = [{"round": r.round_id, "version": r.result_version,
                  **{f"val_{k}": (r.detail or {}).get("metrics", {}).get(f"val_{k}") for k in ("auc",)},
                  **report(test.labels, model_probs(spec, repo.tensors(r.result_version), test, norm))}
                 for r in rounds if r.status == "complete" and r.result_version]
    served_test = report(test.labels, model_probs(spec, repo.tensors(served.version), test, norm))
    store.close()
    arms: dict[str, dict[str, float]] = {"federated (served)": served_test,
                                         "federated (last round)": per_round[-1] if per_round else {},
                                         "logistic_regression": logistic_regression_arm(train, val, test).test,
                                         "majority_floor": majority_floor(train, test).test}
    if cfg.baselines:
        settings = ArmSettings(Budget(cfg.rounds, cfg.steps), recipe.default_training(cfg.rounds, cfg.steps),
                               build_augment(profile.augmentation))
        arms["centralized"] = centralized_arm(spec, train, sites.parts, val, test, settings, seed=cfg.seed).test
        for name, idx in zip(names, sites.parts, strict=True):
            arms[f"{name} alone"] = single_site_arm(spec, train, idx, name, val, test, settings, seed=cfg.seed).test
    result = {"served_version": served.version, "arms": arms, "per_round": per_round,
              "ph2": {"csv": str(csv_path), "answered": summary.answered, "refused": summary.refused,
                      "failed": summary.failed},
              "sites": [{"agent": n, "device": d, "n": len(ix)} for n, d, ix in zip(names, sites.names, sites.parts,
                                                                                      strict=True)],
              "config": {k: str(v) for k, v in vars(cfg).items()}, "seconds": round(time.perf_counter() - t0, 1),
              "note": "one seed, test split only reported; bench/melanoma.py has 3 seeds and every baseline"}
    (cfg.out / "melanoma-report.json").write_text(json.dumps(result, indent=2))
    _table(arms)
    console.print(f"report: {cfg.out / 'melanoma-report.json'}   diagnoses: {csv_path}")
    return result


def _ready(url: str, version: str) -> bool:
    try:
        r = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.json().get("model_version") == version


def _table(arms: dict[str, dict[str, float]]) -> None:
    table = Table(title="ISIC UDA-1 fixed test split (110 images)")
    table.add_column("arm")
    for m in METRICS:
        table.add_column(m)
    for arm, r in arms.items():
        table.add_row(arm, *(f"{r[m]:.3f}" if isinstance(r.get(m), float) and np.isfinite(r[m]) else "-"
                             for m in METRICS))
    console.print(table)
