"""Byzantine update attacks for simulations (``bench/robustness.py``, ``tests/test_robustness.py``).

An attack is a callable ``(agent_id, update, base) -> sent``: ``update`` is what the agent's honest
local training produced (full weights), ``base`` the round's global weights, and ``sent`` the
weights the agent uploads instead. ``experiments.federated(attack=...)`` calls it for every agent
after local training and before aggregation (and before any codec); an attack leaves every agent
other than its ``attacker`` untouched.

Both attacks act on the *delta* ``Δ = update − base`` of the floating-point tensors (integer
tensors, e.g. BatchNorm's ``num_batches_tracked``, are sent as trained):

- :class:`ScaleAttack`: sends ``base + factor · Δ`` (``factor = −10``: a boosted sign flip);
- :class:`NoiseAttack`: sends ``base + g``, where ``g`` is Gaussian noise rescaled to exactly
  ``multiple · ‖Δ‖`` (L2 over all floating-point tensors together).

Both are pure: the noise generator is seeded from ``(seed, agent_id, a digest of base)``, so the
same round gives the same noise in any process and a new round (new ``base``) gives new noise.
The classes are picklable (frozen dataclasses), so they travel to ``ProcessPoolExecutor`` workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from protocol.codec import Tensors

AttackFn = Callable[[str, Tensors, Tensors], Tensors]
"""``(agent_id, update, base) -> the weights the agent sends``."""


def _is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(a).dtype, np.floating))


def delta_norm(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update − base`` over all floating-point tensors together (float64)."""
    sq = 0.0
    for k, v in update.items():
        if _is_float(v):
            d = np.asarray(v, dtype=np.float64) - np.asarray(base[k], dtype=np.float64)
            sq += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(sq))


def scaled_delta(update: Tensors, base: Tensors, factor: float) -> Tensors:
    """``base + factor · (update − base)`` on floating-point tensors, dtypes kept."""
    out: Tensors = {}
    for k, v in update.items():
        if _is_float(v):
            b = np.asarray(base[k], dtype=np.float64)
            out[k] = (b + factor * (np.asarray(v, dtype=np.float64) - b)).astype(np.asarray(v).dtype)
        else:
            out[k] = np.array(v, copy=True)
    return out


def noise_delta(update: Tensors, base: Tensors, multiple: float, rng: np.random.Generator) -> Tensors:
    """``base + g`` with Gaussian ``g`` rescaled so ``‖g‖ = multiple · ‖update − base‖``."""
    target = multiple * delta_norm(update, base)
    noise = {k: rng.standard_normal(np.asarray(v).shape) for k, v in update.items() if _is_float(v)}
    norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in noise.values())))
    scale = target / norm if norm > 0 else 0.0
    out: Tensors = {}
    for k, v in update.items():
        if k in noise:
            out[k] = (np.asarray(base[k], dtype=np.float64) + scale * noise[k]).astype(np.asarray(v).dtype)
        else:
            out[k] = np.array(v, copy=True)
    return out


def _digest(agent_id: str, base: Mapping[str, np.ndarray]) -> int:
    h = hashlib.blake2b(agent_id.encode(), digest_size=8)
    for k in sorted(base):
        h.update(k.encode())
        h.update(np.ascontiguousarray(base[k]).tobytes())
    return int.from_bytes(h.digest(), "big")


@dataclass(frozen=True)
class ScaleAttack:
    """``attacker`` sends its delta multiplied by ``factor``."""

    attacker: str
    factor: float = -10.0

    @property
    def name(self) -> str:
        """The attack's label in results (e.g. ``scale-10``)."""
        return f"scale{self.factor:g}"

    def __call__(self, agent_id: str, update: Tensors, base: Tensors) -> Tensors:
        """The attacker's scaled delta; everyone else's update unchanged."""
        return scaled_delta(update, base, self.factor) if agent_id == self.attacker else update


@dataclass(frozen=True)
class NoiseAttack:
    """``attacker`` sends Gaussian noise of norm ``multiple`` × its honest delta's norm."""

    attacker: str
    multiple: float = 10.0
    seed: int = 0

    @property
    def name(self) -> str:
        """The attack's label in results (e.g. ``noise10x``)."""
        return f"noise{self.multiple:g}x"

    def __call__(self, agent_id: str, update: Tensors, base: Tensors) -> Tensors:
        """The attacker's noise update (seeded per agent and base); everyone else's unchanged."""
        if agent_id != self.attacker:
            return update
        rng = np.random.default_rng([int(self.seed), _digest(agent_id, base)])
        return noise_delta(update, base, self.multiple, rng)
