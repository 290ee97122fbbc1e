"""The segmentation job on the box: one round of local training, and the model this box serves.

:class:`SegmentTrainer` is the ``segment`` job's :class:`~edge_agent.jobs.JobTrainer`. Each round it
builds the global U-Net from the task's base model, puts back this site's *local* tensors (under
``share: fedbn`` the normalization layers, under ``local_head`` the output block; nothing under
``fedavg``), runs :func:`learning.segmentation.client.train_site` for the round's steps and returns
the update. Local tensors never leave the box: the update carries the base model's values for
them, so the coordinator's average leaves them untouched and learns nothing from them.

Privacy (the box's firmware profile, ``privacy``): with ``dp_sgd: true`` every round is DP-SGD with
per-sample clipping, **adaptive** (quantile-based, Andrew et al. 2021, target quantile 0.1; the bound
starts at ``max_grad_norm`` and moves with the site's own released counts) or **fixed** at
``max_grad_norm`` (the task's ``clipping``), and noise calibrated to this box's own
``epsilon_budget`` at ``target_delta`` over the federation's ``planned_rounds`` (the profile's
``noise_multiplier`` is not used: the noise follows from the budget). The accountant's events live
in ``privacy_budget.json`` (the agent's budget format, written atomically and fsynced before the
update leaves; an unreadable file refuses training, never starts afresh), so ε is record-level
over every update the box ever sent for this job and survives restarts; a round that would pass
the budget raises ``BudgetExhausted`` before anything trains. ε spent (total and this round), the
clip bound and the noise multipliers go out with the update as ``dp_*`` metrics.

Job parameters (``Task.job_params``, the same at every site; refused with ``bad_job_params``):
``share`` (fedavg | fedbn | local_head), ``clipping`` (adaptive | fixed), ``steps``,
``batch_size``, ``lr``, ``planned_rounds``, and the optimizer of DP rounds ``dp_optimizer`` (sgd |
adam) and ``dp_lr`` (SGD with momentum 0.9 at 0.01 by default: chosen on the validation split by
``bench/segment.py --dp-tune``; Adam at ``lr`` diverges under DP noise).

Pausing: the trainer waits while inference has the box before it starts; a round is short (a
few optimizer steps) and runs to its end once started.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edge_agent.durable import atomic_write
from edge_agent.installer import build_from_manifest
from edge_agent.jobs import JobError, LocalUpdate
from edge_agent.private_training import BUDGET_FILE, PrivacyStateError
from firmware.profile import FirmwareProfile
from learning.pause import PauseHook
from learning.privacy_accounting import PrivacyBudget
from learning.segmentation.client import SegTrainConfig, SiteState, train_site
from learning.segmentation.data import SiteData
from learning.segmentation.errors import SegmentationError
from learning.segmentation.privacy import SitePrivacy
from learning.segmentation.sharing import ShareRule, local_names, set_named, shared_names
from learning.trainer import Progress
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.jobs import JobParams
from protocol.manifest import Manifest
from protocol.messages import Task

__all__ = ["SegmentParams", "SegmentTrainer", "parse_params"]

log = logging.getLogger("fedscan.agent.segment")

STATE_FILE = "site_state.json"
LOCAL_FILE = "local_tensors.npz"


@dataclass(frozen=True)
class SegmentParams:
    """The federation-wide knobs of a segmentation round (``Task.job_params``)."""

    share: ShareRule = ShareRule.FEDBN
    clipping: str = "adaptive"
    steps: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    planned_rounds: int = 20
    dp_optimizer: str = "sgd"
    dp_lr: float = 0.01

    def as_params(self) -> JobParams:
        """The wire form (what the coordinator sends)."""
        return {"share": str(self.share), "clipping": self.clipping, "steps": self.steps,
                "batch_size": self.batch_size, "lr": self.lr, "planned_rounds": self.planned_rounds,
                "dp_optimizer": self.dp_optimizer, "dp_lr": self.dp_lr}


def parse_params(params: Mapping[str, Any]) -> SegmentParams:
    """Validate ``job_params`` (``JobError`` ``bad_job_params`` for unknown keys or bad values)."""
    known = set(SegmentParams.__dataclass_fields__)
    unknown = sorted(set(params) - known)
    try:
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        if params.get("share", "fedbn") not in tuple(ShareRule):
            raise ValueError(f"share must be one of {', '.join(ShareRule)}, not {params['share']!r}")
        p = SegmentParams(share=ShareRule(params.get("share", "fedbn")), clipping=str(params.get("clipping", "adaptive")),
                          steps=int(params.get("steps", 10)), batch_size=int(params.get("batch_size", 8)),
                          lr=float(params.get("lr", 2e-3)), planned_rounds=int(params.get("planned_rounds", 20)),
                          dp_optimizer=str(params.get("dp_optimizer", "sgd")), dp_lr=float(params.get("dp_lr", 0.01)))
        if p.clipping not in ("adaptive", "fixed"):
            raise ValueError(f"clipping must be adaptive or fixed, not {p.clipping!r}")
        if p.dp_optimizer not in ("sgd", "adam") or not 0 < p.dp_lr <= 10:
            raise ValueError(f"need dp_optimizer sgd or adam and 0 < dp_lr <= 10, not {p.dp_optimizer!r}, {p.dp_lr}")
        if not (1 <= p.steps <= 10_000 and 1 <= p.batch_size <= 4096 and 0 < p.lr <= 10 and p.planned_rounds >= 1):
            raise ValueError("need 1 <= steps <= 10000, 1 <= batch_size <= 4096, 0 < lr <= 10, planned_rounds >= 1")
    except (TypeError, ValueError) as exc:
        raise JobError(f"segmentation job parameters refused: {exc}", reason=Reason.BAD_JOB_PARAMS) from exc
    return p


class SegmentTrainer:
    """One box's segmentation rounds and what it keeps between them (see the module doc)."""

    def __init__(self, profile: FirmwareProfile, state_dir: Path) -> None:
        """Train as ``profile`` says; keep the site's state in ``state_dir``."""
        self.profile, self.state_dir = profile, state_dir
        self._lock = threading.Lock()

    # -- state --------------------------------------------------------------------------------------
    def _privacy(self, params: SegmentParams) -> SitePrivacy | None:
        section = self.profile.privacy
        if section is None or not section.dp_sgd:
            return None
        if section.epsilon_budget is None:
            raise JobError("privacy.dp_sgd needs privacy.epsilon_budget for the segmentation job: its noise is "
                           "calibrated to the budget", reason=Reason.BAD_PROFILE)
        return SitePrivacy(epsilon=section.epsilon_budget, delta=section.target_delta,
                           planned_rounds=params.planned_rounds, clipping=params.clipping,  # type: ignore[arg-type]
                           initial_clip=section.max_grad_norm)

    def _events(self) -> np.ndarray:
        path = self.state_dir / BUDGET_FILE
        if not path.exists():
            return np.zeros((0, 3))
        try:
            return PrivacyBudget.from_dict(json.loads(path.read_text())).accountant.state_array()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyStateError(f"cannot read the privacy budget {path}: {exc}; DP training refuses to start "
                                    "until it is restored (never delete it to get a fresh budget)") from exc

    def load_state(self) -> SiteState:
        """The site's state: local tensors, adaptive clip bound, accountant events, rounds trained."""
        meta_path, local_path = self.state_dir / STATE_FILE, self.state_dir / LOCAL_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        local: Tensors = {}
        if local_path.exists():
            with np.load(local_path) as z:
                local = {k: z[k] for k in meta.get("local_order", z.files)}
        return SiteState.from_dict({**meta, "privacy_events": self._events()}, local)

    def _save(self, state: SiteState, priv: SitePrivacy | None) -> None:
        if priv is not None:  # fsynced before the update can leave: a power loss must not roll ε back
            budget = PrivacyBudget(priv.epsilon, priv.delta)
            budget_state = {**budget.to_dict(), "events": np.asarray(state.privacy_events).tolist()}
            atomic_write(self.state_dir / BUDGET_FILE, json.dumps(budget_state).encode())
        buf = self.state_dir / f".{LOCAL_FILE}.tmp.npz"
        np.savez(buf, **state.local)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        atomic_write(self.state_dir / LOCAL_FILE, buf.read_bytes())
        buf.unlink(missing_ok=True)
        meta = {"clip": state.clip, "rounds": state.rounds, "local_order": list(state.local)}
        atomic_write(self.state_dir / STATE_FILE, json.dumps(meta).encode())

    def local_tensors(self) -> Tensors:
        """This site's local tensors (empty before its first round or under ``fedavg``)."""
        with self._lock:
            return dict(self.load_state().local)

    def serving_model(self, manifest: Manifest, tensors: Tensors) -> nn.Module:
        """The model this box serves: the global model with this site's local tensors put back."""
        model = build_from_manifest(manifest, tensors)
        local = self.local_tensors()
        if local:
            set_named(model, local)
        return model.eval()

    # -- one round ----------------------------------------------------------------------------------
    def train(self, task: Task, manifest: Manifest, base: Tensors, data: Any, *, pause: PauseHook,
              progress: Progress | None) -> LocalUpdate:
        """One round (the :class:`~edge_agent.jobs.JobTrainer` contract)."""
        if not isinstance(data, SiteData):
            raise JobError(f"the segmentation job trains on a site's images and masks, not {type(data).__name__} "
                           "(start the agent with a segment profile and --data)", reason=Reason.JOB_MISMATCH)
        params = parse_params(task.job_params)
        priv = self._privacy(params)
        pause.wait_if_paused()
        with self._lock:
            model = build_from_manifest(manifest, base)
            shared = shared_names(model, params.share)
            state = self.load_state()
            if state.local and sorted(state.local) != sorted(local_names(model, params.share)):
                raise JobError("the site's local tensors do not fit this model / sharing rule (the federation "
                               f"changed its share to {params.share}?)", reason=Reason.BAD_JOB_PARAMS)
            cfg = SegTrainConfig(steps=params.steps, batch_size=params.batch_size, lr=params.lr, share=params.share,
                                 seed=task.training.seed)
            if priv is not None:  # DP rounds: the optimizer validated under DP noise
                cfg = replace(cfg, optimizer=params.dp_optimizer, lr=params.dp_lr)  # type: ignore[arg-type]
            try:
                update = train_site(model.train(), data, cfg, global_tensors={k: base[k] for k in shared},
                                    state=state, round_id=task.round_id, privacy=priv)
            except SegmentationError as exc:
                raise JobError(f"segmentation round {task.round_id} refused: {exc}", reason=exc.reason) from exc
            self._save(update.state, priv)
        if progress is not None:
            progress(params.steps, params.steps, float(update.metrics.get("train_loss", math.nan)))
        if priv is not None:
            log.info("segment round %d: ε = %.3f of %.3f (this round %.3f), clip %.3g -> %.3g", task.round_id,
                     update.metrics["dp_epsilon"], priv.epsilon, update.metrics["dp_epsilon_round"],
                     update.metrics["dp_clip_before"], update.metrics["dp_clip"])
        # local tensors travel as the base's values: the coordinator's average of them stays the base
        out = {k: (update.tensors[k] if k in update.tensors else base[k]) for k in base}
        return LocalUpdate(out, update.sample_count, dict(update.metrics))
