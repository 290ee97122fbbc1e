"""A study is never lost because no model is loaded yet (issue 15 item 13): a C-STORE to a box
without a model is accepted and kept; once a model is served the kept studies are diagnosed in the
order they arrived, and studies that come meanwhile queue behind them; a restart keeps them waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pynetdicom import AE
from test_api_helpers import ACCEPT, dicom_file, install, running_box
from test_scp import c_store

from edge_agent.dicom_scp import DicomSCP
from edge_agent.serving.pending import PendingDiagnoses


def _wait(cond: Callable[[], bool], timeout: float = 30) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_studies_sent_before_the_first_model_are_kept_and_diagnosed_in_order(tmp_path: Path) -> None:
    with running_box(tmp_path, model=False) as box:
        scp = DicomSCP(box.service, ["SCANNER1"], port=0)
        scp.start()
        try:
            sent = ["CT_small.dcm", "MR_small.dcm", "CT_small.dcm"]
            for name in sent:
                ok, status, _, _ = c_store(scp, name)
                assert ok and status == 0x0000, "kept, not 'Refused: Out of Resources'"
            ok, status, comment, _ = c_store(scp, "rtplan.dcm")  # no pixels: still refused, with its reason
            assert ok and status == 0xC000 and comment == "no_pixel_data"
            kept = box.store.pending()
            assert len(kept) == 3 and all(caller == "dicom:SCANNER1" for _, caller in kept)
            assert [r.model_version for r in box.store.list()] == [None, None, None]
            stored = pydicom.dcmread(box.store.study_dir(kept[0][0]) / "source.dcm")
            assert stored.PatientIdentityRemoved == "YES" and not stored.get("PatientName")  # de-identified at once
            assert [a["event"] for a in box.audit.records()] == ["stored", "stored", "stored", "rejected"]

            install(box.served, "v1", seed=1)  # the first model arrives
            _wait(lambda: not box.store.pending())
            ok, status, _, _ = c_store(scp, "MR_small.dcm")
            assert ok and status == 0x0000
            _wait(lambda: len([a for a in box.audit.records() if a["event"] == "diagnosis"]) == 4)
            diagnosed = [a["study_id"] for a in box.audit.records() if a["event"] == "diagnosis"]
            assert diagnosed[:3] == [sid for sid, _ in kept], "diagnosed in arrival order"
            records = {r.study_id: r for r in box.store.list()}
            assert all(records[s].model_version == "v1" and records[s].label for s in diagnosed)
            assert [records[s].modality for s in diagnosed] == ["CT", "MR", "CT", "MR"]
        finally:
            scp.stop()


def test_kept_studies_survive_a_restart_and_are_diagnosed_when_a_model_comes(tmp_path: Path) -> None:
    with running_box(tmp_path, model=False) as box:
        scp = DicomSCP(box.service, ["SCANNER1"], port=0)
        scp.start()
        try:
            assert c_store(scp, "CT_small.dcm")[1] == 0x0000
        finally:
            scp.stop()
    with running_box(tmp_path, model=True) as box:  # the same store, restarted, with a model this time
        assert len(box.store.pending()) == 1
        worker = PendingDiagnoses(box.service)
        worker.start()
        try:
            _wait(lambda: not box.store.pending())
            assert box.store.list()[0].model_version == "v1", list(box.audit.records())
        finally:
            worker.stop()


def test_a_c_store_past_the_size_limit_is_aborted_while_it_is_received(tmp_path: Path) -> None:
    """DICOM size limits hold while receiving (issue 15 item 10): the association is aborted once the
    bytes pass the limit, before the dataset is complete in memory; the refusal is audited."""
    small = ACCEPT.model_copy(update={"max_bytes": 16 * 1024})
    with running_box(tmp_path, accept=small) as box:
        scp = DicomSCP(box.service, ["SCANNER1"], port=0)
        scp.max_message_bytes = 20 * 1024  # CT_small is ~39 kB, sent in 16 kB PDUs
        scp.start()
        try:
            ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
            ae = AE(ae_title="SCANNER1")
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FEDSCAN")
            assert assoc.is_established
            status = assoc.send_c_store(ds)
            assert not status  # no answer: the listener aborted the association mid-transfer
            _wait(lambda: assoc.is_aborted)
            assert box.store.list() == [] and scp.refused == 1
            last = list(box.audit.records())[-1]
            assert (last["event"], last["reason"], last["caller"]) == ("rejected", "too_large", "dicom:SCANNER1")
            # the next association, with a study under the limit, is served as usual
            ok, code, _, _ = c_store(scp, "MR_small.dcm")
            assert ok and code == 0x0000 and len(box.store.list()) == 1
        finally:
            scp.stop()
