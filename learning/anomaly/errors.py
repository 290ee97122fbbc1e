"""The anomaly job's one error family (``protocol.errors`` model).

:class:`AnomalyError` refuses a value no run can honour: a bad configuration (default reason
``bad_config``), images of the wrong shape or with non-finite pixels (``shape_mismatch``,
``non_finite``), tensors that do not fit the shared set (``shape_mismatch``).
"""

from __future__ import annotations

from protocol.errors import FedscanError, Reason


class AnomalyError(FedscanError, ValueError):
    """A value the anomaly job refuses (see the module doc for its reasons)."""

    reason = Reason.BAD_CONFIG
