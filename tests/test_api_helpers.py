"""Shared pieces for the serving tests (no tests here): a small real model behind an engine,
a box (store, audit, service, app) and uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import uvicorn
from fastapi import FastAPI

from edge_agent.api import ApiSettings, create_app
from edge_agent.audit import AuditLog
from edge_agent.serving import DiagnosisService, InferenceHook, MicroBatcher, ServedModel
from edge_agent.store import LocalStore
from firmware.profile import InputSection, find_profile
from learning.models import SmallCNN
from protocol.manifest import InputSpec

TOKEN = "test-token-0123456789abcdef"
CLASSES = ("normal", "pneumonia")
PROFILE = find_profile("xray-cxr-28")
INPUT_SPEC = InputSpec(channels=1, height=28, width=28)
# the stock profile's input section, widened to the modalities of the files pydicom ships
ACCEPT = PROFILE.input.model_copy(update={"modalities": ["DX", "CR", "OT", "CT", "MR"]})


class TorchTestEngine:
    """A real (small) torch model behind the ``InferenceEngine`` shape; ``delay_s`` stands in for
    a slower accelerator in the overload test."""

    def __init__(self, model: torch.nn.Module, name: str = "torch-test", delay_s: float = 0.0) -> None:
        self.model = model.eval()
        self.name = name
        self.delay_s = delay_s
        self.calls = 0
        self.batch_sizes: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.batch_sizes.append(int(batch.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).numpy().astype(np.float32)


def make_model(seed: int, in_channels: int = 1) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=in_channels, num_classes=len(CLASSES), width=8)


def install(served: ServedModel, version: str, seed: int, *, temperature: float | None = 1.7,
            delay_s: float = 0.0) -> TorchTestEngine:
    engine = TorchTestEngine(make_model(seed), delay_s=delay_s)
    served.swap(version=version, engine=engine, classes=CLASSES, input=INPUT_SPEC, temperature=temperature,
                preprocessing=PROFILE.preprocessing)
    return engine


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@contextmanager
def serve_http(app: FastAPI) -> Iterator[str]:
    """uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted sockets inherit it; without it a keep-alive client waits ~40 ms per request on
    # Nagle + delayed ACK (uvicorn sets it only on sockets it binds itself)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class Box:
    root: Path
    served: ServedModel
    store: LocalStore
    audit: AuditLog
    service: DiagnosisService
    app: FastAPI
    hooks: list[InferenceHook] = field(default_factory=list)
    url: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def running_box(
    root: Path, *, accept: InputSection = ACCEPT, max_batch: int = 8, max_wait_ms: float = 5.0,
    queue_size: int = 64, model: bool = True,
) -> Iterator[Box]:
    served = ServedModel()
    if model:
        install(served, "v1", seed=1)
    store = LocalStore(root / "store")
    audit = AuditLog(root / "audit.jsonl")
    settings = ApiSettings(tokens={"clinician": TOKEN})  # production rules: a real token
    hooks: list[InferenceHook] = []
    service = DiagnosisService(served, MicroBatcher(max_batch, max_wait_ms, queue_size), store, audit, accept,
                               on_inference_request=hooks)
    app = create_app(settings, served, store, audit, service=service)
    box = Box(root, served, store, audit, service, app, hooks)
    try:
        with serve_http(app) as url:
            box.url = url
            yield box
    finally:
        service.batcher.stop()
        store.close()
        audit.close()


def dicom_file(name: str) -> Path:
    """A DICOM file pydicom ships (no download: the bundled test files only)."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    assert isinstance(p, str), f"pydicom test file {name} not bundled"
    return Path(p)
