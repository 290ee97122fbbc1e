"""Typed export errors: every refusal carries a short machine-readable reason code."""

from __future__ import annotations

from protocol.errors import ReasonedError


class ExportError(ReasonedError, RuntimeError):
    """An export, verification or engine step that did not produce a usable artifact."""

    reason = "export_failed"


class VerificationError(ExportError):
    """An artifact whose outputs disagree with the torch model beyond the stated tolerance."""

    reason = "verification_failed"


class BadArtifact(ExportError):
    """A file that is not a valid ONNX model / engine (corrupt, truncated, wrong content)."""

    reason = "bad_artifact"


class EngineUnavailable(ExportError):
    """An engine or builder that cannot run on this machine; the message says why."""

    reason = "unavailable"


def describe(exc: BaseException) -> str:
    """One line for logs and attempt records: ``unavailable: ...`` or ``<reason>: <message>``."""
    msg = str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, ExportError):
        return msg if msg.startswith(f"{exc.reason}:") else f"{exc.reason}: {msg}"
    return f"{type(exc).__name__}: {msg}"
