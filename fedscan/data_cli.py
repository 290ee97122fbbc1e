"""``fedscan partition`` and ``fedscan diagnose-folder``: data in and diagnoses out, from the command line.

``partition`` reads a ``--data`` source as an agent would (``learning/data_source.py``) and writes
one index file per site, the coordinator's validation share and ``partition.json`` (counts per
class and site). Folders get ``.txt`` image-id lists, an npz ``.npy`` positions into its train split;
``fedscan agent --indices`` and ``fedscan coordinator --val-indices`` read both. Exit codes as the
rest of the CLI: 2 for bad input (the message names the file and the field).

``diagnose-folder`` sends every image of a folder through a box's ``POST /v1/diagnose`` and writes
a CSV (``fedscan/diagnose_folder.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedscan.diagnose_folder import run_folder
from firmware.profile import ProfileError

if TYPE_CHECKING:
    from learning.data_source import DataSource

EXIT_CONFIG = 2
DATA_FORMAT_HELP = "auto (a .npz file or a folder of images) | npz | images | dicom"


def register(app: typer.Typer) -> None:
    """Add the commands to the ``fedscan`` app."""
    app.command(name="partition")(partition)
    app.command(name="diagnose-folder")(diagnose_folder)


def partition(
    data: Annotated[Path, typer.Argument(help="a MedMNIST npz (its train split) or a folder of images")],
    out: Annotated[Path, typer.Option(help="folder for the index files and partition.json")],
    profile: Annotated[str, typer.Option(help="firmware profile (input size, preprocessing, classes)")] = "xray-cxr-28",
    data_format: Annotated[str, typer.Option(help="auto | npz | images | dicom")] = "auto",
    labels_csv: Annotated[Path | None, typer.Option(help="CSV filename,label for a folder")] = None,
    label_field: Annotated[str | None, typer.Option(help="dotted JSON field holding each image's label")] = None,
    sites: Annotated[int, typer.Option(help="number of sites (with --by-field: at most this many)")] = 3,
    by_field: Annotated[str | None, typer.Option(help="comma-separated dotted JSON fields whose value makes a site, "
                                                 "e.g. meta.acquisition.pixelsX,meta.acquisition.pixelsY (the "
                                                 "device)")] = None,
    dirichlet: Annotated[float, typer.Option(help="Dirichlet alpha of the label skew (without --by-field)")] = 0.5,
    min_site: Annotated[int, typer.Option(help="fewest images per site (smaller field values are merged)")] = 20,
    val_fraction: Annotated[float, typer.Option(help="stratified share held by the coordinator (0: none)")] = 0.0,
    exclude_ids: Annotated[Path | None, typer.Option(help="id list left out entirely (a fixed test split)")] = None,
    seed: int = 0,
) -> None:
    """Split a dataset into sites (by a metadata field or Dirichlet label skew) and a validation share."""
    from fedscan.partition_run import run_partition  # torch: deferred (tests/test_architecture.py)

    try:
        lines = run_partition(data, out, profile=profile, data_format=data_format, labels_csv=labels_csv,
                              label_field=label_field, sites=sites, by_field=by_field, dirichlet=dirichlet,
                              min_site=min_site, val_fraction=val_fraction, exclude_ids=exclude_ids, seed=seed)
    except (ValueError, ProfileError) as exc:  # DatasetError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    for line in lines:
        typer.echo(line)


def data_source_option(path: Path | None, fmt: str, labels_csv: Path | None, label_field: str | None,
                       skip_unlabelled: bool = False) -> DataSource | None:
    """A ``--data`` option as a :class:`learning.data_source.DataSource` (exit 2 when it cannot be one)."""
    from learning.data_source import DataFormat, DataSource  # torch: deferred (tests/test_architecture.py)

    if path is None:
        if labels_csv is not None or label_field is not None:
            typer.echo("error: --labels-csv/--label-field need --data", err=True)
            raise typer.Exit(EXIT_CONFIG)
        return None
    try:
        src = DataSource(path, DataFormat(fmt), labels_csv, label_field, "skip" if skip_unlabelled else "error")
        src.resolved_format()
    except ValueError as exc:  # DatasetError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    return src


def diagnose_folder(
    folder: Annotated[Path, typer.Argument(help="folder of images (PNG, JPEG, DICOM), searched recursively")],
    url: Annotated[str, typer.Option(help="the box's diagnosis API, e.g. http://127.0.0.1:8080")],
    out: Annotated[Path, typer.Option(help="CSV to write")] = Path("diagnoses.csv"),
    token: Annotated[str | None, typer.Option(envvar="FEDSCAN_TOKEN", help="bearer token (or FEDSCAN_TOKEN)")] = None,
    positive: Annotated[str | None, typer.Option(help="class whose probability gets its own column "
                                                 "(default: the model's last class, e.g. malignant)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 60.0,
) -> None:
    """Send every image in FOLDER through POST /v1/diagnose; one CSV row per image, refused ones included."""
    try:
        summary = run_folder(folder, url, out, token=token, positive=positive, timeout=timeout)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    typer.echo(f"{summary.answered} diagnosed, {summary.refused} refused, {summary.failed} failed -> {out}")
    if summary.failed:
        raise typer.Exit(1)
