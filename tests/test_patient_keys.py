"""Patient identifiers: one list, carried in every DICOM frame's metadata, never in the node's status."""

from __future__ import annotations

import pydicom

from fluorosam_rt.service.node import _loggable
from fluorosam_rt.sources.base import PATIENT_KEYS
from fluorosam_rt.sources.dicom_frames import dataset_meta


def test_the_one_list_is_the_superset() -> None:
    assert set(PATIENT_KEYS) >= {"PatientID", "PatientName", "PatientBirthDate", "PatientSex"}


def test_carried_from_dicom_and_left_out_of_status() -> None:
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Doe^Jane", "19700101", "F"
    ds.Modality = "XA"
    meta = dataset_meta(ds)
    assert {k: meta[k] for k in PATIENT_KEYS} == {
        "PatientID": "P1",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
    }
    # the node's status reports what the source describes through _loggable: no patient key
    shown = _loggable({"kind": "dicom", **meta})
    assert shown["Modality"] == "XA"
    assert not set(PATIENT_KEYS) & set(shown)


def test_node_and_browser_view_share_the_lists() -> None:
    """The node's keys are the bridge's (it cannot import the node); the browser view hides both."""
    from bridge import protocol, web_packet
    from fluorosam_rt.sources import dicom_frames

    assert PATIENT_KEYS is protocol.PATIENT_KEYS
    assert set(web_packet.IDENTIFYING_KEYS) == set(protocol.PATIENT_KEYS) | set(protocol.STUDY_KEYS)
    ds = pydicom.Dataset()
    for k in (*protocol.PATIENT_KEYS, *protocol.STUDY_KEYS):
        setattr(ds, k, "20200101" if "Date" in k else "1200" if "Time" in k else "x")
    carried = dataset_meta(ds)
    assert set(protocol.PATIENT_KEYS) | set(protocol.STUDY_KEYS) <= set(carried)
    assert dicom_frames.STUDY_KEYS is protocol.STUDY_KEYS
    shown = web_packet.source_info(carried, show_patient=False)
    assert not set(shown) & set(carried)
    assert set(web_packet.source_info(carried, show_patient=True)) == set(carried)
