"""Rollout planning, pure functions: stage sizes, agent order, cohort, and who should serve what.

* :func:`plan_stages` — cumulative agents per stage, each stage at least one new agent;
* :func:`order_agents` — deterministic, per-version order, so the canary is not always the same box;
* :func:`select_cohort` — the agents of a profile carrying every given tag;
* :func:`stage_agents` — the agents a rollout has reached at a stage;
* :func:`desired_targets` — which version each agent touched by an open rollout must be desired
  to serve right now.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from coordinator.rollout.errors import RolloutError
from coordinator.states import RolloutState
from coordinator.store import AgentRecord, RolloutRecord
from protocol.errors import Reason

DEFAULT_STAGES: tuple[float, ...] = (5.0, 25.0, 100.0)


def plan_stages(n_agents: int, percents: Sequence[float]) -> list[int]:
    """Cumulative number of agents per stage.

    ``ceil(p% of n)``, at least one more than the stage before, the last stage reaching every
    agent; stages that would add nobody are dropped.
    """
    if n_agents < 1:
        raise RolloutError("the cohort is empty", reason=Reason.EMPTY_COHORT)
    if not percents:
        raise RolloutError("no stages given", reason=Reason.BAD_STAGES)
    prev_p = 0.0
    for p in percents:
        if not math.isfinite(p) or p <= 0 or p > 100 or p <= prev_p:
            raise RolloutError(f"stages must be increasing percentages in (0, 100], got {list(percents)}",
                               reason=Reason.BAD_STAGES)
        prev_p = p
    if percents[-1] != 100:
        raise RolloutError(f"the last stage must be 100 %, got {percents[-1]}", reason=Reason.BAD_STAGES)
    out: list[int] = []
    for p in percents:
        n = min(n_agents, max(math.ceil(p * n_agents / 100 - 1e-9), (out[-1] + 1) if out else 1))
        if not out or n > out[-1]:
            out.append(n)
    return out


def order_agents(agent_ids: Iterable[str], version: str) -> list[str]:
    """Deterministic rollout order: by SHA-256 of ``version:agent`` (then id)."""
    return sorted(agent_ids, key=lambda a: (hashlib.sha256(f"{version}:{a}".encode()).hexdigest(), a))


def select_cohort(agents: Iterable[AgentRecord], *, profile: str | None, tags: Sequence[str]) -> list[AgentRecord]:
    """Agents of ``profile`` (any if None) carrying every one of ``tags``."""
    want = set(tags)
    return [a for a in agents if (profile is None or a.profile == profile) and want <= set(a.tags)]


def stage_agents(r: RolloutRecord, stage: int | None = None) -> list[str]:
    """The agents reached by ``stage`` (default: the rollout's current stage)."""
    return r.agents[: r.stages[r.stage if stage is None else stage]]


def desired_targets(r: RolloutRecord) -> dict[str, str]:
    """Which version each agent touched by an open rollout must be desired to serve now."""
    if r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
        return {a: r.version for a in stage_agents(r)}
    if r.state == RolloutState.ROLLING_BACK:
        return {a: prev for a in stage_agents(r) if (prev := r.previous.get(a)) is not None}
    return {}
