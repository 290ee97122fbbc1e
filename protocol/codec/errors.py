"""The codec family of the error model: :class:`CodecError`, raised with a codec reason."""

from __future__ import annotations

from protocol.errors import CODEC_REASONS, ProtocolError, Reason

__all__ = ["CODEC_REASONS", "CodecError"]


class CodecError(ProtocolError):
    """A codec failure; ``reason`` is one of :data:`CODEC_REASONS` (checked at construction).

    Its own family because the frame decoder catches it to refuse the frame with
    ``codec_<reason>`` (``protocol.errors.codec_frame_reason``).
    """

    reason = Reason.CORRUPT

    def __init__(self, message: str, *, reason: Reason) -> None:
        """Make the error; ``ValueError`` if ``reason`` is not a codec reason."""
        if reason not in CODEC_REASONS:
            raise ValueError(f"unregistered codec reason {reason!r}")
        super().__init__(message, reason=reason)
