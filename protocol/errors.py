"""Typed errors: every refusal carries a short machine-readable reason code.

Reason codes are part of the v1 contract (docs/protocol.md): they are logged, counted
in the state store and sent back to agents in acknowledgements.
"""

from __future__ import annotations


class ReasonedError(Exception):
    """An error with a short machine-readable ``reason`` code, shown as ``[reason] message``.

    Mixed into the protocol's refusals (``ValueError``) and the export errors (``RuntimeError``)."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"[{self.reason}] {super().__str__()}"


class ProtocolError(ReasonedError, ValueError):
    """Base of every refusal that the wire protocol can produce."""

    reason = "protocol_error"


class MalformedMessage(ProtocolError):
    """A message body that does not parse or fails its schema."""

    reason = "malformed_message"


class FrameError(ProtocolError):
    """An update frame that is truncated, corrupted or inconsistent."""

    reason = "bad_frame"


class UpdateRejected(ProtocolError):
    """A well-formed update that the coordinator will not accept (wrong round, duplicate...)."""

    reason = "update_rejected"


class UnknownTopic(ProtocolError):
    """A message on a topic outside the v1 tree, or on one the sender may not use."""

    reason = "unknown_topic"


class NotEnrolled(ProtocolError):
    """A message from an agent that the coordinator does not know."""

    reason = "not_enrolled"


class ManifestError(ProtocolError):
    """A model manifest that fails validation, hashing or signature checks."""

    reason = "bad_manifest"


class TransportError(ProtocolError):
    """The broker could not be reached or refused us (after bounded retries)."""

    reason = "transport_unavailable"
