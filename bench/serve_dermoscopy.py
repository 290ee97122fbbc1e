"""Dermoscopy rows of ``bench/serve.py`` (issue 16): the melanoma model through the real API.

The dermoscope profile's model (``firmware_configs/dermoscope-melanoma.yaml``: small CNN, RGB
64×64) trained centrally on the ISIC UDA-1 training images with the default recipe
(``learning/recipe.py``: step budget, warm-up + cosine, class-balanced loss, the profile's MONAI
augmentation), exported to verified ONNX, served by the real FastAPI app with the profile's
preprocessing, and driven with the original ISIC JPEGs of the fixed test split (250×250: the
service decodes and resizes each one). Calibration: temperature fitted on the coordinator's
validation split, ECE on the fixed test split before and after. Used by ``bench/serve.py``; not
a bench of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

PROFILE = "dermoscope-melanoma"


def dermoscopy_rows(n: int, threads: int, quick: bool, drive: Callable[..., dict[str, float]],
                    token: str) -> list[dict[str, Any]]:
    """Latency rows at concurrency 1, 4 and 16 and one calibration row; [] without the ISIC data."""
    import torch

    from edge_agent.api import create_app
    from edge_agent.api.settings import ApiSettings
    from edge_agent.audit import AuditLog
    from edge_agent.serving import ServedModel
    from edge_agent.store import LocalStore
    from export.engines import EngineArtifacts, select_engine
    from export.pipeline import export_model
    from fedscan.broker import free_port
    from fedscan.compose import model_spec_for, spec_normalize
    from fedscan.http import BackgroundServer
    from firmware.profile import find_profile
    from learning import isic, recipe
    from learning.augment import build_augment
    from learning.binary_metrics import binary_report
    from learning.calibration import expected_calibration_error, fit_temperature, softmax
    from learning.models import build_model
    from learning.trainer import train_local

    root = isic.data_root(required=False)
    if root is None:
        print("dermoscopy rows skipped: isic-uda1 not in the shared data folder")
        return []
    profile = find_profile(PROFILE)
    spec = model_spec_for(profile)
    norm = spec_normalize(spec)
    splits = isic.load_splits(profile.input.height, steps=profile.preprocessing)
    steps = 10 if quick else recipe.ROUNDS * recipe.STEPS_PER_ROUND
    torch.manual_seed(0)
    model = build_model(spec.architecture, **spec.kwargs)
    cfg = recipe.default_training(1, steps)
    train_local(model, splits["train"], cfg, threads=threads, normalize=norm,
                augment=build_augment(profile.augmentation))
    model.eval()
    val_x = splits["val"].batch(None, norm)[0].numpy()
    test = splits["test"]
    test_x = test.batch(None, norm)[0].numpy()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedscan-serve-derm-") as tmp:
        arts = export_model(model, input_spec=spec.input, calib_images=val_x, verify_images=test_x,
                            verify_labels=test.labels, out_dir=Path(tmp) / "export", threads=threads)
        paths = {a.kind: Path(tmp) / "export" / a.uri for a in arts}
        shape = (spec.input.channels, spec.input.height, spec.input.width)
        engine, _ = select_engine(EngineArtifacts(onnx_fp32=paths.get("onnx-fp32"), onnx_int8=None, precision="fp32",
                                                  input_shape=shape), ["ort-cpu"], threads=threads)
        val_logits = engine.predict(val_x)
        temperature = fit_temperature(val_logits, splits["val"].labels)
        test_logits = engine.predict(test_x)
        before, after = softmax(test_logits), softmax(test_logits, temperature)
        quality = binary_report(test.labels, after[:, 1])
        served = ServedModel()
        served.swap(version="derm-bench", engine=engine, classes=list(profile.model.classes), input=spec.input,
                    temperature=temperature, preprocessing=profile.preprocessing)
        settings = ApiSettings(environment="production", tokens={"bench": token})  # type: ignore[dict-item]
        app = create_app(settings, served, LocalStore(Path(tmp) / "store"), AuditLog(Path(tmp) / "audit.jsonl"),
                         accept=profile.input, serving=profile.serving)
        port = free_port()
        server = BackgroundServer(app, "127.0.0.1", port)
        server.start()
        bodies = [(root / f"{i}.jpg").read_bytes() for i in test.ids[:32]]
        try:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                for c in (1, 4, 16):
                    r = ex.submit(drive, f"http://127.0.0.1:{port}", bodies, c, n, "image/jpeg").result()
                    rows.append({"model": "dermoscopy", "concurrency": c, "requests": n, **r, "engine": engine.name,
                                 "input": f"ISIC JPEG 250x250 -> {spec.input.height}x{spec.input.width} RGB"})
        finally:
            server.stop()
    rows.append({"model": "dermoscopy", "concurrency": "calibration", "temperature": temperature,
                 "ece_before": expected_calibration_error(before, test.labels),
                 "ece_after": expected_calibration_error(after, test.labels), "test_images": len(test),
                 "test_auc": quality["auc"], "train_steps": steps,
                 "split": "temperature on the validation split (88), ECE on the fixed ISIC test split (110)"})
    return rows
