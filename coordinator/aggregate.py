"""Pure aggregation math on named tensors. No I/O, no torch; every function is seeded or exact.

``Tensors`` are ordered ``dict[str, np.ndarray]`` of float32; every function returns new arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from protocol.codec import Tensors


def same_keys(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """The tensor names every update shares, in order; refuses differing names or shapes."""
    if not updates:
        raise ValueError("nothing to aggregate")
    keys = list(updates[0])
    for u in updates[1:]:
        if list(u) != keys:
            raise ValueError("updates have different tensor sets")
        for k in keys:
            if u[k].shape != updates[0][k].shape:
                raise ValueError(f"tensor {k!r} has different shapes across updates")
    return keys


class WeightedMean:
    """Streaming ``sum_i w_i x_i / sum_i w_i``: one model-sized float64 accumulator, whatever the count.

    The weights are known up front (sample counts travel in frame headers); updates are added one
    at a time in the weights' order, so a round's updates never have to be in memory together.
    Per element the operations are those of a loop over a list, so the result is bit-identical to
    :func:`weighted_average` of the same updates in the same order.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(w)} non-negative numbers with a positive sum")
        self._w = w / w.sum()
        self._acc: dict[str, np.ndarray] = {}
        self._shapes: list[tuple[str, tuple[int, ...]]] = []
        self._n = 0

    def add(self, update: Mapping[str, np.ndarray]) -> None:
        """Add the next update (the ``i``-th ``add`` takes the ``i``-th weight)."""
        if self._n >= len(self._w):
            raise ValueError(f"more updates than the {len(self._w)} weights")
        shapes = [(k, tuple(v.shape)) for k, v in update.items()]
        if self._n == 0:
            self._shapes = shapes
            self._acc = {k: np.zeros(shape, dtype=np.float64) for k, shape in shapes}
        elif [k for k, _ in shapes] != [k for k, _ in self._shapes]:
            raise ValueError("updates have different tensor sets")
        elif shapes != self._shapes:
            bad = next(k for (k, a), (_, b) in zip(shapes, self._shapes, strict=True) if a != b)
            raise ValueError(f"tensor {bad!r} has different shapes across updates")
        wi = self._w[self._n]
        for k, acc in self._acc.items():
            acc += wi * update[k].astype(np.float64)
        self._n += 1

    def result(self) -> Tensors:
        """The weighted mean, in float32; every weight must have had its update."""
        if self._n != len(self._w):
            raise ValueError(f"{self._n} updates added for {len(self._w)} weights")
        return {k: acc.astype(np.float32) for k, acc in self._acc.items()}


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """Sum_i w_i x_i / sum_i w_i, accumulated in float64 for order-independent precision."""
    same_keys(updates)
    if len(weights) != len(updates):
        raise ValueError(f"weights must be {len(updates)} non-negative numbers with a positive sum")
    return weighted_average_stream(updates, weights)


def weighted_average_stream(updates: Iterable[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """:func:`weighted_average` over an iterable (e.g. a generator decoding one update at a time)."""
    mean = WeightedMean(weights)
    for u in updates:
        mean.add(u)
    return mean.result()


def delta_of(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Tensors:
    """One client's update minus base (float32), as :func:`deltas` computes it for each."""
    return {k: (update[k].astype(np.float32) - base[k].astype(np.float32)) for k in base}


def deltas(updates: Sequence[Mapping[str, np.ndarray]], base: Mapping[str, np.ndarray]) -> list[Tensors]:
    """Client update minus base, per client (the pseudo-gradient's negative)."""
    return [delta_of(u, base) for u in updates]


def staleness_discounted(client: Mapping[str, np.ndarray], trained_from: Mapping[str, np.ndarray],
                         base: Mapping[str, np.ndarray], staleness: int, exponent: float) -> Tensors:
    """A stale client model as one on the current ``base`` (FedBuff, Nguyen et al. 2022).

    ``base + s * (client - trained_from)`` with ``s = (1 + staleness) ** -exponent``; a fresh
    update (``staleness == 0``) is returned as it is.
    """
    if staleness == 0:
        return dict(client)
    s = (1.0 + staleness) ** -exponent
    return {k: (base[k] + s * (v.astype(np.float64) - trained_from[k])).astype(v.dtype) for k, v in client.items()}


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], scale: float = 1.0) -> Tensors:
    """``base + scale * delta`` per tensor, in float32."""
    return {k: (base[k].astype(np.float32) + np.float32(scale) * delta[k].astype(np.float32)) for k in base}


def momentum_step(
    base: Mapping[str, np.ndarray],
    avg_delta: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray] | None,
    *,
    server_lr: float,
    momentum: float,
) -> tuple[Tensors, Tensors]:
    """FedAvgM (Hsu et al. 2019): v <- beta v + delta; x <- x + eta v. Returns (new weights, v)."""
    v = {
        k: (momentum * (velocity[k] if velocity is not None else 0.0) + avg_delta[k]).astype(np.float32)
        for k in base
    }
    return apply_delta(base, v, server_lr), v


def adam_step(
    base: Mapping[str, np.ndarray],
    avg_delta: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    *,
    server_lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    yogi: bool = False,
) -> tuple[Tensors, Tensors, Tensors]:
    """FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization").

    The averaged client delta plays the role of the negative gradient. Returns (weights, m, v).
    """
    new_m: Tensors = {}
    new_v: Tensors = {}
    out: Tensors = {}
    for k in base:
        d = avg_delta[k].astype(np.float32)
        mk = beta1 * (m[k] if m is not None else np.zeros_like(d)) + (1 - beta1) * d
        vk_prev = v[k] if v is not None else np.full_like(d, tau * tau)
        d2 = d * d
        vk = vk_prev - (1 - beta2) * d2 * np.sign(vk_prev - d2) if yogi else beta2 * vk_prev + (1 - beta2) * d2
        new_m[k], new_v[k] = mk.astype(np.float32), vk.astype(np.float32)
        out[k] = (base[k] + server_lr * mk / (np.sqrt(vk) + tau)).astype(np.float32)
    return out, new_m, new_v
