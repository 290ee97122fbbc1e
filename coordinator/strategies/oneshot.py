"""One-shot aggregation (FedISCA): the sites' single uploads in, one distilled global model out.

Where FedAvg averages weights, :class:`OneShotDistillation` rebuilds every site's model from its
update, synthesizes images from their BatchNorm statistics and distills their ensemble into the
global model (``learning/oneshot``); the coordinator holds no images. The global model starts from
the round's base weights (the federation's seeded initial model), so the result is reproducible.
It is meant for a federation of one round; the job seam builds it with the federation's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from learning.models import build_model
from learning.oneshot.fedisca import OneShotConfig, one_shot
from learning.oneshot.models import OneShotError, require_batchnorm
from learning.state import get_tensors, set_tensors
from protocol.codec import Tensors
from protocol.errors import Reason


@dataclass
class OneShotDistillation(Strategy):
    """Distill the ensemble of the round's site models into the global model from synthetic images.

    ``architecture``/``model_kwargs`` build the federation's model (it must have BatchNorm);
    ``shape`` is its input (C, H, W); ``weight_by_samples`` weights the ensemble's logits by the
    updates' sample counts instead of equally (the paper: equally).
    """

    architecture: str
    model_kwargs: dict[str, Any]
    shape: tuple[int, int, int]
    config: OneShotConfig = field(default_factory=OneShotConfig)
    seed: int = 0
    weight_by_samples: bool = False
    name: str = "oneshot"

    def __post_init__(self) -> None:
        require_batchnorm(build_model(self.architecture, **self.model_kwargs), self.architecture)

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Return the distilled global model and what the distillation did (per-epoch history)."""
        if not results:
            raise OneShotError("no site models to distill", reason=Reason.TOO_FEW_UPDATES)
        models = []
        for r in results:
            m = build_model(self.architecture, **self.model_kwargs)
            try:
                set_tensors(m, r.tensors)
            except ValueError as e:
                raise OneShotError(f"update of {r.agent_id} does not fit the model: {e}",
                                   reason=Reason.SHAPE_MISMATCH) from e
            models.append(m)
        student = build_model(self.architecture, **self.model_kwargs)
        set_tensors(student, base)
        weights = [float(r.sample_count) for r in results] if self.weight_by_samples else None
        out = one_shot(models, student, self.shape, self.config, seed=self.seed * 100_003 + round_id, weights=weights)
        details = {"clients": [r.agent_id for r in results], "seconds": round(out.seconds, 2),
                   "history": out.history}
        return get_tensors(student), AggregateReport(details)
