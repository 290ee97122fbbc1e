"""Which way a change of the served model goes: forward to a newer model, or back by signed order.

A box only moves forward: a candidate is admissible when it is the active model or was created
after it (``Manifest.created_at``, covered by the model's signature), so an older signed model,
even ``v0``, cannot be made active again by a desired shadow. The way back is a
:class:`~protocol.messages.RollbackOrder` signed with a fleet model-signing key that names this
fleet, this agent, the version it serves now and the version to serve instead, issued after the
last order this box obeyed. Once back, models created after the one rolled back to are forward
again (a rolled-back model may be rolled out again). Pure functions: the installer calls them
under its lock and keeps the last order's time in its ``ACTIVE`` pointer.
"""

from __future__ import annotations

from protocol.errors import ManifestError, Reason
from protocol.manifest import Manifest
from protocol.messages import RollbackOrder
from protocol.signing import TrustStore


class DirectionError(ManifestError):
    """A model change that would go backwards without a valid rollback order."""

    reason = Reason.DOWNGRADE


def is_forward(candidate: Manifest, active: Manifest | None) -> bool:
    """Whether serving ``candidate`` instead of ``active`` moves forward (or stays)."""
    return active is None or candidate.version == active.version or candidate.created_at > active.created_at


def check_rollback(
    order: RollbackOrder,
    *,
    trust: TrustStore | None,
    fleet: str,
    agent_id: str,
    active: str | None,
    target: str,
    last_rollback_at: float | None,
) -> None:
    """Raise :class:`DirectionError` (or ``SignatureError``) unless ``order`` allows going back to ``target``.

    ``trust`` ``None`` (development-only insecure mode) skips the signature, never the fields.
    """
    if trust is not None:
        trust.verify_rollback(order)
    checks = (
        (order.fleet == fleet, Reason.ROLLBACK_WRONG_FLEET, f"for fleet {order.fleet!r}"),
        (order.agent_id == agent_id, Reason.ROLLBACK_WRONG_AGENT, f"for agent {order.agent_id!r}"),
        (order.to_version == target, Reason.ROLLBACK_WRONG_TARGET, f"to {order.to_version}, not {target}"),
        (order.from_version == active, Reason.ROLLBACK_STALE, f"from {order.from_version}, this box serves {active}"),
        (last_rollback_at is None or order.issued_at > last_rollback_at, Reason.ROLLBACK_REPLAYED,
         "issued before the last rollback this box obeyed"),
    )
    for ok, reason, what in checks:
        if not ok:
            raise DirectionError(f"rollback order refused: {what}", reason=reason)
