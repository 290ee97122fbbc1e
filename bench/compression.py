"""Compressed updates on the demo task (issue 4): codec × payload bytes per update (chunked, as the
transport counts them), ratio to the float32 update, encode/decode time, and final test accuracy
(mean of 3 seeds) after the same rounds and local epochs as the uncompressed run.

The federation runs in-process, but every update goes through the real frame encoder/decoder
and chunker; error-feedback residuals persist per site across rounds.

15 rounds of 1 local epoch, as in ``bench/federated.py``: the uncompressed model is close to its
plateau there. (At 6 rounds nothing has converged and the table measured how fast each codec
starts, not what it costs: top-k with error feedback sends its backlog over the later rounds.)

Reading the codec names: ``topk:F|ef|q:4`` feeds back only what top-k dropped and quantizes the
kept values stochastically; ``topk:F|q:1|ef`` sends the sign of each kept value with one mean
magnitude per tensor (ternary, as in Sattler et al.'s sparse ternary compression) and feeds back
the whole error. (The committed results also hold ``raw|zstd``, 1.08x, and
``delta|topk:0.03|ef|q:4|zstd``, 71.6x at -1.3 points, from the same run; they were dropped from
the default list afterwards to keep ``make bench`` under an hour: pass ``--codecs`` to add them.)
The last row is the verdict: the largest ratio whose mean accuracy is within
1 point of raw, and whether it reaches 50x.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_workers, parser, pool, print_table, write_rows

from fedscan import experiments
from fedscan.compose import model_spec_for
from firmware.profile import find_profile
from learning.datasets import load_demo_splits
from learning.partition import dirichlet_label_skew
from protocol.messages import TrainingConfig

CODECS = [
    "raw",
    "delta|q:8|zstd",
    "delta|q:4|zstd",
    "delta|q:2|zstd",
    "delta|topk:0.05|ef|q:4|zstd",
    "delta|topk:0.05|ef|q:2|zstd",
    "delta|topk:0.03|ef|q:2|zstd",
    "delta|topk:0.02|q:1|ef|zstd",
]
TARGET_RATIO, TARGET_POINTS = 50.0, 1.0


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--codecs", default=None, help="comma-separated subset (default: all)")
    args = p.parse_args()
    codecs = args.codecs.split(",") if args.codecs else CODECS
    if args.quick:
        args.rounds, args.seeds, codecs = 1, 1, ["raw", "delta|topk:0.01|ef|q:8|zstd"]
    spec = model_spec_for(find_profile("xray-cxr-28"))
    splits = load_demo_splits()
    train, test = splits["train"], splits["test"]
    if args.quick:
        train = train.subset(np.random.default_rng(0).permutation(len(train))[:600])
    training = TrainingConfig(local_epochs=1, batch_size=32, lr=0.003, momentum=0.9, loss="balanced_ce")
    t0 = time.perf_counter()
    with pool(default_workers(args.quick)) as ex:
        jobs = {}
        for seed in range(args.seeds):
            parts = dirichlet_label_skew(train.labels, 4, 0.5, seed=seed)
            for codec in codecs:
                jobs[(codec, seed)] = ex.submit(experiments.federated, spec, train, parts, test, rounds=args.rounds,
                                                training=training, seed=seed, threads=1, codec=codec)
        results = {k: f.result() for k, f in jobs.items()}
    n_params = sum(int(np.prod(s)) for s in _shapes(spec))
    float32 = 4 * n_params
    rows: list[dict[str, Any]] = []
    raw_acc = float(np.mean([results[("raw", s)].final["accuracy"] for s in range(args.seeds)]))
    for codec in codecs:
        runs = [results[(codec, s)] for s in range(args.seeds)]
        ups = [u for r in runs for u in r.uplink]
        acc = float(np.mean([r.final["accuracy"] for r in runs]))
        rows.append({
            "codec": codec,
            "bytes": float(np.mean([u["bytes"] for u in ups])),
            "float32_bytes": float32,
            "ratio": float32 / float(np.mean([u["bytes"] for u in ups])),
            "encode_ms": 1000 * float(np.median([u["encode_s"] for u in ups])),
            "decode_ms": 1000 * float(np.median([u["decode_s"] for u in ups])),
            "accuracy": acc,
            "accuracy_points_vs_raw": 100 * (acc - raw_acc),
            "balanced_accuracy": float(np.mean([r.final["balanced_accuracy"] for r in runs])),
            "auc": float(np.mean([r.final["auc"] for r in runs])),
            "seeds": args.seeds, "rounds": args.rounds,
            "within_1_point": bool(100 * (acc - raw_acc) >= -TARGET_POINTS),
        })
    passing = [r for r in rows if r["within_1_point"] and r["ratio"] >= TARGET_RATIO]
    best = max((r for r in rows if r["within_1_point"]), key=lambda r: r["ratio"])
    rows.append({"codec": "verdict: best ratio within 1 point of raw", "best_codec": best["codec"],
                 "ratio": best["ratio"], "accuracy_points_vs_raw": best["accuracy_points_vs_raw"],
                 "meets_target": bool(passing), "target_ratio": TARGET_RATIO})
    print_table(rows, ["codec", "bytes", "ratio", "encode_ms", "decode_ms", "accuracy", "accuracy_points_vs_raw",
                       "auc", "within_1_point"])
    print(f"small CNN ({n_params:,} float32 parameters = {float32:,} B), 4 sites, Dirichlet 0.5, "
          f"{args.rounds} rounds, {args.seeds} seeds; {time.perf_counter() - t0:.0f}s")
    name = "compression" if args.codecs is None else "compression-" + str(args.rounds) + "r"
    print(f"rows: {write_rows(name, rows, quick=args.quick)}")


def _shapes(spec: Any) -> list[tuple[int, ...]]:
    return [t.shape for t in experiments.initial(spec, 0).values()]


if __name__ == "__main__":
    main()
