"""The one error model of fedscan: :class:`FedscanError` and the :class:`Reason` codes.

Every refusal or failure that fedscan raises on purpose is a :class:`FedscanError` carrying a
machine-readable :class:`Reason`, a human message and optional structured ``detail``. A family
subclass exists only where callers catch it differently (a codec failure is re-raised as a frame
refusal, an install refusal keeps the box on its old model, ...); where nobody catches a case on
its own, the code raises the family with a reason instead of inventing a class. Families that
refuse a bad *value* (wire input, images, profiles, datasets) are also ``ValueError``, as Python's
convention asks; operational failures (transport, store, serving, export) are not.

Reason values are part of the v1 contract (docs/protocol.md): they travel in ``Ack.reason``, are
recorded in the state store and the audit log, and are answered by the edge API. ``Reason`` is a
``StrEnum``, so a member *is* its wire string. The mapping from a reason to an HTTP status (the
box's API, ``edge_agent/api/errors.py``) and to an ``Ack`` (the coordinator's update intake)
happens once, at those edges, never inside the packages that raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum, unique
from typing import Any

__all__ = [
    "CODEC_REASONS",
    "FedscanError",
    "FrameError",
    "MalformedMessage",
    "ManifestError",
    "ProtocolError",
    "Reason",
    "TransportError",
    "UnknownTopic",
    "codec_frame_reason",
]


@unique
class Reason(StrEnum):
    """Every reason code of the tree, grouped by where it arises; the value is the wire string."""

    ERROR = "error"

    # -- messages, topics, identifiers -------------------------------------------------------------
    PROTOCOL_ERROR = "protocol_error"
    MALFORMED_MESSAGE = "malformed_message"
    UNKNOWN_TOPIC = "unknown_topic"
    ILLEGAL_ID = "illegal_id"

    # -- envelopes, update/model frames, chunks ------------------------------------------------------
    BAD_FRAME = "bad_frame"
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_HEADER = "bad_header"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    UNKNOWN_CODEC = "unknown_codec"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    MISSING_BASE = "missing_base"
    HASH_MISMATCH = "hash_mismatch"
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    TRANSFER_CHANGED = "transfer_changed"
    INCOMPLETE = "incomplete"
    TOO_LARGE = "too_large"
    TOO_MANY_TRANSFERS = "too_many_transfers"
    SIZE_MISMATCH = "size_mismatch"

    # -- update codecs (protocol.codec); a frame that fails to decode says codec_<reason> ------------
    EMPTY_SPEC = "empty_spec"
    UNKNOWN_STAGE = "unknown_stage"
    BAD_PARAMETER = "bad_parameter"
    BAD_ORDER = "bad_order"
    DUPLICATE_STAGE = "duplicate_stage"
    BAD_DTYPE = "bad_dtype"
    BAD_SPEC = "bad_spec"
    MISSING_STATE = "missing_state"
    TENSOR_COUNT = "tensor_count"
    BAD_COUNT = "bad_count"
    TRAILING_BYTES = "trailing_bytes"
    BAD_VARINT = "bad_varint"
    BAD_SCALE = "bad_scale"
    BAD_PADDING = "bad_padding"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT = "corrupt"
    BAD_STATE = "bad_state"
    CODEC_EMPTY_SPEC = "codec_empty_spec"
    CODEC_UNKNOWN_STAGE = "codec_unknown_stage"
    CODEC_BAD_PARAMETER = "codec_bad_parameter"
    CODEC_BAD_ORDER = "codec_bad_order"
    CODEC_DUPLICATE_STAGE = "codec_duplicate_stage"
    CODEC_BAD_DTYPE = "codec_bad_dtype"
    CODEC_BAD_SPEC = "codec_bad_spec"
    CODEC_SHAPE_MISMATCH = "codec_shape_mismatch"
    CODEC_MISSING_BASE = "codec_missing_base"
    CODEC_MISSING_STATE = "codec_missing_state"
    CODEC_NON_FINITE = "codec_non_finite"
    CODEC_TENSOR_COUNT = "codec_tensor_count"
    CODEC_BAD_COUNT = "codec_bad_count"
    CODEC_TRUNCATED = "codec_truncated"
    CODEC_TRAILING_BYTES = "codec_trailing_bytes"
    CODEC_BAD_VARINT = "codec_bad_varint"
    CODEC_INDEX_OUT_OF_RANGE = "codec_index_out_of_range"
    CODEC_BAD_SCALE = "codec_bad_scale"
    CODEC_BAD_PADDING = "codec_bad_padding"
    CODEC_BAD_FRAME = "codec_bad_frame"
    CODEC_DECOMPRESSION_BOMB = "codec_decompression_bomb"
    CODEC_CORRUPT = "codec_corrupt"
    CODEC_BAD_STATE = "codec_bad_state"

    # -- coordinator: admission of updates, reports and requests ------------------------------------
    NOT_ENROLLED = "not_enrolled"
    TOPIC_MISMATCH = "topic_mismatch"
    STALE_BASE = "stale_base"
    ROUND_CLOSED = "round_closed"
    TOO_STALE = "too_stale"
    ALREADY_IN_BUFFER = "already_in_buffer"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_ARTIFACT = "unknown_artifact"
    NO_UPDATES_BEFORE_DEADLINE = "no_updates_before_deadline"
    TOO_FEW_UPDATES = "too_few_updates"  # fewer updates than the strategy can combine (Krum: 2f + 3)
    AGGREGATION_FAILED = "aggregation_failed"
    BLOB_MISSING = "blob_missing"  # an accepted update's frame is no longer in the blob store

    # -- manifests, signatures, trust -----------------------------------------------------------------
    BAD_MANIFEST = "bad_manifest"
    BAD_VALIDATION_BATCH = "bad_validation_batch"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    RETIRED_KEY = "retired_key"
    WRONG_TARGET = "wrong_target"
    BAD_TRUST_STORE = "bad_trust_store"

    # -- transport --------------------------------------------------------------------------------------
    TRANSPORT_UNAVAILABLE = "transport_unavailable"
    PLAINTEXT_REFUSED = "plaintext_refused"

    # -- export, verification, inference engines -------------------------------------------------------
    EXPORT_FAILED = "export_failed"
    VERIFICATION_FAILED = "verification_failed"
    BAD_ARTIFACT = "bad_artifact"
    UNAVAILABLE = "unavailable"
    NO_ENGINE = "no_engine"
    SMOKE_FAILED = "smoke_failed"
    BAD_OPSET = "bad_opset"
    NOT_INT8 = "not_int8"
    QUANTIZATION_FAILED = "quantization_failed"
    NO_CALIBRATION_DATA = "no_calibration_data"
    TENSORRT_PARSE_FAILED = "tensorrt_parse_failed"
    TENSORRT_BUILD_FAILED = "tensorrt_build_failed"
    BAD_INPUT = "bad_input"

    # -- model install on the box ------------------------------------------------------------------------
    INSTALL_FAILED = "install_failed"
    NO_PREVIOUS = "no_previous"
    TIMEOUT = "timeout"
    NO_TRUST_STORE = "no_trust_store"
    DOWNGRADE = "downgrade"  # an older model without a signed rollback order
    ROLLBACK_WRONG_FLEET = "rollback_wrong_fleet"
    ROLLBACK_WRONG_AGENT = "rollback_wrong_agent"
    ROLLBACK_WRONG_TARGET = "rollback_wrong_target"
    ROLLBACK_STALE = "rollback_stale"
    ROLLBACK_REPLAYED = "rollback_replayed"

    # -- image intake (decode and preprocessing) ---------------------------------------------------------
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    FORMAT_NOT_ACCEPTED = "format_not_accepted"
    EMPTY_BODY = "empty_body"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    WRONG_CHANNELS = "wrong_channels"
    WRONG_SIZE = "wrong_size"
    BAD_SHAPE = "bad_shape"
    NOT_DICOM = "not_dicom"
    CORRUPT_DICOM = "corrupt_dicom"
    TRUNCATED_DICOM = "truncated_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    MODALITY_NOT_ACCEPTED = "modality_not_accepted"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"
    FRAME_OUT_OF_RANGE = "frame_out_of_range"
    MULTI_FRAME = "multi_frame"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"

    # -- job types (protocol.jobs) ---------------------------------------------------------------------
    UNSUPPORTED_JOB = "unsupported_job"  # a task of a job this box has no trainer for
    JOB_MISMATCH = "job_mismatch"  # a task, model or request of another job than expected
    BAD_JOB_PARAMS = "bad_job_params"  # a task's job_params the job refuses

    # -- serving and the box's API ------------------------------------------------------------------------
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    INFERENCE_FAILED = "inference_failed"
    INFERENCE_TIMEOUT = "inference_timeout"
    UNKNOWN_STUDY = "unknown_study"
    UNKNOWN_LABEL = "unknown_label"
    BOX_UNREACHABLE = "unreachable"  # a client (diagnose-folder) got no HTTP answer from the box
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    LENGTH_REQUIRED = "length_required"
    MISSING_FILE = "missing_file"
    INTERNAL_ERROR = "internal_error"  # the box's own failure: details in its log under the request id
    INVALID_REQUEST = "invalid_request"  # a request that fails the API's schema

    # -- coordinator state store ---------------------------------------------------------------------------
    STORE_ERROR = "store_error"
    DUPLICATE = "duplicate"
    NOT_FOUND = "not_found"
    BLOB_CORRUPT = "blob_corrupt"

    # -- model lifecycle and staged rollouts -----------------------------------------------------------------
    UNKNOWN_STATE = "unknown_state"
    BAD_TRANSITION = "bad_transition"
    UNKNOWN_ROLLOUT = "unknown_rollout"
    NOT_APPROVED = "not_approved"
    EMPTY_COHORT = "empty_cohort"
    ROLLOUT_OPEN = "rollout_open"
    BAD_STAGES = "bad_stages"
    BAD_CONFIG = "bad_config"
    UNTRUSTED_UNSIGNED = "untrusted_unsigned"
    UNTRUSTED_UNKNOWN_KEY = "untrusted_unknown_key"
    UNTRUSTED_BAD_SIGNATURE = "untrusted_bad_signature"
    UNTRUSTED_RETIRED_KEY = "untrusted_retired_key"
    UNTRUSTED_WRONG_TARGET = "untrusted_wrong_target"
    UNTRUSTED_BAD_MANIFEST = "untrusted_bad_manifest"
    UNTRUSTED_BAD_TRUST_STORE = "untrusted_bad_trust_store"
    # rollout gate decisions (the reason a stage was rolled back)
    INSTALL_REFUSED = "install_refused"
    INSTALL_TIMEOUT = "install_timeout"
    ERROR_RATE = "error_rate"
    LATENCY_P95 = "latency_p95"
    ACCURACY = "accuracy"
    GATE_FAILED = "gate_failed"
    MANUAL = "manual"

    # -- privacy ---------------------------------------------------------------------------------------------
    PRIVACY_BUDGET = "privacy_budget"
    PRIVACY_STATE = "privacy_state"
    DP_INCOMPATIBLE = "dp_incompatible"

    # -- one-shot federated learning (learning/oneshot) ----------------------------------------------------
    BATCHNORM_REQUIRED = "batchnorm_required"  # synthesis inverts BatchNorm statistics: a model without them

    # -- configuration: profiles, datasets, PKI ------------------------------------------------------------------
    BAD_PROFILE = "bad_profile"
    BAD_DATASET = "bad_dataset"
    PKI_ERROR = "pki_error"


#: The reasons a codec (``protocol.codec``) can give; each has a ``codec_<reason>`` twin for frames.
CODEC_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.EMPTY_SPEC,  # parse: spec string has no stages
        Reason.UNKNOWN_STAGE,  # parse: stage name not recognised
        Reason.BAD_PARAMETER,  # parse/encode: stage parameter out of range / malformed
        Reason.BAD_ORDER,  # parse: stages in an order the grammar does not allow
        Reason.DUPLICATE_STAGE,  # parse: the same stage twice
        Reason.BAD_DTYPE,  # tensor or spec is not float32
        Reason.BAD_SPEC,  # TensorSpec list malformed (duplicate names, negative dims)
        Reason.SHAPE_MISMATCH,  # tensor / base / state / payload shape disagreement
        Reason.MISSING_BASE,  # delta pipeline (or downlink) without the base it needs
        Reason.MISSING_STATE,  # "ef" pipeline encoded without an ErrorFeedbackState
        Reason.NON_FINITE,  # NaN/Inf given to a lossy stage
        Reason.TENSOR_COUNT,  # payload header says a different number of tensors
        Reason.BAD_COUNT,  # top-k count differs from what the spec implies
        Reason.TRUNCATED,  # payload shorter than its structure requires
        Reason.TRAILING_BYTES,  # payload longer than its structure requires
        Reason.BAD_VARINT,  # malformed / non-canonical varint
        Reason.INDEX_OUT_OF_RANGE,  # a sparse index >= tensor size
        Reason.BAD_SCALE,  # quantisation scale negative or non-finite
        Reason.BAD_PADDING,  # non-zero padding bits in packed codes
        Reason.BAD_FRAME,  # zstd frame without declared content size
        Reason.DECOMPRESSION_BOMB,  # zstd frame declares > allowed output size
        Reason.CORRUPT,  # zstd checksum / structure failure, other corruption
        Reason.BAD_STATE,  # error-feedback state file unreadable
    }
)


def codec_frame_reason(reason: Reason) -> Reason:
    """Return the frame refusal for a payload whose codec failed with ``reason``: ``codec_<reason>``."""
    return Reason(f"codec_{reason.value}")


def _restore(cls: type[FedscanError], args: tuple[Any, ...]) -> FedscanError:
    """Rebuild a pickled error without calling a subclass's own ``__init__`` (its state follows)."""
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    return err


class FedscanError(Exception):
    """Base of every error fedscan raises on purpose: a :class:`Reason`, a message, a detail.

    ``str(err)`` is ``"[reason] message"``; ``err.message`` is the message alone and
    ``err.detail`` a JSON-able mapping of structured facts (never patient data). Subclasses set
    a default ``reason``; ``reason=`` overrides it per raise. A reason that is not a
    :class:`Reason` value is a programming error and raises ``ValueError`` at once.
    """

    reason: Reason = Reason.ERROR

    def __init__(self, message: str, *, reason: Reason | None = None, detail: Mapping[str, Any] | None = None) -> None:
        """Make the error; ``reason`` overrides the class's default."""
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = Reason(reason)
        self.detail: dict[str, Any] = dict(detail or {})

    def __str__(self) -> str:
        """Show ``[reason] message``."""
        return f"[{self.reason}] {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle class, message, reason and detail (subclasses' own ``__init__`` is not replayed)."""
        return _restore, (type(self), self.args), self.__dict__

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"reason", "message"[, "detail"]}`` for logs, events and error bodies."""
        out: dict[str, Any] = {"reason": self.reason.value, "message": self.message}
        if self.detail:
            out["detail"] = dict(self.detail)
        return out


class ProtocolError(FedscanError, ValueError):
    """Input from the wire that protocol v1 refuses (a bad value, hence also ``ValueError``)."""

    reason = Reason.PROTOCOL_ERROR


class MalformedMessage(ProtocolError):
    """A JSON message body that does not parse or fails its schema."""

    reason = Reason.MALFORMED_MESSAGE


class FrameError(ProtocolError):
    """A binary envelope, update/model frame or chunk that is truncated, corrupt or inconsistent."""

    reason = Reason.BAD_FRAME


class UnknownTopic(ProtocolError):
    """A topic outside the v1 tree, or an identifier that may not appear in one."""

    reason = Reason.UNKNOWN_TOPIC


class ManifestError(ProtocolError):
    """A model manifest (or what it lists) that fails validation, hashing or signature checks."""

    reason = Reason.BAD_MANIFEST


class TransportError(FedscanError):
    """The broker could not be reached, refused us, or may not be used as configured."""

    reason = Reason.TRANSPORT_UNAVAILABLE
