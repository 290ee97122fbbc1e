"""The one mapping from the error model to HTTP: a refusal's reason → status code and error body.

Everything below the API raises :class:`protocol.errors.FedscanError` with a
:class:`protocol.errors.Reason`; only this module knows which HTTP status answers which reason.
The body is always ``{"reason": <code>, "message": <text>}`` (``schemas.ErrorOut``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from fastapi import HTTPException

from protocol.errors import FedscanError, Reason

__all__ = ["HTTP_STATUS", "http_error", "http_error_for", "http_status"]

HTTP_STATUS: Mapping[Reason, int] = MappingProxyType(
    {
        # the request itself
        Reason.MISSING_TOKEN: 401,
        Reason.INVALID_TOKEN: 401,
        Reason.LENGTH_REQUIRED: 411,
        Reason.MISSING_FILE: 422,
        Reason.UNKNOWN_LABEL: 422,
        Reason.UNKNOWN_STUDY: 404,
        # the bytes: not an image we can read at all
        Reason.EMPTY_BODY: 400,
        Reason.CORRUPT_IMAGE: 400,
        Reason.NOT_DICOM: 400,
        Reason.CORRUPT_DICOM: 400,
        # too big to take
        Reason.TOO_LARGE: 413,
        Reason.TOO_MANY_PIXELS: 413,
        # a kind of image this box does not take
        Reason.UNSUPPORTED_CONTENT_TYPE: 415,
        Reason.FORMAT_NOT_ACCEPTED: 415,
        Reason.UNSUPPORTED_PIXEL_FORMAT: 415,
        Reason.UNSUPPORTED_TRANSFER_SYNTAX: 415,
        Reason.UNDECODABLE_PIXEL_DATA: 415,
        # a readable image that this model cannot diagnose
        Reason.WRONG_CHANNELS: 422,
        Reason.WRONG_SIZE: 422,
        Reason.BAD_SHAPE: 422,
        Reason.NO_PIXEL_DATA: 422,
        Reason.MODALITY_NOT_ACCEPTED: 422,
        Reason.TRUNCATED_DICOM: 422,
        Reason.FRAME_OUT_OF_RANGE: 422,
        Reason.MULTI_FRAME: 422,
        Reason.UNSUPPORTED_PHOTOMETRIC: 422,
        # a request for a job the served model is not (e.g. /v1/segment on a classifier)
        Reason.JOB_MISMATCH: 409,
        # the box, not the request
        Reason.NOT_READY: 503,
        Reason.OVERLOADED: 503,
        Reason.INFERENCE_FAILED: 500,
        Reason.INFERENCE_TIMEOUT: 504,
        Reason.INTERNAL_ERROR: 500,
        Reason.INVALID_REQUEST: 422,
    }
)


def http_status(err: FedscanError) -> int:
    """Return the status that answers ``err``.

    From :data:`HTTP_STATUS`; a reason it does not list is 422 for a refused value (a
    ``ValueError`` family) and 500 for anything else.
    """
    status = HTTP_STATUS.get(err.reason)
    if status is not None:
        return status
    return 422 if isinstance(err, ValueError) else 500


def _exception(status: int, reason: Reason, message: str, headers: dict[str, str] | None) -> HTTPException:
    return HTTPException(status_code=status, detail={"reason": reason.value, "message": message}, headers=headers)


def http_error(reason: Reason, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    """Return the answer to a refusal the API itself decides (no token, no file part, ...).

    The status comes from :data:`HTTP_STATUS`, which must list ``reason``.
    """
    return _exception(HTTP_STATUS[reason], reason, message, headers)


def http_error_for(err: FedscanError, *, retry_after_s: int | None = None) -> HTTPException:
    """Return the HTTP answer to ``err``.

    A 503 carries ``Retry-After``: the error's own ``detail["retry_after_s"]`` when it has one
    (a full queue), else ``retry_after_s``.
    """
    status = http_status(err)
    headers: dict[str, str] | None = None
    if status == 503:
        retry = err.detail.get("retry_after_s", retry_after_s)
        if retry is not None:
            headers = {"Retry-After": str(int(retry))}
    # the box's own failures are described in its log (under the request id), never to the client
    message = _PRIVATE.get(err.reason, err.message) if status >= 500 else err.message
    return _exception(status, err.reason, message, headers)


#: What a client is told instead of the internal message of the box's own failures.
_PRIVATE: Mapping[Reason, str] = MappingProxyType({
    Reason.INFERENCE_FAILED: "inference failed; the box's log has the details",
    Reason.INTERNAL_ERROR: "the box failed; its log has the details",
})
