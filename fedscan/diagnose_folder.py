"""A folder of images through a box's ``POST /v1/diagnose``, one CSV row per image.

The batch a clinic runs when it joins with images but no labels (PH2 in the melanoma scenario):
every PNG, JPEG or DICOM file under the folder is uploaded as it is (the box decodes and
preprocesses it exactly as for any other study), and the answer goes to a CSV row: image,
predicted label, probability of the positive class (melanoma), calibrated reliability %, model
version, the box's own milliseconds and the round trip. A refused image (corrupt, truncated,
too large: a 4xx with a reason) gets a row with that status and reason and the batch goes on;
a 429/503 (the box is busy) is retried after its ``Retry-After``. Only a failure to reach the
box at all counts as ``failed``.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from protocol.errors import Reason

log = logging.getLogger("fedscan.diagnose_folder")

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}
COLUMNS = ("image", "status", "label", "probability", "reliability_percent", "model_version", "service_ms",
           "round_trip_ms", "reason", "message")
RETRY_STATUSES = (429, 503)


@dataclass
class FolderSummary:
    """How the batch went."""

    answered: int = 0
    refused: int = 0
    failed: int = 0
    positive: str | None = None


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (by suffix, recursively), sorted; ``ValueError`` when there are none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no PNG, JPEG or DICOM files")
    return files


def positive_class(client: httpx.Client, positive: str | None) -> str:
    """The class whose probability the CSV reports: ``positive`` (checked) or the served model's last class."""
    r = client.get("/v1/model")
    if r.status_code != 200:
        raise ValueError(f"GET /v1/model answered {r.status_code}: {r.text[:200]}")
    classes = list(r.json()["classes"])
    if positive is None:
        return str(classes[-1])
    if positive not in classes:
        raise ValueError(f"--positive {positive!r} is not a class of the served model {classes}")
    return positive


def diagnose_one(client: httpx.Client, path: Path, folder: Path, positive: str, *, retries: int = 5) -> dict[str, object]:
    """One CSV row: the answer to ``path``'s upload (retried while the box answers 429/503)."""
    data = path.read_bytes()
    ctype = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    row: dict[str, object] = {"image": path.relative_to(folder).as_posix()}
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        r = client.post("/v1/diagnose", content=data, headers={"Content-Type": ctype})
        row["round_trip_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        if r.status_code not in RETRY_STATUSES or attempt == retries:
            break
        time.sleep(min(float(r.headers.get("Retry-After", "1") or 1), 10.0))
    row["status"] = r.status_code
    if r.status_code == 200:
        d = r.json()
        row.update(label=d["label"], probability=round(float(d["probabilities"].get(positive, float("nan"))), 4),
                   reliability_percent=d["reliability_percent"], model_version=d["model_version"],
                   service_ms=round(float(d["timings"]["total_ms"]), 1))
    else:
        try:
            detail = r.json().get("detail", {})
        except ValueError:
            detail = {}
        detail = detail if isinstance(detail, dict) else {"message": str(detail)}
        row.update(reason=detail.get("reason", ""), message=str(detail.get("message", r.text[:200]))[:200])
        log.warning("%s refused: %s %s", path.name, r.status_code, row["reason"])
    return row


def run_folder(folder: Path, url: str, out: Path, *, token: str | None = None, positive: str | None = None,
               timeout: float = 60.0, client: httpx.Client | None = None) -> FolderSummary:
    """Diagnose every image under ``folder`` through the box at ``url``; write ``out``; return the counts.

    ``client`` replaces the HTTP client (tests pass one bound to the app in process).
    """
    files = folder_images(folder)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    own = client is None
    c = client or httpx.Client(base_url=url, headers=headers, timeout=timeout)
    summary = FolderSummary()
    try:
        summary.positive = positive_class(c, positive)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*COLUMNS[:3], f"probability_{summary.positive}", *COLUMNS[4:]])
            writer.writeheader()
            for path in files:
                try:
                    row = diagnose_one(c, path, folder, summary.positive)
                except httpx.HTTPError as exc:  # the box did not answer: say so in the row, go on
                    row = {"image": path.relative_to(folder).as_posix(), "status": "", "reason": Reason.BOX_UNREACHABLE.value,
                           "message": f"{type(exc).__name__}: {exc}"[:200]}
                    summary.failed += 1
                else:
                    if row["status"] == 200:
                        summary.answered += 1
                    else:
                        summary.refused += 1
                if "probability" in row:
                    row[f"probability_{summary.positive}"] = row.pop("probability")
                writer.writerow(row)
                fh.flush()
    except httpx.HTTPError as exc:
        raise ValueError(f"{url}: cannot reach the box ({type(exc).__name__}: {exc})") from exc
    finally:
        if own:
            c.close()
    return summary
