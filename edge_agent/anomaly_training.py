"""The anomaly job on the box (FedDis): one round of local training, the site's thresholds, the served model.

:class:`AnomalyTrainer` is the ``anomaly`` job's :class:`~edge_agent.jobs.JobTrainer`. Each round it
builds the global disentangled autoencoder from the task's base model, puts back this site's own
*appearance* branch and merger (kept under its ``state_dir`` with
:func:`learning.anomaly.site_state.save_site_state`), runs :func:`learning.anomaly.train.site_round`
on the box's normal images (``pause.wait_if_paused()`` before every step) and calibrates the site's
thresholds on its held-out normal images (:func:`learning.anomaly.scoring.calibrate`).

What leaves the box: the update carries the trained **shape** tensors and, for every tensor that
stays on the site, the base model's value unchanged — so the coordinator's average of them is the
base again and it never sees a site's appearance branch (the coordinator's step also averages the
shape tensors only: ``fedscan.anomaly_job``). Under ``share: all`` (the plain FedAvg autoencoder
baseline) every tensor travels and the latent losses are off.

Job parameters (``Task.job_params``, the same at every site; refused with ``bad_job_params``): the
sharing rule ``share`` (feddis | all), local work ``steps``, ``batch_size``, ``lr``, the FedDis
weights ``lambda_s``, ``lambda_l``, ``paint`` (bright rectangles painted into training images), and
how residuals become scores and thresholds: ``sign`` (abs | positive), ``smooth``, ``foreground``,
``top_fraction``, ``percentile``, ``pixel_percentile`` (``learning.anomaly.scoring.ScoreConfig``).
The score settings the thresholds were made with are kept beside them, so serving scores the same way.

Adam starts afresh each round (the in-process arms, ``fedscan.anomaly_arms``, keep its moments).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.durable import atomic_write
from edge_agent.installer import build_from_manifest
from edge_agent.jobs import JobError, LocalUpdate
from firmware.profile import FirmwareProfile
from learning.anomaly.data import Site
from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import DisentangledAE, ShareRule, get_named, local_names, set_named, shared_names
from learning.anomaly.scoring import ResidualSign, ScoreConfig, SiteThresholds, calibrate
from learning.anomaly.site_state import SiteState, load_site_state, save_site_state
from learning.anomaly.train import TrainConfig, make_optimizer, site_round
from learning.pause import PauseHook
from learning.trainer import Progress
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.jobs import JobParams
from protocol.manifest import Manifest
from protocol.messages import Task

__all__ = ["AnomalyParams", "AnomalyTrainer", "parse_params"]

STATE_FILE = "site_state.npz"
SCORE_FILE = "score.json"

_FOLDER_LOCKS: dict[Path, threading.Lock] = {}
_GUARD = threading.Lock()


def _folder_lock(folder: Path) -> threading.Lock:
    """One lock per state folder: the box's trainer and its server are separate objects over the same files."""
    with _GUARD:
        return _FOLDER_LOCKS.setdefault(folder.resolve(), threading.Lock())


@dataclass(frozen=True)
class AnomalyParams:
    """The federation-wide knobs of an anomaly round (``Task.job_params``)."""

    share: ShareRule = ShareRule.FEDDIS
    steps: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    lambda_s: float = 0.1
    lambda_l: float = 0.1
    paint: int = 0
    sign: ResidualSign = ResidualSign.ABS
    smooth: int = 3
    foreground: float = -1.0
    top_fraction: float = 0.05
    percentile: float = 95.0
    pixel_percentile: float = 99.0

    def train_config(self) -> TrainConfig:
        """Local training settings (the plain L1 autoencoder under ``share: all``)."""
        cfg = TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, lambda_s=self.lambda_s,
                          lambda_l=self.lambda_l, paint=self.paint)
        return cfg.plain if self.share is ShareRule.ALL else cfg

    def score_config(self) -> ScoreConfig:
        """How residuals become maps, scores and thresholds."""
        return ScoreConfig(sign=self.sign, smooth=self.smooth, foreground=self.foreground, erode=0,
                           top_fraction=self.top_fraction, percentile=self.percentile,
                           pixel_percentile=self.pixel_percentile)

    def as_params(self) -> JobParams:
        """The wire form (what the coordinator sends)."""
        return {k: (str(v) if isinstance(v, str) else v) for k, v in asdict(self).items()}


_CASTS: dict[str, Any] = {"share": ShareRule, "sign": ResidualSign, "steps": int, "batch_size": int, "paint": int,
                          "smooth": int}


def parse_params(params: Mapping[str, Any]) -> AnomalyParams:
    """Validate ``job_params`` (``JobError`` ``bad_job_params`` for unknown keys or bad values)."""
    known = set(AnomalyParams.__dataclass_fields__)
    try:
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        values = {k: _CASTS.get(k, float)(v) for k, v in params.items()}
        if any(isinstance(v, float) and not np.isfinite(v) for v in values.values()):
            raise ValueError("non-finite value")
        p = replace(AnomalyParams(), **values)
        if not (1 <= p.steps <= 10_000 and 1 <= p.batch_size <= 4096 and 0 < p.lr <= 10 and p.paint <= 64):
            raise ValueError("need 1 <= steps <= 10000, 1 <= batch_size <= 4096, 0 < lr <= 10, paint <= 64")
        p.train_config().check()
        p.score_config().check()
    except (TypeError, ValueError) as exc:  # AnomalyError is a ValueError
        raise JobError(f"anomaly job parameters refused: {exc}", reason=Reason.BAD_JOB_PARAMS) from exc
    return p


class AnomalyTrainer:
    """One box's anomaly rounds and what it keeps between them (see the module doc)."""

    def __init__(self, profile: FirmwareProfile, state_dir: Path) -> None:
        """Train as ``profile`` says; keep the site's tensors and thresholds in ``state_dir``."""
        self.profile, self.state_dir = profile, state_dir
        self._lock = _folder_lock(state_dir)

    # -- state --------------------------------------------------------------------------------------
    def site_state(self) -> SiteState | None:
        """What the site keeps (None before its first round or calibration)."""
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return None
        try:
            return load_site_state(path)
        except AnomalyError as exc:
            raise JobError(f"the site's anomaly state cannot be read: {exc}", reason=exc.reason) from exc

    def score_config(self) -> ScoreConfig:
        """The score settings the site's thresholds were made with (the job's defaults before any)."""
        path = self.state_dir / SCORE_FILE
        if not path.exists():
            return AnomalyParams().score_config()
        return ScoreConfig(**json.loads(path.read_text()))

    def _save(self, state: SiteState, score: ScoreConfig) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_dir / SCORE_FILE, json.dumps(asdict(score)).encode())
        save_site_state(self.state_dir / STATE_FILE, state)

    def _with_local(self, manifest: Manifest, tensors: Tensors) -> tuple[DisentangledAE, SiteState | None]:
        model = build_from_manifest(manifest, tensors)
        if not isinstance(model, DisentangledAE):
            raise JobError(f"model {manifest.version} ({manifest.architecture.name}) is not the anomaly autoencoder",
                           reason=Reason.JOB_MISMATCH)
        state = self.site_state()
        if state is not None and state.local:
            try:
                set_named(model, state.local)
            except AnomalyError as exc:
                raise JobError(f"the site's own tensors do not fit model {manifest.version}: {exc}",
                               reason=Reason.BAD_JOB_PARAMS) from exc
        return model, state

    def serving_model(self, manifest: Manifest, tensors: Tensors, normal_images: np.ndarray | None = None
                      ) -> tuple[DisentangledAE, SiteThresholds | None, ScoreConfig]:
        """What this box serves: the global model with its appearance branch put back, its thresholds, score settings.

        With ``normal_images`` (the site's held-out normals) the thresholds are recalibrated on this
        model and kept on disk; otherwise they are the last round's (None before any).
        """
        with self._lock:
            model, state = self._with_local(manifest, tensors)
            model.eval()
            score = self.score_config()
            if normal_images is None or not len(normal_images):
                return model, (state.thresholds if state is not None else None), score
            thr = calibrate(model, normal_images, score)
            self._save(SiteState(state.local if state else {}, thr, manifest.version), score)
            return model, thr, score

    # -- one round ----------------------------------------------------------------------------------
    def train(self, task: Task, manifest: Manifest, base: Tensors, data: Any, *, pause: PauseHook,
              progress: Progress | None) -> LocalUpdate:
        """One round (the :class:`~edge_agent.jobs.JobTrainer` contract)."""
        if not isinstance(data, Site):
            raise JobError(f"the anomaly job trains on a site's normal images, not {type(data).__name__} "
                           "(start the agent with an anomaly profile and --data)", reason=Reason.JOB_MISMATCH)
        params = parse_params(task.job_params)
        pause.wait_if_paused()
        with self._lock:
            model, state = self._with_local(manifest, base)
            rule, cfg, score = params.share, params.train_config(), params.score_config()
            local = local_names(model, rule)
            if state is not None and state.local and sorted(state.local) != sorted(local):
                raise JobError(f"the site's own tensors do not fit share={rule} (did the federation change it?)",
                               reason=Reason.BAD_JOB_PARAMS)
            gen = torch.Generator().manual_seed(task.training.seed)
            try:
                shared, metrics = site_round(model, make_optimizer(model, cfg),
                                             {k: base[k] for k in shared_names(model, rule)}, data.train, cfg, rule,
                                             gen, between=pause.wait_if_paused)
                pause.wait_if_paused()
                thr = calibrate(model, data.calib, score)
            except AnomalyError as exc:
                raise JobError(f"anomaly round {task.round_id} refused: {exc}", reason=exc.reason) from exc
            self._save(SiteState(get_named(model, local), thr, manifest.version), score)
        if progress is not None:
            progress(params.steps, params.steps, metrics["loss"])
        out = {k: (shared[k] if k in shared else base[k]) for k in base}  # local tensors travel as the base's
        return LocalUpdate(out, len(data.train), {
            "train_loss": metrics["loss"], "recon_l1": metrics["recon_l1"], "shape_consistency": metrics["scl"],
            "latent_orthogonality": metrics["lol"], "threshold_image": thr.image, "threshold_pixel": thr.pixel,
            "calibration_images": float(thr.n_normal)})
