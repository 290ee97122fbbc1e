"""Sample-count weights for the strategies that weight clients by their data.

Sample counts are self-reported: a box claiming 2,147,483,647 samples would get ~100 % of a
plain FedAvg's weight. Every count-weighted strategy therefore caps each count at
``count_cap`` times the round's median count (:func:`coordinator.robust.capped_weights`), so a
client that lies gains at most ``count_cap`` median clients' say; ``count_cap=None`` turns the
cap off (trusted fleets only). The agents whose count was cut are listed in the round record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from coordinator import robust
from coordinator.strategies.base import ClientMeta

#: The default cap, in median counts: the one the weighted robust strategies have used. It costs an honest
#: site bigger than that some say (the demo's largest site, 4.5 medians, goes from 67 % to 64.5 % of the
#: weight); a fleet whose sites differ more sets its own (``--max-weight-ratio``).
DEFAULT_COUNT_CAP: Final = 4.0


def check_count_cap(count_cap: float | None) -> float | None:
    """``count_cap`` if it is None or a finite number ≥ 1; ValueError otherwise."""
    if count_cap is not None and not (1.0 <= count_cap < float("inf")):
        raise ValueError(f"count_cap (max weight ratio) must be a finite number >= 1 or None, got {count_cap}")
    return count_cap


def sample_weights(results: Sequence[ClientMeta], count_cap: float | None) -> tuple[list[float], list[str]]:
    """Each result's weight (its sample count, capped), and the agents whose count was capped."""
    counts = [float(r.sample_count) for r in results]
    if count_cap is None:
        return counts, []
    weights = [float(w) for w in robust.capped_weights(counts, count_cap)]
    return weights, [r.agent_id for r, c, w in zip(results, counts, weights, strict=True) if w < c]
