"""Pure aggregation math on named tensors. No I/O, no torch; every function is seeded or exact.

``Tensors`` are ordered ``dict[str, np.ndarray]`` of float32; every function returns new arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Tensors = dict[str, np.ndarray]


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


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """Sum_i w_i x_i / sum_i w_i, accumulated in float64 for order-independent precision."""
    keys = same_keys(updates)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {len(updates)} non-negative numbers with a positive sum")
    w = w / w.sum()
    out: Tensors = {}
    for k in keys:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for wi, u in zip(w, updates, strict=True):
            acc += wi * u[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


def deltas(updates: Sequence[Mapping[str, np.ndarray]], base: Mapping[str, np.ndarray]) -> list[Tensors]:
    """Client update minus base, per client (the pseudo-gradient's negative)."""
    return [{k: (u[k].astype(np.float32) - base[k].astype(np.float32)) for k in base} for u in updates]


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], scale: float = 1.0) -> Tensors:
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
