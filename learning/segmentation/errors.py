"""The segmentation job's one error family (``protocol.errors`` model).

:class:`SegmentationError` refuses a bad value — a configuration no run can honour (default
reason ``bad_config``), tensors that do not fit the shared set (``shape_mismatch``,
``non_finite``), a round with nothing left to aggregate (``too_few_updates``). Bad images and
files are ``learning.datasets.DatasetError``; a privacy budget that refuses a round is
``learning.privacy_accounting.BudgetExhausted``.
"""

from __future__ import annotations

from protocol.errors import FedscanError, Reason


class SegmentationError(FedscanError, ValueError):
    """A value the segmentation job refuses (see the module doc for its reasons)."""

    reason = Reason.BAD_CONFIG
