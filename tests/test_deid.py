"""DICOM de-identification by PS3.15's Basic Application Level Confidentiality Profile (issue 15
item 9): nested sequences, private tags, overlays and curves included, on pydicom's sample files and
on a built DX study that hides identifying attributes inside sequences; burned-in images never train."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent.deid import KEEP_TEXT, deidentify, element_values, has_burned_in_annotation
from edge_agent.store import LocalStore

# identifying values; none may survive anywhere in the de-identified file's bytes
SECRETS = {
    "PatientName": "DOE^JANE^SECRETNAME", "PatientID": "MRN-7734921", "PatientBirthDate": "19610704",
    "AccessionNumber": "ACC-55512", "StudyDate": "20240317", "StudyTime": "101112",
    "PerformedProcedureStepStartDate": "20240316", "PerformedProcedureStepStartTime": "093015",
    "RequestedProcedureDescription": "CHEST PA FOR JANE DOE", "ReasonForTheRequestedProcedure": "fall at Elm Street 12",
    "ConsultingPhysicianName": "HOUSE^GREGORY", "MedicalAlerts": "allergic to penicillin (Jane)",
    "Allergies": "peanuts-secret", "StudyComments": "patient is the mayor's wife",
    "CurrentPatientLocation": "WARD 7B BED 3", "InstitutionName": "St Secret Hospital",
    "ReferringPhysicianName": "WATSON^JOHN", "OperatorsName": "TECH^TERRY", "StationName": "DXROOM-SECRET",
    "DeviceSerialNumber": "SN-99887766", "PatientAddress": "12 Elm Street Springfield",
}
NESTED = ("MedicalAlerts", "Allergies", "StudyComments", "PerformedProcedureStepStartDate",
          "PerformedProcedureStepStartTime", "RequestedProcedureDescription", "ReasonForTheRequestedProcedure",
          "ConsultingPhysicianName", "CurrentPatientLocation")
OVERLAY_TEXT = b"OVERLAY-SECRET-COMMENT"
PRIVATE_TEXT = "PRIVATE-SECRET-NOTE"


def _set(ds: Dataset, keyword: str, suffix: str = "") -> None:
    value = SECRETS[keyword]
    setattr(ds, keyword, value if not suffix else f"{value}{suffix}" if keyword.endswith(("Name", "s")) else value)


def dx_study() -> Dataset:
    """A DX image with identifying attributes at top level and inside kept sequences, an overlay
    with comments, a curve and a private block."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    for kw in SECRETS:
        _set(ds, kw)
    item = Dataset()  # a kept code sequence carrying what a modality worklist copies in
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID1", "99LOCAL", "chest"
    for kw in NESTED:
        _set(item, kw)
    inner = Dataset()
    inner.StudyComments = SECRETS["StudyComments"]
    inner.PatientBirthDate = SECRETS["PatientBirthDate"]
    item.ViewModifierCodeSequence = Sequence([inner])  # two levels deep
    ds.ViewCodeSequence = Sequence([item])
    ds.RequestAttributesSequence = Sequence([item])
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", OVERLAY_TEXT.decode())
    ds.add_new(0x50000020, "CS", "CURVE")
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", PRIVATE_TEXT)
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_built_dx_study_leaves_no_identifier_at_any_depth() -> None:
    ds = dx_study()
    before = _bytes(ds)
    assert all(v.encode() in before for v in SECRETS.values()) and OVERLAY_TEXT in before  # the test can fail
    pixels = ds.pixel_array.copy()
    uids = {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    deidentify(ds)
    after = _bytes(ds)
    leaked = [k for k, v in SECRETS.items() if v.encode() in after]
    assert leaked == [], f"identifying values survived: {leaked}"
    assert OVERLAY_TEXT not in after and PRIVATE_TEXT.encode() not in after and b"CURVE" not in after
    assert not any(e.tag.group >> 8 in (0x50, 0x60) or e.tag.is_private for e in element_values(ds))
    assert "RequestAttributesSequence" not in ds  # removed whole (X)
    nested = ds.ViewCodeSequence[0]
    text = ("MedicalAlerts", "Allergies", "StudyComments", "RequestedProcedureDescription",
            "ReasonForTheRequestedProcedure", "CurrentPatientLocation", "PerformedProcedureStepStartTime")
    assert nested.CodeValue == "RPID1" and not any(kw in nested for kw in text)
    assert nested.ConsultingPhysicianName == "" and nested.PerformedProcedureStepStartDate != SECRETS[
        "PerformedProcedureStepStartDate"]  # Z: emptied; dates shifted by the study's unknown offset
    assert "StudyComments" not in nested.ViewModifierCodeSequence[0]
    assert not {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID} & uids
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    again = pydicom.dcmread(io.BytesIO(after))
    assert np.array_equal(again.pixel_array, pixels), "the pixels are untouched"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_pydicom_samples_keep_no_name_id_text_or_original_date(name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    originals = {str(e.value) for e in element_values(ds)
                 if e.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "DA", "DT", "TM", "AS") and e.value
                 and e.keyword not in KEEP_TEXT and not e.tag.is_private and len(str(e.value)) >= 4}
    assert originals
    deidentify(ds)
    kept = {str(e.value) for e in element_values(ds) if e.value and e.VR not in ("SQ", "OB", "OW")}
    assert originals & kept == set(), sorted(originals & kept)
    assert not any(e.tag.is_private for e in element_values(ds))


def test_burned_in_images_are_stored_and_diagnosed_but_never_train(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    clean, burned = dx_study(), dx_study()
    burned.BurnedInAnnotation = "YES"
    assert has_burned_in_annotation(burned) and not has_burned_in_annotation(clean)
    x = np.zeros((1, 28, 28), np.float32)
    ids = [store.ingest(source="dicom", content_type="application/dicom", model_input=x, dataset=d, modality="DX")
           for d in (clean, burned)]
    for sid in ids:
        store.record_finding(sid, "normal", by="dr")
    assert store.training_examples(classes=["normal", "pneumonia"]).study_ids == [ids[0]]
    assert pydicom.dcmread(store.study_dir(ids[1]) / "source.dcm").PatientIdentityRemoved == "YES"
    store.close()
