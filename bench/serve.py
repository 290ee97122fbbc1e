"""The diagnosis service under load (issue 6): the trained ResNet-18 at 224×224 served by the real
FastAPI app on loopback, driven by a separate client process with at least 500 requests at each of
concurrency 1, 4 and 16: p50/p99 end-to-end latency, requests per second, non-2xx count, and the
ratio of the service's p50 at concurrency 1 to the served artifact's own p50 at batch 1. Also the
expected calibration error on the test split before and after temperature scaling (fitted on the
validation split, as the coordinator does).

Targets on a 2-core CPU: 0 non-2xx, p99 < 1 s at concurrency 16, overhead at concurrency 1 <= 1.3x.

Dermoscopy rows (``model: dermoscopy``, ``bench/serve_dermoscopy.py``): the melanoma profile's
model with real ISIC JPEGs through the same API, p50/p99 at concurrency 1, 4, 16 and ECE on the
fixed ISIC test split after temperature scaling. ``--part xray|dermoscopy`` runs one half.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, write_rows

TOKEN = "bench-token-0123456789abcdef"


def drive(url: str, bodies: list[bytes], concurrency: int, total: int,
          content_type: str = "image/png") -> dict[str, float]:
    """Client side, in its own process: ``total`` requests with ``concurrency`` in flight."""
    import httpx

    def one(i: int, client: httpx.Client) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.post(f"{url}/v1/diagnose", content=bodies[i % len(bodies)],
                        headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
        return time.perf_counter() - t, r.status_code

    clients = [httpx.Client(timeout=60) for _ in range(concurrency)]
    for c in clients:  # warm the connections (and the model) outside the measurement
        one(0, c)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda i: one(i, clients[i % concurrency]), range(total)))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    lat = np.array([r[0] for r in results]) * 1000
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "requests_per_s": total / wall, "non_2xx": float(sum(1 for r in results if not 200 <= r[1] < 300))}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--part", choices=("all", "xray", "dermoscopy"), default="all")
    args = p.parse_args()
    n = 20 if args.quick else args.requests
    rows: list[dict[str, Any]] = []
    if args.part != "dermoscopy":
        rows += [{"model": "xray", **r} for r in xray_rows(args, n)]
    if args.part != "xray":
        from serve_dermoscopy import dermoscopy_rows

        derm = dermoscopy_rows(n, args.threads, args.quick, drive, TOKEN)
        print_table([r for r in derm if r["concurrency"] != "calibration"],
                    ["model", "concurrency", "requests", "p50_ms", "p99_ms", "requests_per_s", "non_2xx", "engine"])
        for r in derm:
            if r["concurrency"] == "calibration":
                print(f"dermoscopy calibration: ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f} "
                      f"(T = {r['temperature']:.3f}; test AUC {r['test_auc']:.3f} after {r['train_steps']} steps)")
            elif r["concurrency"] == 16:
                print(f"dermoscopy target: p99 at 16 {r['p99_ms']:.0f} ms (< 1000), non-2xx {int(r['non_2xx'])} (0)")
        rows += derm
    if args.part != "all":  # one half rerun: keep the other half's rows of the last run
        kept = "dermoscopy" if args.part == "xray" else "xray"
        previous, source = _previous_rows(args.quick)
        rows += [{"model": "xray", "kept_from_run": source, **r} for r in previous if r.get("model", "xray") == kept]
    print(f"rows: {write_rows('serve', rows, quick=args.quick)}")


def _previous_rows(quick: bool) -> tuple[list[dict[str, Any]], str]:
    """The rows of the last run's results file (rows without a ``model`` are the X-ray rows) and which run
    that was (its commit and date: kept rows say so, the file's meta names only the new half's run)."""
    import json

    from _common import RESULTS

    path = RESULTS / ("serve.quick.json" if quick else "serve.json")
    try:
        doc = json.loads(path.read_text())
        meta = doc.get("meta", {})
        return list(doc["rows"]), f"commit {meta.get('commit', 'not recorded')}, {meta.get('when', 'date unknown')}"
    except (OSError, ValueError, KeyError, AttributeError):
        return [], "none"


def xray_rows(args: Any, n: int) -> list[dict[str, Any]]:
    """The chest X-ray ResNet-18 at 224×224 (issue 6): latency at 1, 4, 16 and calibration rows."""

    import inference as ib  # bench/inference.py: the same trained ResNet-18 (cached weights)
    import torch
    from PIL import Image

    from edge_agent.api import create_app
    from edge_agent.api.settings import ApiSettings
    from edge_agent.audit import AuditLog
    from edge_agent.serving import ServedModel
    from edge_agent.store import LocalStore
    from export.engines import EngineArtifacts, select_engine
    from export.pipeline import export_model
    from fedscan.broker import free_port
    from fedscan.http import BackgroundServer
    from firmware.profile import find_profile
    from learning.calibration import expected_calibration_error, fit_temperature, softmax
    from learning.datasets import load_demo_splits
    from learning.models import build_model
    from protocol.manifest import InputSpec

    torch.set_num_threads(args.threads)
    cfg = ib.make_config(args.quick, args.threads)
    splits = load_demo_splits()
    real = len(splits["test"]) == 624
    model = ib.trained("resnet18_224", lambda: build_model("resnet18", in_channels=1, num_classes=2, stem="imagenet"),
                       splits["train"], real, steps=cfg.resnet_steps, batch=8, size=224, lr=5e-4, seed=0,
                       pre_steps=cfg.resnet_pre_steps, pre_batch=16, pre_size=112, pre_lr=2e-3)
    profile = find_profile("xray-gpu-224")
    spec = InputSpec(channels=1, height=224, width=224)
    val_x = ib.to_input(splits["val"].subset(np.arange(min(len(splits["val"]), 16 if args.quick else 256))), 224)
    test_n = 16 if args.quick else len(splits["test"])
    test = splits["test"].subset(np.arange(test_n))
    test_x = ib.to_input(test, 224)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedscan-serve-") as tmp:
        arts = export_model(model, input_spec=spec, calib_images=val_x[:128], verify_images=test_x,
                            verify_labels=test.labels, out_dir=Path(tmp) / "export", threads=args.threads)
        paths = {a.kind: Path(tmp) / "export" / a.uri for a in arts}
        engine, attempts = select_engine(EngineArtifacts(onnx_fp32=paths.get("onnx-fp32"),
                                                         onnx_int8=paths.get("onnx-int8"), precision="int8",
                                                         input_shape=(1, 224, 224)), ["ort-cpu"], threads=args.threads)
        # calibration: temperature fitted on validation logits, ECE on the test split
        val_logits = np.concatenate([engine.predict(val_x[i:i + 32]) for i in range(0, len(val_x), 32)])
        val_y = splits["val"].labels[: len(val_x)]
        temperature = fit_temperature(val_logits, val_y)
        test_logits = np.concatenate([engine.predict(test_x[i:i + 32]) for i in range(0, len(test_x), 32)])
        ece_before = expected_calibration_error(softmax(test_logits), test.labels)
        ece_after = expected_calibration_error(softmax(test_logits, temperature), test.labels)
        # the artifact's own latency at batch 1
        one = test_x[:1]
        for _ in range(5):
            engine.predict(one)
        own = []
        for _ in range(50 if not args.quick else 10):
            t = time.perf_counter()
            engine.predict(one)
            own.append((time.perf_counter() - t) * 1000)
        own_p50 = float(np.percentile(own, 50))

        served = ServedModel()
        served.swap(version="bench", engine=engine, classes=list(profile.model.classes), input=spec,
                    temperature=temperature, preprocessing=profile.preprocessing)
        settings = ApiSettings(environment="production", tokens={"bench": TOKEN})  # type: ignore[dict-item]
        app = create_app(settings, served, LocalStore(Path(tmp) / "store"), AuditLog(Path(tmp) / "audit.jsonl"),
                         accept=profile.input.model_copy(update={"modalities": []}), serving=profile.serving)
        port = free_port()
        server = BackgroundServer(app, "127.0.0.1", port)
        server.start()
        bodies = []
        for img in splits["test"].images[:32]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            bodies.append(buf.getvalue())
        try:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                for c in (1, 4, 16):
                    r = ex.submit(drive, f"http://127.0.0.1:{port}", bodies, c, n).result()
                    rows.append({"concurrency": c, "requests": n, **r, "engine": engine.name,
                                 "artifact_p50_ms": own_p50,
                                 "overhead_ratio_c1": r["p50_ms"] / own_p50 if c == 1 else None})
        finally:
            server.stop()
    rows.append({"concurrency": "calibration", "temperature": temperature, "ece_before": ece_before,
                 "ece_after": ece_after, "test_images": test_n})
    print_table([r for r in rows if r["concurrency"] != "calibration"],
                ["concurrency", "requests", "p50_ms", "p99_ms", "requests_per_s", "non_2xx", "engine",
                 "artifact_p50_ms", "overhead_ratio_c1"])
    print(f"engine: {engine.name} ({[(a.name, a.ok, a.reason) for a in attempts]})")
    print(f"calibration on the test split: ECE {ece_before:.4f} -> {ece_after:.4f} (T = {temperature:.3f}, "
          f"fitted on {len(val_x)} validation images)")
    c16 = next(r for r in rows if r["concurrency"] == 16)
    c1 = next(r for r in rows if r["concurrency"] == 1)
    print(f"targets: non-2xx {int(sum(r.get('non_2xx', 0) or 0 for r in rows))} (0), p99 at 16 "
          f"{c16['p99_ms']:.0f} ms (< 1000), overhead at 1 {c1['overhead_ratio_c1']:.2f}x (<= 1.3)")
    return rows


if __name__ == "__main__":
    main()
