"""Model lifecycle: candidate → approved → canary → active → retired, with enforced transitions.

::

    candidate ──approve──▶ approved ──rollout start──▶ canary ──rollout complete──▶ active
        │                   ▲   │                        │  │                         │
        └──────retire───────┼───┴──────retire────────────┘  └──gate failed: retired   └──retire──▶ retired
                            └────manual rollback─────────┘

With ``--rollout auto`` (the default, today's behaviour) every new round model is recorded
``active`` directly and served by every agent; with ``--rollout manual`` round models are
``candidate``: agents train from them, but serve them only after a person approves one and a
staged rollout completes. ``Store.set_model_state`` itself stays unchecked (it is storage);
every caller that acts for a person or a rollout goes through :func:`transition`.
"""

from __future__ import annotations

from typing import Final

from coordinator.states import ModelState
from coordinator.store import ModelRecord, Store
from protocol.errors import FedscanError, Reason

_S = ModelState
TRANSITIONS: Final[dict[ModelState, frozenset[ModelState]]] = {
    _S.CANDIDATE: frozenset({_S.APPROVED, _S.RETIRED}),
    _S.APPROVED: frozenset({_S.CANARY, _S.RETIRED}),
    _S.CANARY: frozenset({_S.ACTIVE, _S.APPROVED, _S.RETIRED}),
    _S.ACTIVE: frozenset({_S.RETIRED}),
    _S.RETIRED: frozenset(),
}


class LifecycleError(FedscanError):
    """A refused lifecycle change (reason ``unknown_state``, ``bad_transition``, ``unknown_version``)."""

    reason = Reason.BAD_TRANSITION


def check_transition(version: str, current: ModelState | str, target: ModelState | str) -> ModelState:
    """``target`` as a state if a model in ``current`` may move to it; LifecycleError otherwise."""
    try:
        to = ModelState(target)
    except ValueError:
        raise LifecycleError(f"unknown model state {target!r}", reason=Reason.UNKNOWN_STATE) from None
    allowed_set = TRANSITIONS.get(ModelState(current), frozenset())
    if to not in allowed_set:
        allowed = ", ".join(sorted(allowed_set)) or "none"
        raise LifecycleError(f"model {version} is {current}; it cannot become {to} (allowed: {allowed})",
                             reason=Reason.BAD_TRANSITION)
    return to


def transition(store: Store, version: str, target: ModelState | str) -> ModelRecord:
    """Move ``version`` to ``target`` if the lifecycle allows it; the store is unchanged otherwise."""
    rec = store.get_model(version)
    if rec is None:
        raise LifecycleError(f"no model {version!r}", reason=Reason.UNKNOWN_VERSION)
    to = check_transition(version, rec.state, target)
    store.set_model_state(version, to)
    store.record_event("model_state", reason=to.value,
                       detail={"version": version, "from": rec.state.value, "to": to.value})
    out = store.get_model(version)
    assert out is not None
    return out
