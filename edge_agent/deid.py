"""DICOM de-identification by PS3.15 Annex E, the Basic Application Level Confidentiality Profile.

Two passes over the whole dataset, nested sequences included:

1. **dicognito** (maintained, installed; chosen over ``deid`` because it walks every nested
   sequence by VR rather than by a recipe of top-level tags, and pseudonymizes consistently):
   every UID except class and transfer-syntax UIDs is replaced (the Basic Profile's ``U``
   action), dates and date-times are shifted by one random offset per study (the profile's
   *Retain Longitudinal Temporal Information with Modified Dates Option*), names, IDs, addresses
   and equipment identifiers replaced; it sets ``PatientIdentityRemoved`` and
   ``DeidentificationMethod``.
2. **The removals dicognito leaves** (the profile's ``X``/``Z`` actions), applied recursively:
   every free-text, short/long string, age, time and unknown-VR element (``LO SH LT ST UT UC AS
   TM UN``; this covers e.g. ``RequestedProcedureDescription``, ``ReasonForTheRequestedProcedure``,
   ``MedicalAlerts``, ``Allergies``, ``StudyComments``, ``CurrentPatientLocation``, descriptions,
   comments, protocol names and the IDs dicognito replaced) except a short allow-list needed to
   read the pixels; person names emptied; the patient's sex, size, weight and birth date removed;
   sequences that carry identity or other images removed whole (``X``); private tags (the profile
   has no *Retain Safe Private Option* here); curves (``50xx``) and overlays (``60xx``, data and
   comments alike).

Pixel data is untouched: burned-in text cannot be removed here, so an image flagged
``BurnedInAnnotation = YES`` is kept for diagnosis but never used for training
(:func:`has_burned_in_annotation`; the local store records the flag).
"""

from __future__ import annotations

import secrets

from dicognito.anonymizer import Anonymizer
from pydicom import DataElement, Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence

from learning.dicom import PARSE_ERRORS, ImageRejected
from protocol.errors import Reason

#: String VRs whose values are free text, identifiers, ages or times (removed unless allow-listed).
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "AS", "TM", "UN"})
#: String attributes kept because reading the pixels or the equipment needs them (no identity in them).
KEEP_TEXT = frozenset({
    "Manufacturer", "ManufacturerModelName", "ModalityLUTType", "RescaleType", "LUTExplanation",
    "WindowCenterWidthExplanation", "DeidentificationMethod", "CodeValue", "CodingSchemeDesignator",
    "CodingSchemeVersion", "CodeMeaning", "ContextIdentifier", "MappingResource",
})
#: Non-text attributes of the patient the profile removes or empties.
PATIENT_KEYWORDS = frozenset({
    "PatientSex", "PatientSize", "PatientWeight", "PatientBirthDate", "PatientBirthTime", "PregnancyStatus",
    "PatientSexNeutered", "PatientBreedCodeSequence", "PatientSpeciesCodeSequence",
})
#: Sequences the profile removes whole: they hold people, places, requests or other images.
REMOVED_SEQUENCES = frozenset({
    "OtherPatientIDsSequence", "PatientInsurancePlanCodeSequence", "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence", "InstitutionCodeSequence", "ReferringPhysicianIdentificationSequence",
    "PerformingPhysicianIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence", "OperatorIdentificationSequence", "RequestAttributesSequence",
    "ReferencedStudySequence", "ReferencedImageSequence", "SourceImageSequence", "ContentSequence",
    "IconImageSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "ReferencedPerformedProcedureStepSequence", "PerformedProcedureStepDiscontinuationReasonCodeSequence",
    "AdmittingDiagnosesCodeSequence", "ConsultingPhysicianIdentificationSequence", "PatientTelecomInformation",
    "DigitalSignaturesSequence", "EncryptedAttributesSequence", "MACParametersSequence",
})
METHOD = "PS3.15 E.1 Basic Profile, Modified Dates (dicognito+fedscan)"  # LO: at most 64 characters
#: DICOM CID 7050 codes of what was done.
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))


def _is_overlay_or_curve(tag: int) -> bool:
    group = tag >> 16
    return 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF


def _clean(ds: Dataset) -> None:
    """Apply the profile's removals to one dataset level, then to every item of every remaining sequence."""
    for elem in list(ds):
        keyword = elem.keyword
        if _is_overlay_or_curve(int(elem.tag)) or elem.tag.is_private or keyword in REMOVED_SEQUENCES or keyword in PATIENT_KEYWORDS or (elem.VR in TEXT_VRS and keyword not in KEEP_TEXT):
            del ds[elem.tag]
        elif elem.VR == "PN":
            elem.value = ""  # Z: present, empty
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item)


def _method_codes() -> Sequence:
    items = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    return Sequence(items)


def deidentify(ds: Dataset) -> Dataset:
    """De-identify ``ds`` in place by the Basic Profile (module doc) and return it.

    A value the profile cannot process (a date that is no date) refuses the study
    (``ImageRejected``, ``corrupt_dicom``): it is never kept half de-identified.
    """
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()  # dicognito walks the file meta too
    ds.remove_private_tags()  # recursive; before dicognito, so nothing private is rewritten first
    try:
        Anonymizer(seed=secrets.token_hex(16)).anonymize(ds)  # one unknown date offset and UID map per study
    except PARSE_ERRORS as exc:  # e.g. a StudyDate that is no date: it cannot be shifted, so the study is refused
        raise ImageRejected("the study holds a value that cannot be de-identified (e.g. a malformed date)",
                            reason=Reason.CORRUPT_DICOM) from exc
    _clean(ds)
    if "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    ds.DeidentificationMethodCodeSequence = _method_codes()
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    return ds


def has_burned_in_annotation(ds: Dataset | None) -> bool:
    """Whether the image says identifying text is burned into its pixels (never trained on)."""
    if ds is None:
        return False
    value = ds.get("BurnedInAnnotation")
    return isinstance(value, str) and value.strip().upper() == "YES"


def element_values(ds: Dataset) -> list[DataElement]:
    """Every data element of ``ds``, nested sequences included (for checks and tests)."""
    out: list[DataElement] = []
    ds.walk(lambda _d, e: out.append(e))
    return out
