"""The model the box serves, atomically swappable, and its calibrated answer.

:class:`ServedModel` holds one :class:`LoadedModel` (version, engine, classes, temperature,
preprocessing pipeline, input spec). ``swap`` replaces the reference under a lock; a request
takes the reference once when it starts and uses that model for preprocessing, inference and its
answer, so a swap in the middle of a request neither fails it nor mixes two models. The old engine
lives until its last request lets go of it; the installer keeps it for rollback.

Calibrated confidence: ``softmax(logits / T)``, T fitted on the coordinator's validation split and
shipped in the manifest (``calibration.temperature``); T = 1 when the manifest has none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from export.engines import InferenceEngine
from learning.dicom import Image, ImageRejected
from learning.transforms import Pipeline, build_pipeline
from protocol.errors import FedscanError, Reason
from protocol.manifest import InputSpec, Manifest
from protocol.preprocessing import PreprocessStep

log = logging.getLogger("fedscan.agent.serving")


class ServingError(FedscanError):
    """The box cannot diagnose now.

    Reasons: ``not_ready`` (no verified model loaded yet), ``overloaded`` (the queue or the
    decoders are full; ``detail`` has ``retry_after_s``), ``inference_failed`` (the engine raised or
    returned no finite (N, classes) logits; its words stay in the log), ``inference_timeout`` (no
    answer within the request timeout), ``internal_error`` (anything unexpected: a full disk, a bug;
    ``detail`` has the ``request_id`` that names its log lines).
    """

    reason = Reason.INFERENCE_FAILED


#: Refusals that are the box's own failure (counted as errors, not as rejected input).
FAILURES: frozenset[Reason] = frozenset({Reason.INFERENCE_FAILED, Reason.INFERENCE_TIMEOUT, Reason.INTERNAL_ERROR})


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model ready to serve. Identity matters: the batcher batches per instance."""

    version: str
    engine: InferenceEngine
    classes: tuple[str, ...]
    input: InputSpec
    temperature: float = 1.0
    preprocessing: tuple[PreprocessStep, ...] = ()
    calibrated: bool = False
    loaded_at: float = field(default_factory=time.time)
    pipeline: Pipeline = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Check the temperature and classes; build the preprocessing pipeline."""
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        object.__setattr__(self, "pipeline", build_pipeline(list(self.preprocessing)))

    def preprocess(self, img: Image) -> np.ndarray:
        """Run this model's preprocessing; the result must match its input spec."""
        x = self.pipeline(img)
        c, h, w = x.shape
        spec = self.input
        if c != spec.channels:
            raise ImageRejected(
                f"the image has {c} channel(s) after preprocessing, the model takes {spec.channels}",
                reason=Reason.WRONG_CHANNELS,
            )
        if (h, w) != (spec.height, spec.width):
            raise ImageRejected(
                f"the image is {h}x{w} after preprocessing, the model takes {spec.height}x{spec.width}",
                reason=Reason.WRONG_SIZE,
            )
        return x


class ServedModel:
    """The model the box serves now; ``swap`` changes it atomically."""

    def __init__(self) -> None:
        """Start with no model: requests are refused ``not_ready`` until the first swap."""
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []

    @property
    def ready(self) -> bool:
        """Whether a verified model is served."""
        return self._current is not None

    def current(self) -> LoadedModel:
        """Return the model served now (``not_ready`` when there is none)."""
        m = self._current  # one read of one reference: atomic
        if m is None:
            raise ServingError("no verified model is loaded yet", reason=Reason.NOT_READY)
        return m

    def add_listener(self, fn: Callable[[LoadedModel], None]) -> None:
        """Call ``fn(model)`` after every swap."""
        self._listeners.append(fn)

    def swap(
        self,
        *,
        version: str,
        engine: InferenceEngine,
        classes: Sequence[str],
        input: InputSpec,
        temperature: float | None = None,
        preprocessing: Sequence[PreprocessStep] = (),
    ) -> LoadedModel | None:
        """Serve a verified model from now on; returns the one it replaces (for rollback).

        The installer calls this only after verification and its smoke inference. Requests in
        flight finish on the model they started with.
        """
        new = LoadedModel(
            version=version,
            engine=engine,
            classes=tuple(classes),
            input=input,
            temperature=float(temperature) if temperature is not None else 1.0,
            preprocessing=tuple(preprocessing),
            calibrated=temperature is not None,
        )
        return self.swap_loaded(new)

    def swap_manifest(
        self,
        manifest: Manifest,
        engine: InferenceEngine,
        *,
        default_preprocessing: Sequence[PreprocessStep] = (),
    ) -> LoadedModel | None:
        """Swap in a model with everything but the engine taken from a verified manifest.

        When the manifest lists no preprocessing, the box's profile steps (``default_preprocessing``).
        """
        return self.swap(
            version=manifest.version,
            engine=engine,
            classes=manifest.classes,
            input=manifest.input,
            temperature=manifest.calibration.temperature if manifest.calibration else None,
            preprocessing=manifest.preprocessing or default_preprocessing,
        )

    def swap_loaded(self, new: LoadedModel) -> LoadedModel | None:
        """Serve ``new`` from now on; return the model it replaces."""
        with self._lock:
            old, self._current = self._current, new
        log.info("serving model %s on %s (was %s)", new.version, new.engine.name, old.version if old else None)
        for fn in self._listeners:
            try:
                fn(new)
            except Exception:
                log.exception("model swap listener failed")
        return old
