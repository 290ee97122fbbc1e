"""Privacy accounting (RDP, via Google's ``dp-accounting``) and a hard privacy budget.

``RdpAccountant`` records Gaussian mechanisms, optionally amplified by Poisson sampling, as
``(noise_multiplier, sampling_rate, steps)`` triples and reports ε at a given δ. It serves both
sides:

- central DP (``coordinator.strategies.central_dp``): one event per round, noise multiplier =
  the combined multiplier of the noised update sum and the noised clip count, sampling rate =
  expected clients per round / client population (1.0 when the population is unknown: no
  amplification is claimed);
- client DP-SGD (``learning.dp``): one event per local step, noise multiplier and sampling rate
  of the DP optimizer, kept by the agent across rounds.

``PrivacyBudget`` refuses — before anything runs — a round or a training run whose events would
take ε past the budget, raising :class:`BudgetExhausted` with the numbers. The check is "would
exceed", not "has exceeded", so ε never passes the configured budget.

:func:`noise_multiplier_for_epsilon` is the one noise-multiplier solver: it bisects on *this*
accountant, so a budget of ε admits exactly the planned steps at the multiplier it returns.

Both roles use this module (the coordinator's central DP, the agent's DP-SGD budget), so it lives
in ``learning/`` and imports nothing of ours but the error model (``protocol.errors``).
``dp-accounting`` is imported where ε is computed (it takes ~1.7 s to import; agents without DP
never pay it).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protocol.errors import FedscanError, Reason

if TYPE_CHECKING:
    from dp_accounting import dp_event


class _DropNonConvergence(logging.Filter):
    """Drop dp-accounting's per-order "failed to converge" warnings.

    dp-accounting logs a WARNING for every RDP order whose series does not converge, every time ε
    is computed (each round, on every DP agent). It then leaves that order out, which keeps ε an
    upper bound: nothing to act on, so those lines are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but dp-accounting's per-order non-convergence warnings."""
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergence())

DEFAULT_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56,
    64, 96, 128, 256, 512, 1024,
)
"""RDP orders. Fewer than dp-accounting's default (whose orders 1.1–1.5 often fail to converge and
make one ε computation ~0.1 s); ε from a subset of orders is an upper bound of the full one, and
on typical settings (q ≤ 0.1, z ≥ 0.8) it is within 1 % of it."""


class BudgetExhausted(FedscanError):
    """The configured privacy budget does not allow the requested round / training run."""

    reason = Reason.PRIVACY_BUDGET

    def __init__(self, *, budget: float, delta: float, spent: float, would_be: float, what: str) -> None:
        """Keep the numbers (budget, δ, ε spent, ε it would be) and say what was refused."""
        super().__init__(
            f"privacy budget exhausted: {what} refused. ε spent so far = {spent:.4g}, "
            f"with it ε would be {would_be:.4g} > budget ε = {budget:.4g} at δ = {delta:g}. "
            "Stop training here, or raise the budget (a policy decision that must be recorded).",
            detail={"budget": budget, "delta": delta, "spent": spent, "would_be": would_be},
        )
        self.budget, self.delta, self.spent, self.would_be = budget, delta, spent, would_be


@dataclass(frozen=True)
class MechanismEvent:
    """A Gaussian mechanism on a Poisson sample, composed ``steps`` times.

    ``noise_multiplier`` is noise std / L2 sensitivity; ``sampling_rate`` the Poisson sampling
    rate (1.0: no sampling, no amplification claimed).
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        """Refuse negative or non-finite multipliers, rates outside (0, 1] and negative steps."""
        if not self.noise_multiplier >= 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError("noise_multiplier must be a finite number >= 0")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError("sampling_rate must be in (0, 1]")
        if self.steps < 0:
            raise ValueError("steps must be >= 0")

    def to_dp_event(self) -> dp_event.DpEvent:
        """Return the mechanism as a ``dp_accounting`` event (Poisson-sampled unless the rate is 1)."""
        from dp_accounting import dp_event  # lazy: the library takes ~1.7 s to import

        gauss = dp_event.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return gauss
        return dp_event.PoissonSampledDpEvent(self.sampling_rate, gauss)


class RdpAccountant:
    """Rényi-DP accountant over :class:`MechanismEvent` s (add/remove-one neighbouring)."""

    def __init__(self, events: Sequence[MechanismEvent] = (), orders: Sequence[float] | None = None) -> None:
        """Start from ``events`` (none by default), computing ε over ``orders`` (default :data:`DEFAULT_ORDERS`)."""
        self.orders: tuple[float, ...] = tuple(orders) if orders is not None else DEFAULT_ORDERS
        self._events: list[MechanismEvent] = []
        for e in events:
            self.compose(e.noise_multiplier, e.sampling_rate, e.steps)

    @property
    def events(self) -> list[MechanismEvent]:
        """A copy of the composed events, consecutive equal mechanisms merged."""
        return list(self._events)

    @property
    def steps(self) -> int:
        """Compositions recorded so far."""
        return sum(e.steps for e in self._events)

    def compose(self, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> None:
        """Record ``steps`` compositions of the mechanism (merged into the last event when equal)."""
        ev = MechanismEvent(float(noise_multiplier), float(sampling_rate), int(steps))
        last = self._events[-1] if self._events else None
        if last is not None and (last.noise_multiplier, last.sampling_rate) == (ev.noise_multiplier,
                                                                               ev.sampling_rate):
            self._events[-1] = MechanismEvent(last.noise_multiplier, last.sampling_rate, last.steps + ev.steps)
        elif ev.steps:
            self._events.append(ev)

    def epsilon(self, delta: float) -> float:
        """ε(δ) of everything composed so far (0 when nothing was, ∞ for any noiseless step)."""
        return _epsilon_of(tuple(self._events), float(delta), self.orders)

    def epsilon_after(self, delta: float, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> float:
        """ε(δ) if the given mechanism were composed next (nothing is recorded)."""
        ev = MechanismEvent(float(noise_multiplier), float(sampling_rate), int(steps))
        return _epsilon_of((*self._events, ev), float(delta), self.orders)

    # -- persistence (strategy state / agent state) ----------------------------------------------
    def state_array(self) -> npt.NDArray[np.float64]:
        """Events as a float64 ``(k, 3)`` array: noise multiplier, sampling rate, steps."""
        return np.asarray([[e.noise_multiplier, e.sampling_rate, e.steps] for e in self._events],
                          dtype=np.float64).reshape(-1, 3)

    @classmethod
    def from_state_array(cls, arr: npt.ArrayLike, orders: Sequence[float] | None = None) -> RdpAccountant:
        """Rebuild an accountant from :meth:`state_array`'s output."""
        a = np.asarray(arr, dtype=np.float64).reshape(-1, 3)
        return cls([MechanismEvent(float(z), float(q), int(s)) for z, q, s in a], orders)


@functools.lru_cache(maxsize=1024)
def _epsilon_of(events: tuple[MechanismEvent, ...], delta: float, orders: tuple[float, ...]) -> float:
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    from dp_accounting import rdp

    acc = rdp.RdpAccountant(list(orders))
    for e in events:
        if e.steps == 0:
            continue
        if e.noise_multiplier == 0:
            return math.inf
        acc.compose(e.to_dp_event(), e.steps)
    return float(acc.get_epsilon(delta))


class PrivacyBudget:
    """A total ε at a fixed δ, enforced before each round / training run."""

    def __init__(self, epsilon: float, delta: float, accountant: RdpAccountant | None = None) -> None:
        """Budget ``epsilon`` at ``delta`` over ``accountant``'s events (a fresh accountant by default)."""
        if not epsilon > 0:
            raise ValueError("budget epsilon must be > 0 (use math.inf for 'no budget')")
        if not 0 < delta < 1:
            raise ValueError("delta must be in (0, 1)")
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.accountant = accountant or RdpAccountant()

    @property
    def spent(self) -> float:
        """ε spent so far at the budget's δ."""
        return self.accountant.epsilon(self.delta)

    @property
    def remaining(self) -> float:
        """ε left before the budget is reached (never negative)."""
        return max(0.0, self.epsilon - self.spent)

    def require(self, *, noise_multiplier: float, sampling_rate: float, steps: int = 1,
                what: str = "the next round") -> float:
        """Return ε after the planned mechanism; raise :class:`BudgetExhausted` if it exceeds the budget."""
        would_be = self.accountant.epsilon_after(self.delta, noise_multiplier, sampling_rate, steps)
        if would_be > self.epsilon:
            raise BudgetExhausted(budget=self.epsilon, delta=self.delta, spent=self.spent, would_be=would_be,
                                  what=what)
        return would_be

    def spend(self, *, noise_multiplier: float, sampling_rate: float, steps: int = 1,
              what: str = "the round") -> float:
        """Check, then record the mechanism; return ε spent so far."""
        self.require(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, what=what)
        self.accountant.compose(noise_multiplier, sampling_rate, steps)
        return self.spent

    def report(self) -> dict[str, Any]:
        """ε spent, δ, the budget, what remains and the steps composed, for round records and metrics."""
        spent = self.spent
        return {"epsilon": spent, "delta": self.delta, "budget_epsilon": self.epsilon,
                "remaining_epsilon": max(0.0, self.epsilon - spent), "steps": self.accountant.steps}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state: the budget and the accountant's events (ε is recomputed from them)."""
        return {"epsilon": self.epsilon, "delta": self.delta, "events": self.accountant.state_array().tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyBudget:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["epsilon"]), float(d["delta"]),
                   RdpAccountant.from_state_array(np.asarray(d.get("events", []), dtype=np.float64)))


def combined_noise_multiplier(update_noise_multiplier: float, count_stddev: float) -> float:
    """Return the one Gaussian multiplier ``z`` that the update sum and the clipped count cost together.

    Andrew et al. 2021, Thm 1: releasing the update sum with noise multiplier ``σ_Δ`` and the
    clipped-count sum with noise std ``σ_b`` is as private as one Gaussian mechanism with
    ``z = (σ_Δ^-2 + (2σ_b)^-2)^-1/2``.
    """
    if update_noise_multiplier == 0 or count_stddev == 0:
        return 0.0
    return float((update_noise_multiplier ** -2 + (2 * count_stddev) ** -2) ** -0.5)


def update_noise_multiplier_for(z: float, count_stddev: float) -> float:
    """Invert :func:`combined_noise_multiplier`: the update's multiplier ``σ_Δ`` for a combined ``z``.

    ``σ_Δ = (z^-2 − (2σ_b)^-2)^-1/2``, so that the two releases together cost exactly a Gaussian
    mechanism of multiplier ``z``. ``count_stddev == 0`` is refused for ``z > 0`` (a noiseless
    count is not private).
    """
    if z == 0:
        return 0.0
    if count_stddev <= 0:
        raise ValueError("adaptive clipping with DP needs count noise (count_stddev > 0)")
    rest = z ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"noise multiplier z={z} cannot be reached with count noise std {count_stddev}: needs "
            f"2·count_stddev > z (raise count_stddev, e.g. clients_per_round/20 with more clients)"
        )
    return float(rest ** -0.5)


def noise_multiplier_for_epsilon(target_epsilon: float, delta: float, sampling_rate: float, steps: int, *,
                                 tolerance: float = 1e-3, orders: Sequence[float] | None = None) -> float:
    """Return the smallest noise multiplier whose ``steps`` compositions cost at most ``target_epsilon``.

    Bisection (within ``tolerance``, relative) on *this* module's accountant at ``sampling_rate``
    and ``delta``, so a :class:`PrivacyBudget` of ``target_epsilon`` admits exactly the planned
    steps. This is the project's one noise-multiplier solver.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError("target_epsilon must be a finite number > 0 (ε = ∞ needs no noise)")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    acc = RdpAccountant(orders=orders)

    def eps(z: float) -> float:
        return acc.epsilon_after(delta, z, sampling_rate, steps)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta} in {steps} steps")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
