"""Patient identifiers: one list, carried in every DICOM frame's metadata, never in the node's status."""

from __future__ import annotations

import pydicom

from fluorosam_rt.node import _loggable
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
