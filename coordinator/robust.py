"""Byzantine-robust aggregation: pure functions on client deltas. No I/O, no torch.

Every function takes a list of ``Tensors`` (client *deltas*, i.e. client weights minus the
global base, all with the same names and shapes) and returns new arrays. Sample counts are
self-reported, so an attacker could claim a huge count to outweigh everyone else: the plain
aggregators give each client one vote, the weighted ones take capped counts.

- ``coordinate_median`` — per coordinate median (Yin et al. 2018).
- ``trimmed_mean`` — per coordinate, drop the ``floor(beta * n)`` largest and smallest values,
  average the rest (Yin et al. 2018).
- ``weighted_trimmed_mean`` / ``weighted_median`` — the same with each client's (capped)
  sample count as its weight: under label and quantity skew the unweighted ones ignore how much
  data each site holds and land far from FedAvg even without an attacker; ``capped_weights``
  bounds what a lied-about count can buy.
- ``krum`` / ``multi_krum`` — pick the update(s) closest to their ``n - f - 2`` nearest
  neighbours (Blanchard et al. 2017); ``multi_krum`` averages the ``m`` best.
- ``norm_bound`` — scale every delta down to at most ``max_norm`` (Sun et al. 2019).
- ``anomaly_scores`` — per client: L2 norm, distance to the coordinate-wise median, cosine
  similarity to the median, and a robust z-score (median/MAD) of that distance, for logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregate import same_keys
from protocol.codec import Tensors

Delta = Mapping[str, np.ndarray]




def flatten(updates: Sequence[Delta]) -> np.ndarray:
    """Stack updates as rows of an ``(n, d)`` float64 matrix (tensor order of the first update)."""
    keys = same_keys(updates)
    return np.stack(
        [np.concatenate([np.asarray(u[k], dtype=np.float64).ravel() for k in keys]) for u in updates]
    ) if keys else np.zeros((len(updates), 0))


def unflatten(vector: np.ndarray, like: Delta) -> Tensors:
    """Inverse of one row of :func:`flatten`, as float32 tensors shaped like ``like``."""
    out: Tensors = {}
    pos = 0
    for k, t in like.items():
        size = int(np.asarray(t).size)
        out[k] = vector[pos : pos + size].reshape(np.asarray(t).shape).astype(np.float32)
        pos += size
    if pos != vector.size:
        raise ValueError(f"vector has {vector.size} values, tensors need {pos}")
    return out


def coordinate_median(updates: Sequence[Delta]) -> Tensors:
    """Coordinate-wise median (for an even count, the mean of the two middle values)."""
    x = flatten(updates)
    return unflatten(np.median(x, axis=0), updates[0])


def trimmed_mean(updates: Sequence[Delta], beta: float) -> Tensors:
    """Coordinate-wise ``beta``-trimmed mean: drop ``floor(beta*n)`` values at each end."""
    n = len(updates)
    if not 0.0 <= beta < 0.5:
        raise ValueError("trimmed mean beta must be in [0, 0.5)")
    k = int(np.floor(beta * n))
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} from each end of {n} updates leaves nothing")
    x = np.sort(flatten(updates), axis=0)
    return unflatten(x[k : n - k].mean(axis=0), updates[0])


def capped_weights(counts: Sequence[float], cap: float) -> np.ndarray:
    """Self-reported sample counts as weights, each capped at ``cap`` times the median count.

    A client that claims a huge count gains at most ``cap`` median clients' say.
    """
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or cap <= 0:
        raise ValueError("counts must be finite and non-negative, cap > 0")
    return np.minimum(w, cap * float(np.median(w)))


def _sorted_with_weight_shares(
    updates: Sequence[Delta], weights: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each coordinate's values sorted (rows), with the weight share of the client each came from."""
    x = flatten(updates)
    shares = weight_shares(weights, x.shape[0])
    order = np.argsort(x, axis=0, kind="stable")
    return np.take_along_axis(x, order, axis=0), shares[order]


def weight_shares(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """``weights`` normalized to sum 1; refuses a count other than ``n``, negatives and an all-zero set."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum, one per update")
    shares: np.ndarray = w / w.sum()
    return shares


def weighted_trimmed_mean(updates: Sequence[Delta], weights: Sequence[float] | np.ndarray, beta: float) -> Tensors:
    """Weighted trimmed mean: cut the ``beta`` share of weight mass from each end, per coordinate.

    Per coordinate, sort the values, give each value its share of the total weight, cut the
    ``beta`` share of weight mass from each end (a value straddling a cut keeps the part inside),
    and average what is left by weight. ``beta = 0`` is the weighted mean (FedAvg); as ``beta``
    approaches 0.5 it becomes the weighted median. A client with weight share at most ``beta`` can
    never move the result outside the range of the honest values.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError("trimmed mean beta must be in [0, 0.5)")
    xs, ws = _sorted_with_weight_shares(updates, weights)
    hi = np.cumsum(ws, axis=0)
    kept = np.clip(np.minimum(hi, 1.0 - beta) - np.maximum(hi - ws, beta), 0.0, None)
    return unflatten((kept * xs).sum(axis=0) / kept.sum(axis=0), updates[0])


def weighted_median(updates: Sequence[Delta], weights: Sequence[float] | np.ndarray) -> Tensors:
    """Per coordinate, the value at which the cumulative weight crosses one half.

    When it lands exactly on a boundary, the mean of the two values.
    """
    xs, ws = _sorted_with_weight_shares(updates, weights)
    hi = np.cumsum(ws, axis=0)
    eps = 1e-12
    lower = np.argmax(hi >= 0.5 - eps, axis=0)  # first value whose cumulative weight reaches 1/2
    upper = np.argmax(hi > 0.5 + eps, axis=0)  # first value strictly past 1/2
    cols = np.arange(xs.shape[1])
    return unflatten(0.5 * (xs[lower, cols] + xs[upper, cols]), updates[0])


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``x`` (exactly 0 on the diagonal)."""
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d, 0.0)
    out: np.ndarray = np.maximum(d, 0.0)
    return out


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Krum score per row: sum of squared distances to its ``n - f - 2`` nearest other rows."""
    n = x.shape[0]
    if f < 0:
        raise ValueError("f must be >= 0")
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} byzantine clients needs n >= 2f+3 = {2 * f + 3}, got {n}")
    d = pairwise_sq_distances(x)
    closest = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(d[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def multi_krum(updates: Sequence[Delta], f: int, m: int | None = None) -> tuple[Tensors, list[int]]:
    """Average of the ``m`` updates with the lowest Krum scores (``m = n - f`` by default).

    Returns the aggregate and the selected indices (best first). Ties break by index.
    """
    x = flatten(updates)
    n = x.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum m must be in [1, {n}], got {m}")
    scores = krum_scores(x, f)
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
    return unflatten(x[chosen].mean(axis=0), updates[0]), chosen


def krum(updates: Sequence[Delta], f: int) -> tuple[Tensors, int]:
    """The single update with the lowest Krum score, and its index."""
    agg, chosen = multi_krum(updates, f, m=1)
    return agg, chosen[0]


def l2_norms(updates: Sequence[Delta]) -> np.ndarray:
    """The L2 norm of each update (all its tensors together)."""
    norms: np.ndarray = np.linalg.norm(flatten(updates), axis=1)
    return norms


def norm_bound(updates: Sequence[Delta], max_norm: float) -> tuple[list[Tensors], np.ndarray, np.ndarray]:
    """Scale each delta to L2 norm at most ``max_norm``.

    Returns (bounded deltas, original norms, boolean mask of the clipped ones).
    """
    if not max_norm > 0 or not np.isfinite(max_norm):
        raise ValueError("max_norm must be a positive finite number")
    norms = l2_norms(updates)
    clipped = norms > max_norm
    out: list[Tensors] = []
    for u, norm in zip(updates, norms, strict=True):
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        out.append({k: (np.asarray(v, dtype=np.float64) * scale).astype(np.float32) for k, v in u.items()})
    return out, norms, clipped


def mean(updates: Sequence[Delta], weights: Sequence[float] | None = None) -> Tensors:
    """(Weighted) mean of deltas in float64; equal weights when ``weights`` is None."""
    x = flatten(updates)
    return unflatten(weight_shares(np.ones(x.shape[0]) if weights is None else weights, x.shape[0]) @ x, updates[0])


@dataclass(frozen=True)
class AnomalyScore:
    """How far one client's delta sits from the crowd. Higher ``robust_z`` = more suspicious."""

    norm: float
    distance_to_median: float
    cosine_to_median: float
    robust_z: float

    def as_dict(self) -> dict[str, float]:
        """The scores as a JSON-ready mapping."""
        return {
            "norm": self.norm,
            "distance_to_median": self.distance_to_median,
            "cosine_to_median": self.cosine_to_median,
            "robust_z": self.robust_z,
        }


def anomaly_scores(updates: Sequence[Delta]) -> list[AnomalyScore]:
    """Per update: norm, L2 distance and cosine to the coordinate-wise median, robust z-score.

    The robust z-score of the distance is ``(dist - median(dist)) / (1.4826 * MAD(dist))``.

    The MAD is floored at 1e-12 relative to the median distance so identical updates give 0.
    """
    x = flatten(updates)
    med = np.median(x, axis=0)
    dist = np.linalg.norm(x - med, axis=1)
    norms = np.linalg.norm(x, axis=1)
    med_norm = float(np.linalg.norm(med))
    cos = np.where(
        (norms > 0) & (med_norm > 0), (x @ med) / np.maximum(norms * med_norm, 1e-300), 0.0
    )
    center = float(np.median(dist))
    mad = 1.4826 * float(np.median(np.abs(dist - center)))
    scale = max(mad, 1e-12 * max(center, 1e-12))
    z = (dist - center) / scale
    return [
        AnomalyScore(float(n), float(d), float(c), float(zi))
        for n, d, c, zi in zip(norms, dist, cos, z, strict=True)
    ]
