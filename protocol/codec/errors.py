"""Typed codec errors."""

from __future__ import annotations

__all__ = ["REASONS", "CodecError"]

#: Every machine reason code the package can raise (kept in one place so callers
#: can map them to metrics / NACK codes without grepping the source).
REASONS: frozenset[str] = frozenset(
    {
        "empty_spec",  # parse: spec string has no stages
        "unknown_stage",  # parse: stage name not recognised
        "bad_parameter",  # parse/encode: stage parameter out of range / malformed
        "bad_order",  # parse: stages in an order the grammar does not allow
        "duplicate_stage",  # parse: the same stage twice
        "bad_dtype",  # tensor or spec is not float32
        "bad_spec",  # TensorSpec list malformed (duplicate names, negative dims)
        "shape_mismatch",  # tensor / base / state / payload shape disagreement
        "missing_base",  # delta pipeline (or downlink) without the base it needs
        "missing_state",  # "ef" pipeline encoded without an ErrorFeedbackState
        "non_finite",  # NaN/Inf given to a lossy stage
        "tensor_count",  # payload header says a different number of tensors
        "bad_count",  # top-k count differs from what the spec implies
        "truncated",  # payload shorter than its structure requires
        "trailing_bytes",  # payload longer than its structure requires
        "bad_varint",  # malformed / non-canonical varint
        "index_out_of_range",  # a sparse index >= tensor size
        "bad_scale",  # quantisation scale negative or non-finite
        "bad_padding",  # non-zero padding bits in packed codes
        "bad_frame",  # zstd frame without declared content size
        "decompression_bomb",  # zstd frame declares > allowed output size
        "corrupt",  # zstd checksum / structure failure, other corruption
        "bad_state",  # error-feedback state file unreadable
    }
)


class CodecError(ValueError):
    """A codec failure with a short machine-readable ``reason`` code.

    ``str(err)`` starts with ``"<reason>: "`` so ``pytest.raises(match=...)`` works
    on either the reason or the human message.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unregistered codec reason {reason!r}")
        self.reason = reason
        self.detail = message
        super().__init__(f"{reason}: {message}" if message else reason)
