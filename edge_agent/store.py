"""The box's local image store: images never leave the box; findings make them training examples.

SQLite (``store.db``, WAL) for the records, a folder per study for the pixels:

- ``input.npy``: the preprocessed model input (float32, C×H×W), exactly what the model saw;
  :meth:`LocalStore.training_examples` hands these (with the clinicians' labels) to the trainer.
- ``source.dcm`` (DICOM, de-identified by the PS3.15 Basic Profile, nested sequences, private
  tags, curves and overlays included: :mod:`edge_agent.deid`) or ``source.npy``
  (decoded PNG/JPEG pixels, which drops any text chunk or EXIF block), so a later model with
  other preprocessing can re-learn from the originals.

A study id is random (``secrets.token_hex``), never derived from the patient or the file. The
retention limit (age and total bytes) is applied after every ingest, oldest first. Burned-in
annotations inside the pixels are not detected or removed; an image that declares them
(``BurnedInAnnotation = YES``) is kept and diagnosed but never becomes a training example.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from edge_agent.deid import deidentify, has_burned_in_annotation
from protocol.errors import FedscanError, Reason


class StudyNotFound(FedscanError, KeyError):
    """No study with this id on this box (reason ``unknown_study``; the id is in ``detail``)."""

    reason = Reason.UNKNOWN_STUDY

    def __init__(self, study_id: str) -> None:
        """Name the study that is not on this box (in ``detail``)."""
        super().__init__("no study with this id on this box", detail={"study_id": study_id})


@dataclass
class StudyRecord:
    """One study's row: where it came from, its diagnosis and its confirmed finding."""

    study_id: str
    created_at: float
    source: str
    content_type: str
    modality: str | None
    model_version: str | None = None
    engine: str | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    finding: str | None = None
    finding_at: float | None = None
    finding_by: str | None = None
    bytes: int = 0


@dataclass
class TrainingExamples:
    """Confirmed examples for the local trainer.

    ``x`` float32 (N, C, H, W); ``labels`` strings; ``y`` class indices when ``classes`` was given
    (examples whose label is not a class are left out).
    """

    x: np.ndarray
    labels: list[str]
    study_ids: list[str]
    y: np.ndarray | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    content_type TEXT NOT NULL,
    modality TEXT,
    input_shape TEXT NOT NULL,
    model_version TEXT,
    engine TEXT,
    label TEXT,
    confidence REAL,
    probabilities TEXT,
    finding TEXT,
    finding_at REAL,
    finding_by TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    burned_in INTEGER NOT NULL DEFAULT 0,
    pending_by TEXT
);
CREATE INDEX IF NOT EXISTS studies_created ON studies(created_at);
"""


class LocalStore:
    """The box's studies: SQLite records and a folder per study (see the module doc)."""

    def __init__(
        self,
        root: str | Path,
        *,
        max_age_s: float | None = 90 * 24 * 3600.0,
        max_bytes: int | None = 2 * 1024**3,
    ) -> None:
        """Open (or create) the store under ``root`` with its retention limits (``None``: no limit)."""
        self.root = Path(root)
        self.studies_dir = self.root / "studies"
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "store.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(studies)")}
        if "burned_in" not in columns:  # a store made before the flag existed
            self._db.execute("ALTER TABLE studies ADD COLUMN burned_in INTEGER NOT NULL DEFAULT 0")
        if "pending_by" not in columns:
            self._db.execute("ALTER TABLE studies ADD COLUMN pending_by TEXT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # -- writes ---------------------------------------------------------------------------------
    def ingest(
        self,
        *,
        source: str,
        content_type: str,
        model_input: np.ndarray | None,
        modality: str | None = None,
        dataset: Dataset | None = None,
        pixels: np.ndarray | None = None,
        now: float | None = None,
        pending_caller: str | None = None,
    ) -> str:
        """Keep one image; returns its new random study id. ``dataset`` is de-identified here.

        Without ``model_input`` (no model was installed yet) the study waits for its diagnosis,
        on behalf of ``pending_caller``, in arrival order (:meth:`pending`).
        """
        if model_input is None and (pending_caller is None or dataset is None):
            raise ValueError("only a DICOM study can wait for its diagnosis, and it needs the caller")
        study_id = secrets.token_hex(16)
        folder = self.studies_dir / study_id
        folder.mkdir()
        try:
            if model_input is not None:
                np.save(folder / "input.npy", np.asarray(model_input, dtype=np.float32))
            burned_in = has_burned_in_annotation(dataset)
            if dataset is not None:
                deidentify(dataset)
                dataset.save_as(folder / "source.dcm", enforce_file_format=True)
            elif pixels is not None:
                np.save(folder / "source.npy", pixels)
            size = sum(p.stat().st_size for p in folder.iterdir())
            created = time.time() if now is None else now
            shape = json.dumps(list(np.shape(model_input)) if model_input is not None else [])
            with self._lock:
                self._db.execute(
                    "INSERT INTO studies (study_id, created_at, source, content_type, modality, input_shape, bytes,"
                    " burned_in, pending_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (study_id, created, source, content_type, modality, shape, size, int(burned_in),
                     pending_caller if model_input is None else None),
                )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.enforce_retention(now=now, keep=study_id)
        return study_id

    def pending(self) -> list[tuple[str, str]]:
        """Studies waiting for a model, oldest first, with the caller each is diagnosed for."""
        with self._lock:
            rows = self._db.execute("SELECT study_id, pending_by FROM studies WHERE pending_by IS NOT NULL"
                                    " ORDER BY created_at, rowid").fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def source_bytes(self, study_id: str) -> bytes:
        """Return the stored (de-identified) DICOM file of a study."""
        return (self.studies_dir / study_id / "source.dcm").read_bytes()

    def complete_pending(self, study_id: str, model_input: np.ndarray | None) -> None:
        """Stop a study waiting: with its model input (diagnosed), or without (refused by the model)."""
        folder = self.studies_dir / study_id
        if model_input is not None:
            np.save(folder / "input.npy", np.asarray(model_input, dtype=np.float32))
        size = sum(p.stat().st_size for p in folder.iterdir())
        shape = json.dumps(list(np.shape(model_input)) if model_input is not None else [])
        with self._lock:
            self._db.execute("UPDATE studies SET pending_by=NULL, input_shape=?, bytes=? WHERE study_id=?",
                             (shape, size, study_id))

    def record_diagnosis(
        self, study_id: str, *, model_version: str, engine: str, label: str, confidence: float,
        probabilities: dict[str, float],
    ) -> None:
        """Record the served model's answer for a study."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE studies SET model_version=?, engine=?, label=?, confidence=?, probabilities=?"
                " WHERE study_id=?",
                (model_version, engine, label, confidence, json.dumps(probabilities), study_id),
            )
        if cur.rowcount == 0:
            raise StudyNotFound(study_id)

    def record_finding(self, study_id: str, label: str, by: str, now: float | None = None) -> StudyRecord:
        """Record the clinician's confirmed label: from now on the study is a training example."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE studies SET finding=?, finding_at=?, finding_by=? WHERE study_id=?",
                (label, time.time() if now is None else now, by, study_id),
            )
        if cur.rowcount == 0:
            raise StudyNotFound(study_id)
        return self.get(study_id)

    def delete(self, study_id: str) -> None:
        """Delete a study: its row and its folder."""
        with self._lock:
            self._db.execute("DELETE FROM studies WHERE study_id=?", (study_id,))
        shutil.rmtree(self.studies_dir / study_id, ignore_errors=True)

    def enforce_retention(self, now: float | None = None, keep: str | None = None) -> int:
        """Delete studies older than ``max_age_s``, then the oldest until under ``max_bytes``."""
        now = time.time() if now is None else now
        doomed: list[str] = []
        with self._lock:
            if self.max_age_s is not None:
                doomed += [r[0] for r in self._db.execute(
                    "SELECT study_id FROM studies WHERE created_at < ?", (now - self.max_age_s,))]
            if self.max_bytes is not None:
                rows = list(self._db.execute("SELECT study_id, bytes FROM studies ORDER BY created_at, rowid"))
                total = sum(b for sid, b in rows if sid not in doomed)
                for sid, b in rows:
                    if total <= self.max_bytes:
                        break
                    if sid in doomed or sid == keep:
                        continue
                    doomed.append(sid)
                    total -= b
        for sid in doomed:
            self.delete(sid)
        return len(doomed)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, study_id: str) -> StudyRecord:
        """Return one study (``StudyNotFound`` when there is none)."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM studies WHERE study_id=?", (study_id,)).fetchone()
        if row is None:
            raise StudyNotFound(study_id)
        return _record(row)

    def list(self, limit: int = 50, source: str | None = None) -> list[StudyRecord]:
        """Return the newest studies, optionally of one source."""
        q = f"SELECT {_COLUMNS} FROM studies"
        args: list[Any] = []
        if source is not None:
            q += " WHERE source=?"
            args.append(source)
        q += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [_record(r) for r in rows]

    def total_bytes(self) -> int:
        """Return the bytes the studies take on disk."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM studies").fetchone()[0])

    def study_dir(self, study_id: str) -> Path:
        """Return the folder of a study."""
        return self.studies_dir / study_id

    def training_examples(
        self, classes: Sequence[str] | None = None, shape: Sequence[int] | None = None
    ) -> TrainingExamples:
        """Studies with a confirmed finding, as model inputs and labels (for the local trainer)."""
        q = ("SELECT study_id, finding, input_shape FROM studies WHERE finding IS NOT NULL AND burned_in = 0"
             " ORDER BY created_at")  # burned-in text in the pixels: never a training example
        with self._lock:
            rows = self._db.execute(q).fetchall()
        xs: list[np.ndarray] = []
        labels: list[str] = []
        ids: list[str] = []
        for sid, finding, shp in rows:
            if shape is not None and json.loads(shp) != list(shape):
                continue
            if classes is not None and finding not in classes:
                continue
            try:
                xs.append(np.load(self.studies_dir / sid / "input.npy"))
            except OSError:
                continue  # removed by retention meanwhile
            labels.append(finding)
            ids.append(sid)
        x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, *(shape or (0,))), dtype=np.float32)
        y = None
        if classes is not None:
            index = {c: i for i, c in enumerate(classes)}
            y = np.asarray([index[lab] for lab in labels], dtype=np.int64)
        return TrainingExamples(x=x, labels=labels, study_ids=ids, y=y)


_COLUMNS = (
    "study_id, created_at, source, content_type, modality, model_version, engine, label, confidence,"
    " probabilities, finding, finding_at, finding_by, bytes"
)


def _record(row: tuple[Any, ...]) -> StudyRecord:
    (sid, created, source, ctype, modality, version, engine, label, conf, probs, finding, f_at, f_by, size) = row
    return StudyRecord(
        study_id=sid, created_at=created, source=source, content_type=ctype, modality=modality,
        model_version=version, engine=engine, label=label, confidence=conf,
        probabilities=json.loads(probs) if probs else {}, finding=finding, finding_at=f_at,
        finding_by=f_by, bytes=size,
    )
