"""Staged rollouts: a person approves a candidate, the model goes to a cohort stage by stage.

Each stage is gated on what its agents report, and a failed gate undoes the stage by itself.

Layers, one module each:

* :mod:`~coordinator.rollout.plan` — pure planning: stage sizes, agent order, cohort, targets;
* :mod:`~coordinator.rollout.gates` — pure gate decisions from agents' reports and the clock;
* :mod:`~coordinator.rollout.controller` — a person's commands and the gate ``tick`` (store only);
* :mod:`~coordinator.rollout.driver` — the coordinator-side loop publishing desired shadows.
"""

from __future__ import annotations

from coordinator.rollout.controller import RolloutController
from coordinator.rollout.driver import RolloutDriver, rollback_shadow
from coordinator.rollout.errors import RolloutError
from coordinator.rollout.gates import AgentReport, Decision, GateConfig, evaluate
from coordinator.rollout.plan import (
    DEFAULT_STAGES,
    desired_targets,
    order_agents,
    plan_stages,
    select_cohort,
    stage_agents,
)

__all__ = [
    "DEFAULT_STAGES",
    "AgentReport",
    "Decision",
    "GateConfig",
    "RolloutController",
    "RolloutDriver",
    "RolloutError",
    "desired_targets",
    "evaluate",
    "order_agents",
    "plan_stages",
    "rollback_shadow",
    "select_cohort",
    "stage_agents",
]
