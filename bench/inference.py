"""Inference benchmark: torch eager vs ONNX Runtime FP32 / INT8 (+ CUDA / TensorRT where present).

For the trained demo model (SmallCNN, 28×28) and ResNet-18 at 224×224 (PneumoniaMNIST upsampled),
both trained briefly on the real train split, exported with ``export.export_model`` (verified on the
test split, INT8 calibrated on the validation split): p50 / p99 latency and throughput at batch 1
and 8 with the same thread count for every engine, top-1 agreement with torch eager and accuracy on
the test split. Also: SmallCNN trained with QAT, whose INT8 export is compared with the FP32 model
trained without QAT. Writes ``bench/results/inference.json`` as ``{"rows": [...], ...}``.

    .venv/bin/python bench/inference.py            # full (~5-8 min on 2 cores)
    .venv/bin/python bench/inference.py --quick    # CI smoke, < 60 s: fewer steps, images, iterations
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import standard_meta  # noqa: E402
from torch import nn  # noqa: E402

from export.engines import EngineArtifacts, InferenceEngine, TorchEngine, make_engine  # noqa: E402
from export.errors import ExportError, describe  # noqa: E402
from export.int8 import quantize_int8  # noqa: E402
from export.pipeline import FP32_NAME, INT8_NAME, export_model  # noqa: E402
from export.tensorrt_build import tensorrt_status  # noqa: E402
from export.verify import batched  # noqa: E402
from firmware.profile import ExportTarget  # noqa: E402
from learning.datasets import ArrayDataset, load_demo_splits  # noqa: E402
from learning.models import build_model  # noqa: E402
from learning.qat import freeze_observers, prepare_qat, to_float  # noqa: E402
from protocol.manifest import InputSpec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "inference.json"
CACHE = ROOT / "out" / "bench-cache"
TARGET_SPEEDUP = 2.0
TARGET_AGREEMENT = 0.99


@dataclass(frozen=True)
class Config:
    quick: bool
    threads: int
    small_steps: int
    resnet_steps: int  # at 224x224, batch 8, after resnet_pre_steps at 112x112, batch 16
    resnet_pre_steps: int
    resnet_test: int  # test images for ResNet-18 agreement/accuracy (0 = all)
    calib: int
    iters_b1: int
    iters_b8: int


def make_config(quick: bool, threads: int) -> Config:
    if quick:
        return Config(True, threads, small_steps=50, resnet_steps=1, resnet_pre_steps=2, resnet_test=16, calib=8, iters_b1=5,
                      iters_b8=2)
    return Config(False, threads, small_steps=600, resnet_steps=40, resnet_pre_steps=160, resnet_test=0, calib=128, iters_b1=100,
                  iters_b8=30)


# -- data and training ------------------------------------------------------------------------------
def to_input(ds: ArrayDataset, size: int) -> np.ndarray:
    """Normalized float32 NCHW at ``size`` (bilinear upsampling from 28×28 for ResNet-18 at 224)."""
    x, _ = ds.batch()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy()


def _train_phase(m: nn.Module, ds: ArrayDataset, p: np.ndarray, rng: np.random.Generator, *, steps: int,
                 batch: int, size: int, lr: float, qat: bool) -> None:
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        if qat and step == int(0.8 * steps):
            freeze_observers(m)
        idx = rng.choice(len(ds), size=batch, p=p)
        x, y = ds.batch(idx)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"    {size}x{size} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)


def train(model: nn.Module, ds: ArrayDataset, *, steps: int, batch: int, size: int, lr: float, seed: int,
          qat: bool = False, pre_steps: int = 0, pre_batch: int = 0, pre_size: int = 0, pre_lr: float = 0.0
          ) -> nn.Module:
    """Adam with class-balanced sampling (the train split is 1:3), so predictions are not one class.
    ``pre_*``: a cheaper first phase at a lower resolution (progressive resizing), then ``size``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    counts = ds.class_counts()
    p = (1.0 / counts)[ds.labels]
    p /= p.sum()
    model.train()
    if pre_steps:  # float first (progressive resizing; for QAT: float pre-training, then QAT fine-tuning)
        _train_phase(model, ds, p, rng, steps=pre_steps, batch=pre_batch, size=pre_size, lr=pre_lr, qat=False)
    m = prepare_qat(model) if qat else model
    m.train()
    _train_phase(m, ds, p, rng, steps=steps, batch=batch, size=size, lr=lr, qat=qat)
    m.eval()
    return m


def trained(name: str, build: Callable[[], nn.Module], ds: ArrayDataset, real: bool, **kw: Any) -> nn.Module:
    """Train, or load the weights a previous run trained with the same settings on the same data."""
    key = hashlib.sha256(json.dumps([name, kw, real, len(ds), int(ds.labels.sum())], sort_keys=True).encode())
    path = CACHE / f"{name}-{key.hexdigest()[:12]}.pt"
    model = build()
    qat = bool(kw.get("qat"))
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        print(f"  {name}: loaded weights trained by an earlier run ({path.relative_to(ROOT)})")
        return model.eval()
    t = time.perf_counter()
    m = train(model, ds, **kw)
    m = to_float(m) if qat else m  # QAT-trained weights, exported as a float model then INT8-calibrated
    print(f"  {name}: trained {kw.get('pre_steps', 0) + kw['steps']} steps in {time.perf_counter() - t:.1f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), path)
    return m.eval()


# -- measurement ------------------------------------------------------------------------------------
def latencies(engines: list[InferenceEngine], x: np.ndarray, iters: int, rounds: int = 5
              ) -> list[tuple[float, float, float, float]]:
    """(p50 ms, p99 ms, images/s, min ms) of ``engine.predict(x)`` per engine, after warm-up.

    Engines are interleaved in ``rounds`` so that load from other processes on a shared machine
    falls on all of them alike instead of on whichever ran at the wrong moment."""
    for engine in engines:
        for _ in range(max(2, iters // 10)):
            engine.predict(x)
    times: list[list[float]] = [[] for _ in engines]
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            for _ in range(per_round):
                t = time.perf_counter()
                engine.predict(x)
                times[i].append(time.perf_counter() - t)
    out = []
    for ts in times:
        ms = np.array(ts) * 1e3
        out.append((float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(len(x) * 1e3 / ms.mean()),
                    float(ms.min())))
    return out


def bench_model(model_name: str, model: nn.Module, size: int, splits: dict[str, ArrayDataset], cfg: Config,
                out_dir: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    test = splits["test"]
    n_test = len(test) if cfg.resnet_test == 0 or size <= 64 else min(cfg.resnet_test, len(test))
    test_x = to_input(test.subset(np.arange(n_test)), size)
    test_y = test.labels[:n_test]
    calib_x = to_input(splits["val"].subset(np.arange(min(cfg.calib, len(splits["val"])))), size)
    spec = InputSpec(channels=1, height=size, width=size)
    t = time.perf_counter()
    targets = [ExportTarget(name="cuda-fp16", device="cuda", precision="fp16"),
               ExportTarget(name="cuda-int8", device="cuda", precision="int8")]
    artifacts = export_model(model, input_spec=spec, calib_images=calib_x, verify_images=test_x,
                             verify_labels=test_y, out_dir=out_dir, targets=targets, threads=cfg.threads)
    print(f"  {model_name}: exported + verified {[a.kind for a in artifacts]} in {time.perf_counter() - t:.1f} s")
    report = json.loads((out_dir / "export_report.json").read_text())
    for s in report["skipped"]:
        skipped.append({"model": model_name, "engine": s["kind"] + (f" {s['target']}" if "target" in s else ""),
                        "reason": s["reason"]})
    verified = {a.kind: a for a in artifacts}
    int8_path = out_dir / INT8_NAME
    if "onnx-int8" not in verified:  # measured anyway so the figure is on record, but marked unverified
        quantize_int8(out_dir / FP32_NAME, int8_path, calib_images=calib_x)

    engines: list[tuple[InferenceEngine, bool, str]] = [
        (TorchEngine(model, threads=cfg.threads), True, "torch eager (reference)"),
        (make_engine("ort-cpu", EngineArtifacts(onnx_fp32=out_dir / FP32_NAME), threads=cfg.threads),
         "onnx-fp32" in verified, FP32_NAME),
        (make_engine("ort-cpu", EngineArtifacts(onnx_int8=int8_path, precision="int8"), threads=cfg.threads),
         "onnx-int8" in verified, INT8_NAME),
    ]
    for label, name, arts in (
        ("torch-cuda", "torch-cuda", EngineArtifacts(torch_model=model)),
        ("torch-cuda-fp16", "torch-cuda", EngineArtifacts(torch_model=model, precision="fp16")),
        ("torch-cuda-fp16-graphs", "torch-cuda",
         EngineArtifacts(torch_model=model, precision="fp16", cuda_graphs=True)),
        ("ort-cuda", "ort-cuda", EngineArtifacts(onnx_fp32=out_dir / FP32_NAME)),
    ):
        try:
            engines.append((make_engine(name, arts, threads=cfg.threads), True, label))
        except (ExportError, RuntimeError) as exc:
            skipped.append({"model": model_name, "engine": label, "reason": describe(exc)})
    for a in artifacts:
        if a.kind == "tensorrt":
            engines.append((make_engine("tensorrt", EngineArtifacts(tensorrt_engine=out_dir / a.uri,
                                                                    precision=str(a.verification["precision"]))),  # type: ignore[arg-type]
                            True, a.uri))

    ref = batched(engines[0][0].predict, test_x, batch_size=8)
    ref_top1 = ref.argmax(1)
    quality = []
    for engine, _, _ in engines:
        logits = ref if engine is engines[0][0] else batched(engine.predict, test_x, batch_size=8)
        quality.append(logits.argmax(1))
    for b, iters in ((1, cfg.iters_b1), (8, cfg.iters_b8)):
        x = test_x[:b] if len(test_x) >= b else np.repeat(test_x[:1], b, axis=0)
        timings = latencies([e for e, _, _ in engines], x, iters)
        base = timings[0][0]
        for (engine, is_verified, artifact), top1, (p50, p99, thr, best) in zip(engines, quality, timings,
                                                                                 strict=True):
            rows.append({
                "model": model_name, "input": f"{size}x{size}", "engine": engine.name, "artifact": artifact,
                "verified": bool(is_verified), "batch": b, "threads": cfg.threads, "iters": iters,
                "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "min_ms": round(best, 3),
                "throughput_per_s": round(thr, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
                "speedup_vs_torch_p50": round(base / p50, 3),
                "agreement": round(float(np.mean(top1 == ref_top1)), 4),
                "accuracy": round(float(np.mean(top1 == test_y)), 4),
                "predicted_positive_share": round(float(top1.mean()), 4), "test_images": len(test_x),
            })


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["model", "engine", "batch", "p50_ms", "p99_ms", "min_ms", "throughput_per_s", "speedup_vs_torch_p50",
            "agreement", "accuracy", "verified"]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="CI smoke: fewer steps, images and iterations (< 60 s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {RESULTS.relative_to(ROOT)} ({RESULTS.stem}.quick.json with --quick)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cfg = make_config(args.quick, args.threads)
    if args.out is None:
        args.out = RESULTS.with_suffix(".quick.json") if args.quick else RESULTS
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    splits = load_demo_splits()
    real = len(splits["test"]) == 624  # the shared PneumoniaMNIST test split
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    trt_ok, trt_reason = tensorrt_status()
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedscan-bench-") as tmp:
        print("== SmallCNN 28x28 (demo model)")
        small = trained("small_cnn", lambda: build_model("small_cnn"), splits["train"], real,
                        steps=cfg.small_steps, batch=64, size=28, lr=3e-3, seed=0)
        bench_model("small_cnn", small, 28, splits, cfg, Path(tmp) / "small", rows, skipped)

        print("== SmallCNN 28x28 trained with QAT (INT8 export vs FP32 without QAT)")
        # QAT as fine-tuning of a float model (as agents do each round from the float global model):
        # 80 % of the steps float, 20 % with fake-quant; the same total steps as the FP32 model
        qat_steps = max(1, cfg.small_steps // 5)
        small_qat = trained("small_cnn_qat", lambda: build_model("small_cnn"), splits["train"], real,
                            steps=qat_steps, batch=64, size=28, lr=1e-3, seed=0, qat=True,
                            pre_steps=cfg.small_steps - qat_steps, pre_batch=64, pre_size=28, pre_lr=3e-3)
        bench_model("small_cnn_qat", small_qat, 28, splits, cfg, Path(tmp) / "small_qat", rows, skipped)
        acc = {r["model"] + "/" + r["engine"]: r["accuracy"] for r in rows if r["batch"] == 1}
        extra["qat"] = {
            "fp32_no_qat_accuracy": acc.get("small_cnn/torch"),
            "qat_int8_accuracy": acc.get("small_cnn_qat/ort-cpu-int8"),
            "no_qat_int8_accuracy": acc.get("small_cnn/ort-cpu-int8"),
        }
        q = extra["qat"]
        if q["fp32_no_qat_accuracy"] is not None and q["qat_int8_accuracy"] is not None:
            q["loss_points"] = round(100 * (q["fp32_no_qat_accuracy"] - q["qat_int8_accuracy"]), 2)

        print("== ResNet-18 224x224 (imagenet stem, GroupNorm), PneumoniaMNIST upsampled")
        resnet = trained("resnet18_224", lambda: build_model("resnet18", in_channels=1, num_classes=2,
                                                             stem="imagenet"),
                         splits["train"], real, steps=cfg.resnet_steps, batch=8, size=224, lr=5e-4, seed=0,
                         pre_steps=cfg.resnet_pre_steps, pre_batch=16, pre_size=112, pre_lr=2e-3)
        bench_model("resnet18", resnet, 224, splits, cfg, Path(tmp) / "resnet18", rows, skipped)

    print_table(rows)
    cpu_rows = [r for r in rows if r["model"] == "resnet18" and r["batch"] == 1 and "cuda" not in r["engine"]
                and "tensorrt" not in r["engine"] and r["engine"] != "torch"]
    # agreement only means something when the model does not predict one class for everything
    ok_rows = [r for r in cpu_rows if r["verified"] and r["agreement"] >= TARGET_AGREEMENT
               and 0.0 < r["predicted_positive_share"] < 1.0]
    best = max(ok_rows, key=lambda r: r["speedup_vs_torch_p50"], default=None)
    verdict = {
        "target": f">= {TARGET_SPEEDUP}x torch eager at batch 1, 224x224, agreement >= {TARGET_AGREEMENT}",
        "best_engine": best["engine"] if best else None,
        "best_speedup": best["speedup_vs_torch_p50"] if best else None,
        "met": bool(best and best["speedup_vs_torch_p50"] >= TARGET_SPEEDUP),
    }
    if cfg.quick:
        verdict["note"] = "quick mode: smoke run with a barely trained model; figures are not the measurement"
    print(f"\nfastest verified CPU artifact, ResNet-18 224 batch 1: {verdict}")
    print(f"QAT: {extra['qat']}")
    for s in skipped:
        print(f"skipped {s['model']} {s['engine']}: {s['reason']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**standard_meta(quick=cfg.quick), "threads": cfg.threads, "real_data": real, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "tensorrt": trt_reason, "tensorrt_available": trt_ok,
            "load_avg_1m_5m_15m_at_end": [round(v, 2) for v in os.getloadavg()], "seconds": round(time.perf_counter() - t0, 1)}
    args.out.write_text(json.dumps({"rows": rows, "skipped": skipped, "target": verdict, **extra, "meta": meta},
                                   indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
          f"in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
