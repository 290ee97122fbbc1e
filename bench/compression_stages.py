"""Micro-benchmark of the update codecs in ``protocol.codec``.

Part 1 -- size and speed: one ResNet-18-shaped update (11.7 M float32, 62 tensors;
``delta = N(0, 1e-3)``, i.e. no structure for the codecs to exploit, a worst case for
top-k and zstd) encoded with each pipeline; prints bytes, ratio vs float32, relative
L2 error of the delta, encode and decode wall time.

Part 2 -- accuracy proxy: FedAvg of a 784-128-2 MLP (numpy) on PneumoniaMNIST from
``../shared/data`` (8 IID clients, 1 local epoch per round); every client update
goes through the codec (with its own error-feedback state) and the coordinator
averages the decoded weights. Prints final test accuracy against the ``raw``
baseline. A small MLP is *not* ResNet-18: it is a sanity check that the pipelines
train, not a claim about the production model.

Usage: ``python bench/compression_stages.py [--quick] [--skip-fl] [--seeds N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.codec import ErrorFeedbackState, Tensors, parse_codec, specs_of

PIPELINES = [
    "raw",
    "raw|zstd",
    "delta|q:8|zstd",
    "delta|q:4|zstd",
    "delta|q:4:block=256|zstd",
    "delta|sign|zstd",
    "delta|sign:block=256|ef|zstd",
    "delta|topk:0.01|ef|q:8|zstd",
    "delta|topk:0.01:global|ef|q:8|zstd",
    "delta|topk:0.01|ef|q:4|zstd",
    "delta|topk:0.01|ef|sign|zstd",
    "delta|topk:0.01|q:8|ef|zstd",
    "delta|topk:0.001|ef|q:8|zstd",
]

FL_PIPELINES = [
    "raw",
    "delta|q:8|zstd",
    "delta|q:4|zstd",
    "delta|sign|zstd",
    "delta|sign:block=256|ef|zstd",
    "delta|topk:0.01|ef|q:8|zstd",
    "delta|topk:0.01|ef|sign|zstd",
    "delta|topk:0.01|q:8|zstd",  # no error feedback, for contrast
]


def resnet18_shapes(width: int = 64, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-18 (BN weight/bias only)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, 7, 7),
        "bn1.weight": (width,),
        "bn1.bias": (width,),
    }
    c_in = width
    for stage in range(4):
        c = width * 2**stage
        for blk in range(2):
            p = f"layer{stage + 1}.{blk}"
            shapes[f"{p}.conv1.weight"] = (c, c_in if blk == 0 else c, 3, 3)
            shapes[f"{p}.bn1.weight"] = (c,)
            shapes[f"{p}.bn1.bias"] = (c,)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes[f"{p}.bn2.weight"] = (c,)
            shapes[f"{p}.bn2.bias"] = (c,)
            if blk == 0 and c != c_in:
                shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                shapes[f"{p}.downsample.1.weight"] = (c,)
                shapes[f"{p}.downsample.1.bias"] = (c,)
        c_in = c
    shapes["fc.weight"] = (classes, c_in)
    shapes["fc.bias"] = (classes,)
    return shapes


def _flat(t: Tensors) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for v in t.values()])


def bench_sizes(quick: bool) -> None:
    rng = np.random.default_rng(0)
    shapes = resnet18_shapes(width=16 if quick else 64, classes=10 if quick else 1000)
    base = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}
    new = {k: (v + rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in base.items()}
    n = sum(v.size for v in new.values())
    raw_bytes = 4 * n
    delta = _flat(new).astype(np.float64) - _flat(base)
    print(f"ResNet-18-shaped update: {len(new)} tensors, {n:,} float32 = {raw_bytes / 1e6:.1f} MB")
    print(f"{'pipeline':38s} {'bytes':>11s} {'ratio':>8s} {'rel.L2 err':>10s} {'enc s':>7s} {'dec s':>7s}")
    for spec in PIPELINES:
        p = parse_codec(spec)
        state = ErrorFeedbackState() if p.needs_state else None
        t0 = time.perf_counter()
        payload = p.encode(new, base=base, state=state, seed=1)
        t1 = time.perf_counter()
        out = p.decode(payload, specs=specs_of(new), base=base)
        t2 = time.perf_counter()
        err = _flat(out).astype(np.float64) - _flat(new)
        rel = float(np.linalg.norm(err) / np.linalg.norm(delta))
        print(
            f"{p.spec:38s} {len(payload):11,d} {raw_bytes / len(payload):7.1f}x {rel:10.3g} "
            f"{t1 - t0:7.3f} {t2 - t1:7.3f}"
        )


# ------------------------------------------------------------------ FL accuracy proxy
def _load_pneumonia() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pneumoniamnist.npz"
    if not path.exists():
        return None
    z = np.load(path)
    xtr = z["train_images"].reshape(len(z["train_images"]), -1).astype(np.float32) / 255.0
    xte = z["test_images"].reshape(len(z["test_images"]), -1).astype(np.float32) / 255.0
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0) + 1e-6
    return (xtr - mu) / sd, z["train_labels"].ravel().astype(np.int64), (xte - mu) / sd, z["test_labels"].ravel()


def _init_mlp(rng: np.random.Generator, d: int, h: int = 128, k: int = 2) -> Tensors:
    return {
        "fc1.weight": (rng.standard_normal((h, d)) * np.sqrt(2.0 / d)).astype(np.float32),
        "fc1.bias": np.zeros(h, np.float32),
        "fc2.weight": (rng.standard_normal((k, h)) * np.sqrt(1.0 / h)).astype(np.float32),
        "fc2.bias": np.zeros(k, np.float32),
    }


def _forward(w: Tensors, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hid = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    return hid, hid @ w["fc2.weight"].T + w["fc2.bias"]


def _local_epoch(
    w: Tensors, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lr: float = 0.05, bs: int = 32
) -> Tensors:
    w = {k: v.copy() for k, v in w.items()}
    order = rng.permutation(len(x))
    for i in range(0, len(x), bs):
        idx = order[i : i + bs]
        xb, yb = x[idx], y[idx]
        hid, logits = _forward(w, xb)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        g = p / len(yb)
        dh = (g @ w["fc2.weight"]) * (hid > 0)
        w["fc2.weight"] -= lr * (g.T @ hid)
        w["fc2.bias"] -= lr * g.sum(axis=0)
        w["fc1.weight"] -= lr * (dh.T @ xb)
        w["fc1.bias"] -= lr * dh.sum(axis=0)
    return w


def fedavg(
    spec: str, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], rounds: int, seed: int
) -> tuple[float, int]:
    xtr, ytr, xte, yte = data
    rng = np.random.default_rng(seed)
    glob = _init_mlp(rng, xtr.shape[1])
    clients = np.array_split(rng.permutation(len(xtr)), 8)
    p = parse_codec(spec)
    states = [ErrorFeedbackState() for _ in clients]
    sent = 0
    for r in range(rounds):
        acc: dict[str, np.ndarray] = {k: np.zeros_like(v, dtype=np.float64) for k, v in glob.items()}
        for c, idx in enumerate(clients):
            local = _local_epoch(glob, xtr[idx], ytr[idx], rng)
            payload = p.encode(local, base=glob, state=states[c] if p.needs_state else None, seed=r * 100 + c)
            sent += len(payload)
            got = p.decode(payload, specs=specs_of(glob), base=glob)
            for k in acc:
                acc[k] += got[k] * (len(idx) / len(xtr))
        glob = {k: v.astype(np.float32) for k, v in acc.items()}
    pred = _forward(glob, xte)[1].argmax(axis=1)
    return float(np.mean(pred == yte)), sent // (rounds * len(clients))


def bench_fl(quick: bool, seeds: int) -> None:
    data = _load_pneumonia()
    if data is None:
        print("!!! ../shared/data/pneumoniamnist.npz not found: skipping the FedAvg accuracy proxy")
        return
    rounds = 10 if quick else 30
    n_params = sum(v.size for v in _init_mlp(np.random.default_rng(0), data[0].shape[1]).values())
    print(
        f"\nFedAvg MLP 784-128-2 on PneumoniaMNIST ({n_params:,} params), 8 clients, {rounds} rounds, "
        f"{seeds} seed(s); test accuracy (mean over seeds)"
    )
    print(f"{'pipeline':38s} {'acc %':>7s} {'vs raw':>8s} {'bytes/upd':>10s} {'ratio':>8s}")
    ref = None
    for spec in FL_PIPELINES:
        accs, sizes = zip(*(fedavg(spec, data, rounds, s) for s in range(seeds)), strict=True)
        acc = 100 * float(np.mean(accs))
        ref = acc if ref is None else ref
        print(
            f"{spec:38s} {acc:7.2f} {acc - ref:+8.2f} {int(np.mean(sizes)):10,d} {4 * n_params / np.mean(sizes):7.1f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small model, few rounds")
    ap.add_argument("--skip-fl", action="store_true", help="only the size/speed table")
    ap.add_argument("--seeds", type=int, default=None, help="FL seeds (default 1 quick, 3 full)")
    args = ap.parse_args()
    bench_sizes(args.quick)
    if not args.skip_fl:
        bench_fl(args.quick, args.seeds or (1 if args.quick else 3))


if __name__ == "__main__":
    main()
