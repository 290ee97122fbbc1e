"""Labelled folders of image files: labels from a CSV, or from per-image JSON metadata; DICOM folders.

Three ways to hand a folder to fedscan, all ending in an :class:`learning.datasets.ArrayDataset`
whose ``ids`` are the files' paths relative to the folder, without suffix:

* :func:`load_image_folder` with ``labels_csv``: a CSV with a header naming the file column
  (``filename`` or ``image``) and ``label``; only the listed files are read.
* :func:`load_image_folder` with ``label_field``: every image (PNG, JPEG, DICOM) beside a JSON file
  of the same stem (the ISIC archive's layout), the label at a dotted path in that JSON, e.g.
  ISIC's ``meta.clinical.benign_malignant``.
* :func:`load_dicom_folder`: every DICOM file under the folder (found by its preamble, so files
  without a ``.dcm`` suffix count too), labels from a CSV.

A missing label (no JSON, the field absent or null, an empty CSV cell) raises
:class:`~learning.datasets.DatasetError` naming the file and the field, unless ``on_missing="skip"``:
then those images are left out and the list is logged as a warning (never silently). A malformed
label (a JSON object or list where a class name belongs, unreadable JSON) always raises.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from learning.datasets import ArrayDataset, DatasetError
from learning.image_files import IMAGE_SUFFIXES, FileDecoder, classes_and_indices, is_dicom_file, load_files
from learning.records import MissingField, dotted_get

log = logging.getLogger(__name__)

OnMissing = Literal["error", "skip"]
FILE_COLUMNS = ("filename", "image")


@dataclass(frozen=True)
class LabelledFile:
    """One image file and its label as text (``None`` while missing)."""

    path: Path
    label: str | None
    source: str  # where the label was looked for, for error messages


def file_id(root: Path, path: Path) -> str:
    """Return the id of an image file: its path relative to ``root``, POSIX style, without suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


def read_json(path: Path) -> dict[str, Any]:
    """One JSON metadata file as a dict; :class:`DatasetError` naming the file when unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable JSON metadata ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: JSON metadata must be an object, got {type(data).__name__}")
    return data


def image_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """PNG/JPEG/DICOM files under ``root`` (by suffix), sorted by path."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def label_text(value: Any, where: str) -> str:
    """Return a label value as class-name text; objects, lists and empty strings are malformed."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DatasetError(f"{where}: malformed label {value!r} (expected a class name or number)")
    text = str(value).strip()
    if not text:
        raise DatasetError(f"{where}: malformed label (empty)")
    return text


def labels_from_csv(root: Path, labels_csv: Path) -> list[LabelledFile]:
    """Rows of a labels CSV (file column ``filename`` or ``image``, and ``label``), paths under ``root``."""
    try:
        with labels_csv.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            file_col = next((c for c in FILE_COLUMNS if c in fields), None)
            if file_col is None or "label" not in fields:
                raise DatasetError(f"{labels_csv}: needs columns 'filename,label' (or 'image,label'), has {fields}")
            rows = [(r.get(file_col), r.get("label")) for r in reader]
    except OSError as e:
        raise DatasetError(f"{labels_csv}: cannot read ({e})") from e
    if not rows:
        raise DatasetError(f"{labels_csv}: no rows")
    out = []
    for line, (name, label) in enumerate(rows, start=2):
        if name is None or not name.strip():
            raise DatasetError(f"{labels_csv} line {line}: empty file name")
        label = label.strip() if label is not None else ""
        out.append(LabelledFile(root / name.strip(), label or None, f"{labels_csv.name} line {line}, column 'label'"))
    return out


def labels_from_metadata(root: Path, label_field: str, *, recursive: bool = True) -> list[LabelledFile]:
    """Every image under ``root`` with the label at ``label_field`` in its same-stem JSON file."""
    out = []
    for path in image_files(root, recursive=recursive):
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            out.append(LabelledFile(path, None, f"{meta_path.name} (no such file), field {label_field!r}"))
            continue
        where = f"{meta_path}, field {label_field!r}"
        try:
            value = dotted_get(read_json(meta_path), label_field)
        except MissingField:
            out.append(LabelledFile(path, None, where))
            continue
        out.append(LabelledFile(path, label_text(value, where), where))
    if not out:
        raise DatasetError(f"{root}: no PNG, JPEG or DICOM images")
    return out


def drop_missing(rows: Sequence[LabelledFile], on_missing: OnMissing) -> list[LabelledFile]:
    """Refuse (``"error"``, naming the first files and fields) or leave out, loudly, the rows without a label."""
    missing = [r for r in rows if r.label is None]
    if not missing:
        return list(rows)
    listing = "; ".join(f"{r.path.name} ({r.source})" for r in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    if on_missing == "error":
        raise DatasetError(f"{len(missing)} image(s) without a label: {listing}{more} "
                           "(pass on_missing='skip' to leave them out)")
    if on_missing != "skip":
        raise DatasetError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    log.warning("leaving out %d of %d image(s) without a label: %s%s", len(missing), len(rows), listing, more)
    kept = [r for r in rows if r.label is not None]
    if not kept:
        raise DatasetError("no image has a label")
    return kept


def _check_classes(rows: Sequence[LabelledFile], classes: Sequence[str] | None) -> list[str]:
    """Return the label texts in ``classes``, or refuse the first label outside them.

    Class indices as text (``0``, ``1``) name the class; the refusal names the file and field.
    """
    labels = [r.label or "" for r in rows]
    if classes is None:
        return labels
    if all(v.isdigit() and int(v) < len(classes) for v in labels) and not set(labels) & set(classes):
        return [classes[int(v)] for v in labels]
    bad = next((r for r in rows if (r.label or "") not in classes), None)
    if bad is not None:
        raise DatasetError(f"{bad.path}: label {bad.label!r} ({bad.source}) is not one of the classes {list(classes)}")
    return labels


def _dataset(root: Path, rows: Sequence[LabelledFile], decoder: FileDecoder, classes: Sequence[str] | None,
             listed_in: str) -> ArrayDataset:
    class_names, y = classes_and_indices(_check_classes(rows, classes), classes)
    images = load_files([r.path for r in rows], decoder, listed_in)
    ids = [file_id(root, r.path) if r.path.is_relative_to(root) else r.path.as_posix() for r in rows]
    return ArrayDataset(images, y, class_names, ids=ids)


def load_image_folder(
    root: str | Path,
    labels_csv: str | Path | None = None,
    *,
    label_field: str | None = None,
    on_missing: OnMissing = "error",
    size: tuple[int, int] = (28, 28),
    channels: int = 1,
    classes: Sequence[str] | None = None,
    steps: Sequence[Any] | None = None,
) -> ArrayDataset:
    """Image files (PNG, JPEG, also DICOM) under ``root``, labelled by a CSV or by a JSON metadata field.

    Exactly one of ``labels_csv`` and ``label_field`` is given. Labels are class names (or integers
    as text); ``classes`` fixes their order, else they are sorted (numerically when all are
    integers). Pixels go through ``steps`` (a firmware profile's ``preprocessing``; its
    ``normalize`` is left to batch time) or :func:`learning.image_files.unit_steps`, which resize
    each image to ``size`` as it loads.
    """
    root_p = Path(root)
    if (labels_csv is None) == (label_field is None):
        raise DatasetError("give exactly one of labels_csv and label_field")
    if labels_csv is not None:
        csv_p = Path(labels_csv)
        rows = drop_missing(labels_from_csv(root_p, csv_p), on_missing)
        listed_in = f"listed in {csv_p.name}"
    else:
        assert label_field is not None
        rows = drop_missing(labels_from_metadata(root_p, label_field), on_missing)
        listed_in = f"found in {root_p}"
    return _dataset(root_p, rows, FileDecoder(size, channels, steps), classes, listed_in)


def dicom_files(root: Path) -> list[Path]:
    """Every DICOM file under ``root`` (recursively), by its preamble or a ``.dcm`` suffix, sorted."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p)))


def load_dicom_folder(
    root: str | Path,
    labels_csv: str | Path,
    *,
    on_missing: OnMissing = "error",
    size: tuple[int, int] = (28, 28),
    channels: int = 1,
    classes: Sequence[str] | None = None,
    steps: Sequence[Any] | None = None,
) -> ArrayDataset:
    """Every DICOM file under ``root``, each labelled by a row of ``labels_csv`` (paths relative to ``root``).

    A DICOM file the CSV does not list is a missing label (refused, or left out with ``on_missing="skip"``);
    a listed file that is not in the folder is refused.
    """
    root_p, csv_p = Path(root), Path(labels_csv)
    found = dicom_files(root_p)
    if not found:
        raise DatasetError(f"{root_p}: no DICOM files")
    listed = {r.path.resolve(): r for r in labels_from_csv(root_p, csv_p)}
    present = {p.resolve() for p in found}
    extra = sorted(str(p) for p in listed if p not in present)
    if extra:
        raise DatasetError(f"{extra[0]}: listed in {csv_p.name} but not a DICOM file in {root_p}")
    rows = []
    for p in found:
        row = listed.get(p.resolve())
        rows.append(LabelledFile(p, row.label, row.source) if row else LabelledFile(p, None, f"{csv_p.name}: not listed"))
    return _dataset(root_p, drop_missing(rows, on_missing), FileDecoder(size, channels, steps), classes,
                    f"found in {root_p}")


def load_dicom_files(
    paths: Sequence[str | Path],
    labels: Sequence[int | str],
    size: tuple[int, int] = (28, 28),
    *,
    channels: int = 1,
    classes: Sequence[str] | None = None,
    steps: Sequence[Any] | None = None,
) -> ArrayDataset:
    """Dataset from DICOM files, one label each.

    Default steps (``unit_steps``): middle frame, Modality LUT (rescale slope/intercept), MONOCHROME1
    inverted, VOI window from the file else min-max, grey, bilinear resize.
    """
    if len(paths) != len(labels):
        raise DatasetError(f"{len(paths)} DICOM paths but {len(labels)} labels")
    if not paths:
        raise DatasetError("no DICOM files given")
    class_names, y = classes_and_indices(labels, classes)
    ps = [Path(p) for p in paths]
    images = load_files(ps, FileDecoder(size, channels, steps), "given")
    return ArrayDataset(images, y, class_names, ids=[p.with_suffix("").as_posix() for p in ps])


def metadata_records(root: str | Path, ids: Iterable[str]) -> list[dict[str, Any]]:
    """Read the JSON metadata of each image id (``root/<id>.json``), in order; for partitioning by a field."""
    root_p = Path(root)
    return [read_json(root_p / f"{i}.json") for i in ids]
