"""Adaptive vs fixed clipping when the clipping bound is not tuned (issue 18, beside ``bench/segment.py``).

``bench/segment.py`` compares the two clippings each at its *validated* setting: fixed C = 1 (best of
0.5 / 1 / 2 on the validation split) against adaptive clipping started from C₀ = 1. A site of a real
fleet cannot tune its bound that way: every look at its private data costs privacy budget, and a
new modality's gradient norms are not known in advance. What quantile-based adaptive clipping is for
(Andrew et al. 2021) is to land near a good bound from a bad start. This bench asks that question:
federated FedBN at ε = 4 (the same settings, optimizer and sites as ``bench/segment.py``), with both
clippings started from the same bound C₀ — the validated 1 and a decade either side (0.1, 10),
declared before the run, never chosen on the test split, and the rows report the test split only.

Rows in ``bench/results/segment_clip_robustness.json``: Dice per modality and per site, the bound
each site ended with, ε spent. ``--quick`` (``make test``): tiny subsets, 2 rounds — checks that it
runs, says nothing about accuracy.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, pool, print_table, write_rows
from segment import QUICK, SETTINGS, Job, Settings, load, run_job

from learning.segmentation.data import MASKS_NOTE, MRI, PH2

EPSILON = 4.0
BOUNDS = (0.1, 1.0, 10.0)  # the validated C = 1 and a decade either side


def jobs_for(bounds: tuple[float, ...], base: Settings) -> list[tuple[Settings, Job]]:
    """Federated FedBN at ε = 4, adaptive and fixed clipping, both started from each bound."""
    return [(replace(base, initial_clip=c0, fixed_clip=c0), Job("federated", "fedbn", EPSILON, clip, 0))
            for c0 in bounds for clip in ("adaptive", "fixed")]


def rows_of(s: Settings, job: Job, res: Any) -> list[dict[str, Any]]:
    """One row per modality and per site of one run (test split)."""
    out = [{"initial_clip": s.initial_clip, "clipping": job.clipping, "scope": m, "modality": m, "dice": d}
           for m, d in res.modality_dice.items()]
    modality_of = {x.name: x.modality for x in load(s).sites}
    for site, d in res.site_dice.items():
        p = res.privacy.get(site) or {}
        out.append({"initial_clip": s.initial_clip, "clipping": job.clipping, "scope": site,
                    "modality": modality_of[site], "dice": d,
                    "final_clip": p.get("dp_clip"), "epsilon_spent": p.get("dp_epsilon")})
    return out


def verdicts(rows: list[dict[str, Any]], bounds: tuple[float, ...]) -> dict[str, Any]:
    """Per starting bound and modality: adaptive − fixed Dice points, and the mean over bounds."""
    def dice(c0: float, clip: str, m: str) -> float:
        return next(r["dice"] for r in rows if (r["initial_clip"], r["clipping"], r["scope"]) == (c0, clip, m))

    out: dict[str, Any] = {}
    for m in (PH2, MRI):
        diffs = {c0: 100 * (dice(c0, "adaptive", m) - dice(c0, "fixed", m)) for c0 in bounds}
        out[m] = {"adaptive_minus_fixed_points": {f"{c0:g}": round(v, 2) for c0, v in diffs.items()},
                  "mean_over_bounds_points": round(float(np.mean(list(diffs.values()))), 2),
                  "worst_adaptive": round(min(dice(c0, "adaptive", m) for c0 in bounds), 4),
                  "worst_fixed": round(min(dice(c0, "fixed", m) for c0 in bounds), 4)}
    return out


def main() -> None:
    """Run the six jobs on ``--workers`` single-threaded processes and write the rows."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    base = QUICK if args.quick else SETTINGS
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with pool(1 if args.quick else args.workers) as ex:
        futures = [(s, ex.submit(run_job, j, s, "test")) for s, j in jobs_for(BOUNDS, base)]
        for s, f in futures:
            job, res = f.result()
            rows += rows_of(s, job, res)
            print(f"  C0={s.initial_clip:<5g} {job.clipping:<8} "
                  f"{ {k: round(v, 3) for k, v in res.modality_dice.items()} } {res.seconds:.0f}s", flush=True)
    meta = {"split": "test (the bounds were declared before the run; nothing is chosen here)",
            "epsilon": EPSILON, "arm": "federated fedbn", "seed": 0, "bounds": list(BOUNDS),
            "optimizer": base.dp_optimizer, "lr": base.dp_lr, "target_quantile": base.target_quantile,
            "clip_lr": base.clip_lr, "rounds": base.rounds, "masks_note_mri": MASKS_NOTE,
            "verdict": verdicts(rows, BOUNDS), "wall_seconds": round(time.perf_counter() - t0, 1),
            "load_avg_1m_5m_15m": [round(v, 2) for v in os.getloadavg()]}
    path = write_rows("segment_clip_robustness", rows, quick=args.quick, meta=meta)
    print_table([r for r in rows if r["scope"] in (PH2, MRI)], ["initial_clip", "clipping", "scope", "dice"])
    print("verdict:", meta["verdict"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
