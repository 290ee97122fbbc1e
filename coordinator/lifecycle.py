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

from coordinator.store import ModelRecord, Store

TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "candidate": frozenset({"approved", "retired"}),
    "approved": frozenset({"canary", "retired"}),
    "canary": frozenset({"active", "approved", "retired"}),
    "active": frozenset({"retired"}),
    "retired": frozenset(),
}


class LifecycleError(ValueError):
    """A refused lifecycle change; ``reason`` is machine-readable."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"[{self.reason}] {super().__str__()}"


def check_transition(version: str, current: str, target: str) -> None:
    if target not in TRANSITIONS:
        raise LifecycleError(f"unknown model state {target!r}", reason="unknown_state")
    if target not in TRANSITIONS.get(current, frozenset()):
        allowed = ", ".join(sorted(TRANSITIONS.get(current, frozenset()))) or "none"
        raise LifecycleError(f"model {version} is {current}; it cannot become {target} (allowed: {allowed})",
                             reason="bad_transition")


def transition(store: Store, version: str, target: str) -> ModelRecord:
    """Move ``version`` to ``target`` if the lifecycle allows it; the store is unchanged otherwise."""
    rec = store.get_model(version)
    if rec is None:
        raise LifecycleError(f"no model {version!r}", reason="unknown_version")
    check_transition(version, rec.state, target)
    store.set_model_state(version, target)
    store.record_event("model_state", reason=target, detail={"version": version, "from": rec.state, "to": target})
    out = store.get_model(version)
    assert out is not None
    return out
