"""``fedscan partition``'s work: read a ``--data`` source for a profile, split it, write the index files.

Folders get ``.txt`` image-id lists, an npz ``.npy`` positions into its train split, plus
``val`` (the coordinator's share) and ``partition.json`` (counts per class and site). The split
itself is :func:`learning.site_split.split_sites` (pure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from firmware.profile import find_profile
from learning import data_source
from learning.data_source import DataFormat, DataSource
from learning.datasets import DatasetError
from learning.folders import metadata_records
from learning.partition import field_keys
from learning.site_split import split_sites
from learning.splits import read_ids


def run_partition(data: Path, out: Path, *, profile: str, data_format: str, labels_csv: Path | None,
                  label_field: str | None, sites: int, by_field: str | None, dirichlet: float, min_site: int,
                  val_fraction: float, exclude_ids: Path | None, seed: int) -> list[str]:
    """Split and write; return one line per file written. ``DatasetError``/``ProfileError`` on bad input."""
    prof = find_profile(profile)
    src = DataSource(data, DataFormat(data_format), labels_csv, label_field)
    ds = data_source.load(src, prof)
    exclude = (data_source.positions_of(ds, read_ids(exclude_ids), str(exclude_ids))
               if exclude_ids is not None else None)
    keys = None
    if by_field is not None:
        if src.resolved_format() == DataFormat.NPZ:
            raise DatasetError(f"{data}: --by-field needs per-image JSON metadata (a folder), an npz has none")
        fields = [f.strip() for f in by_field.split(",") if f.strip()]
        keys = field_keys(metadata_records(data, ds.ids), fields, ds.ids)
    split = split_sites(ds.labels, sites=sites, keys=keys, alpha=dirichlet, min_size=min_site, seed=seed,
                        val_fraction=val_fraction, exclude=exclude)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"data": src.describe(), "profile": prof.name, "classes": ds.classes,
                               "by": f"field {by_field}" if by_field else f"dirichlet alpha={dirichlet}",
                               "seed": seed, "excluded": len(split.excluded), "sites": []}
    lines = []
    for i, (name, part) in enumerate(zip(split.names, split.parts, strict=True), start=1):
        path = _write_index(out / f"site-{i}", ds.ids, part)
        summary["sites"].append({"site": f"site-{i}", "value": name, "file": path.name, "n": len(part),
                                 "per_class": np.bincount(ds.labels[part], minlength=ds.num_classes).tolist()})
        lines.append(f"site-{i} ({name}): {len(part)} images -> {path}")
    if len(split.val):
        path = _write_index(out / "val", ds.ids, split.val)
        summary["val"] = {"file": path.name, "n": len(split.val),
                          "per_class": np.bincount(ds.labels[split.val], minlength=ds.num_classes).tolist()}
        lines.append(f"validation: {len(split.val)} images -> {path}")
    (out / "partition.json").write_text(json.dumps(summary, indent=2))
    return lines


def _write_index(stem: Path, ids: list[str], positions: np.ndarray) -> Path:
    """A ``.txt`` id list when the images have ids, else ``.npy`` positions."""
    if ids:
        path = stem.with_suffix(".txt")
        path.write_text("".join(f"{ids[i]}\n" for i in positions))
    else:
        path = stem.with_suffix(".npy")
        np.save(path, positions.astype(np.int64))
    return path
