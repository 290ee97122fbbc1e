"""DICOM ingest: a real C-STORE from a pynetdicom SCU into the box's SCP, results read over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE
from test_api_helpers import Box, dicom_file, running_box

from edge_agent.dicom_scp import DicomSCP


@pytest.fixture
def box_scp(tmp_path: Path) -> Iterator[tuple[Box, DicomSCP]]:
    with running_box(tmp_path) as box:
        scp = DicomSCP(box.service, ["SCANNER1", "CR_ROOM2"], ae_title="FEDSCAN", port=0)
        scp.start()
        try:
            yield box, scp
        finally:
            scp.stop()


def c_store(scp: DicomSCP, name: str, calling: str = "SCANNER1") -> tuple[bool, int | None, str | None, object]:
    """Send one pydicom test file; (associated, status, error comment, association)."""
    ds = pydicom.dcmread(dicom_file(name))
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="FEDSCAN")
    if not assoc.is_established:
        return False, None, None, assoc
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return True, int(status.Status), status.get("ErrorComment"), assoc


def test_c_store_is_diagnosed_on_arrival_and_readable_over_http(box_scp: tuple[Box, DicomSCP]) -> None:
    box, scp = box_scp
    ok, status, _, _ = c_store(scp, "CT_small.dcm")
    assert ok and status == 0x0000
    ok, status, _, _ = c_store(scp, "MR_small_jp2klossless.dcm", calling="CR_ROOM2")  # JPEG 2000 on the wire
    assert ok and status == 0x0000
    with httpx.Client() as c:
        studies = c.get(f"{box.url}/v1/studies", params={"source": "dicom"}, headers=box.auth).json()
        assert [s["modality"] for s in studies] == ["MR", "CT"]
        one = c.get(f"{box.url}/v1/studies/{studies[1]['study_id']}", headers=box.auth).json()
        assert one["model_version"] == "v1" and one["label"] in ("normal", "pneumonia")
        assert abs(sum(one["probabilities"].values()) - 1) < 1e-6
    callers = [r["caller"] for r in box.audit.records() if r["event"] == "diagnosis"]
    assert callers == ["dicom:SCANNER1", "dicom:CR_ROOM2"]
    stored = pydicom.dcmread(box.store.study_dir(studies[1]["study_id"]) / "source.dcm")
    original = pydicom.dcmread(dicom_file("CT_small.dcm"))
    assert not stored.get("PatientName") and stored.SOPInstanceUID != original.SOPInstanceUID


def test_ae_title_not_on_the_list_is_rejected_at_association(box_scp: tuple[Box, DicomSCP]) -> None:
    box, scp = box_scp
    ok, _, _, assoc = c_store(scp, "CT_small.dcm", calling="INTRUDER")
    assert not ok and assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert rj.reason_str == "Calling AE title not recognised"
    assert box.store.list() == []
    ok, status, _, _ = c_store(scp, "CT_small.dcm")  # and the SCP keeps serving
    assert ok and status == 0x0000


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", "no_pixel_data"),
        ("MR_truncated.dcm", "truncated_dicom"),
        ("MR_small_jpeg_ls_lossless.dcm", "unsupported_transfer_syntax"),
        ("rtdose.dcm", "modality_not_accepted"),
    ],
)
def test_bad_objects_get_a_failure_status_with_the_reason(
    box_scp: tuple[Box, DicomSCP], name: str, reason: str
) -> None:
    box, scp = box_scp
    ok, status, comment, _ = c_store(scp, name)
    assert ok and status == 0xC000 and comment == reason
    ok, status, _, _ = c_store(scp, "MR_small.dcm")
    assert ok and status == 0x0000
    assert [r["reason"] for r in box.audit.records() if r["event"] == "rejected"] == [reason]


def test_an_scp_without_an_allow_list_refuses_to_start(box_scp: tuple[Box, DicomSCP]) -> None:
    with pytest.raises(ValueError, match="allow-list"):
        DicomSCP(box_scp[0].service, [])
