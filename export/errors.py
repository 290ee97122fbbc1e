"""The export family of the error model: export, verification and engine failures."""

from __future__ import annotations

from protocol.errors import FedscanError, Reason


class ExportError(FedscanError):
    """An export, verification or engine step that did not produce a usable artifact."""

    reason = Reason.EXPORT_FAILED


class VerificationError(ExportError):
    """An artifact whose outputs disagree with the torch model beyond the stated tolerance."""

    reason = Reason.VERIFICATION_FAILED


class BadArtifact(ExportError):
    """A file that is not a valid ONNX model / engine (corrupt, truncated, wrong content)."""

    reason = Reason.BAD_ARTIFACT


class EngineUnavailable(ExportError):
    """An engine or builder that cannot run on this machine; the message says why."""

    reason = Reason.UNAVAILABLE


def describe(exc: BaseException) -> str:
    """One line for logs and attempt records: ``<reason>: <message>`` or ``<ExceptionType>: <message>``."""
    if isinstance(exc, FedscanError):
        return f"{exc.reason}: {exc.message}"
    msg = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{type(exc).__name__}: {msg}"
