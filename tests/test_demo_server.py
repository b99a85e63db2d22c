"""The embedded demo PACS over real TCP, with raw pynetdicom as the client."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.demo import server as server_module

PENDING = (0xFF00, 0xFF01)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("demo-cohort")
    manifest = make_cohort(
        folder,
        patients=5,
        seed=3,
        studies_per_patient=(1, 2),
        series_per_study=(1, 2),
        instances_per_series=(2, 3),
        matrix=16,
    )
    return folder, manifest


@pytest.fixture(scope="module")
def server(cohort) -> Iterator[DemoPACS]:
    folder, _ = cohort
    pacs = DemoPACS(folder, port=0).start()
    yield pacs
    pacs.stop()


@pytest.fixture
def manifest(cohort) -> pd.DataFrame:
    return cohort[1]


def associate(server: DemoPACS, *contexts: str) -> object:
    ae = AE(ae_title="PFTEST")
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    return assoc


def query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        # Malformed values are sent on purpose in some tests.
        warnings.simplefilter("ignore")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


def c_find(
    server: DemoPACS, model: str, level: str, **keys: object
) -> tuple[list[Dataset], Dataset]:
    """Every Pending identifier and the final status of one C-FIND."""
    assoc = associate(server, model)
    found: list[Dataset] = []
    final = None
    try:
        for status, identifier in assoc.send_c_find(query(level, **keys), model):
            if status.Status in PENDING:
                found.append(identifier)
            else:
                final = status
    finally:
        assoc.release()
    assert final is not None, "the association ended without a final status"
    return found, final


def find_ok(server: DemoPACS, model: str, level: str, **keys: object) -> list[Dataset]:
    found, final = c_find(server, model, level, **keys)
    assert final.Status == 0x0000, final
    return found


def values(found: list[Dataset], keyword: str) -> list:
    return sorted(str(ds[keyword].value) for ds in found)


def studies_of(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.drop_duplicates("StudyInstanceUID")


# --- C-ECHO and the server object ---------------------------------------------------------------


def test_echo(server):
    assoc = associate(server, Verification)
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_port_zero_gives_a_real_port_and_lifecycle_is_idempotent(tmp_path):
    pacs = DemoPACS(tmp_path / "new", ae_title="LIFE", port=0)
    assert "stopped" in repr(pacs)
    with pacs as running:
        assert running is pacs and pacs.running and pacs.port > 0
        assert pacs.start() is pacs  # already running: nothing happens
        assert f"127.0.0.1:{pacs.port}" in repr(pacs) and "'LIFE'" in repr(pacs)
        assert (tmp_path / "new").is_dir()  # created when missing
    assert not pacs.running
    pacs.stop()  # idempotent
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", pacs.port))


def test_known_aes_are_stored(tmp_path):
    pacs = DemoPACS(tmp_path, known_aes={"OTHER": ("127.0.0.1", 104)})
    assert pacs.known_aes == {"OTHER": ("127.0.0.1", 104)}


@pytest.mark.parametrize("title", ["", "WAY_TOO_LONG_AE_TITLE", "BACK\\SLASH", "ÄRZTE"])
def test_bad_ae_title(tmp_path, title):
    with pytest.raises(ValueError, match="AE title"):
        DemoPACS(tmp_path, ae_title=title)


def test_indexing_skips_non_dicom_files(tmp_path, caplog):
    (tmp_path / "notes.dcm").write_text("not DICOM at all")
    ds = small_ct()
    (tmp_path / "sub").mkdir()
    ds.save_as(tmp_path / "sub" / "good.dcm", enforce_file_format=True)
    no_uid = small_ct()
    del no_uid.SeriesInstanceUID
    no_uid.save_as(tmp_path / "no-series.dcm", enforce_file_format=True)
    (tmp_path / "ignored.txt").write_text("other extensions are not read")
    with caplog.at_level(logging.WARNING, logger="pacsframe.demo.server"):
        pacs = DemoPACS(tmp_path).start()
    try:
        assert pacs.instances().SOPInstanceUID.tolist() == [ds.SOPInstanceUID]
        text = caplog.text
        assert "notes.dcm" in text and "no-series.dcm" in text and "SeriesInstanceUID" in text
    finally:
        pacs.stop()


def test_instances_frame_is_typed(server, manifest):
    frame = server.instances()
    assert len(frame) == len(manifest)
    assert str(frame.StudyDate.dtype) == "datetime64[ns]"
    assert str(frame.StudyTime.dtype) == "timedelta64[ns]"
    assert str(frame.InstanceNumber.dtype) == "Int64"
    assert str(frame.SliceThickness.dtype) == "Float64"
    assert str(frame.PatientName.dtype) == "string"
    assert frame.ImagePositionPatient.map(len).eq(3).all()
    assert sorted(frame.path) == sorted(manifest.path)


# --- C-FIND at every level, both models ---------------------------------------------------------


def test_patient_level(server, manifest):
    found = find_ok(
        server,
        PATIENT_ROOT,
        "PATIENT",
        PatientID="",
        PatientName="",
        PatientBirthDate="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    assert values(found, "PatientID") == sorted(manifest.PatientID.unique())
    per_patient = manifest.groupby("PatientID")
    for ds in found:
        pid = ds.PatientID
        assert ds.NumberOfPatientRelatedStudies == per_patient.StudyInstanceUID.nunique()[pid]
        assert ds.NumberOfPatientRelatedSeries == per_patient.SeriesInstanceUID.nunique()[pid]
        assert ds.NumberOfPatientRelatedInstances == per_patient.size()[pid]
        assert ds.QueryRetrieveLevel == "PATIENT"
        assert ds.RetrieveAETitle == server.ae_title
        birth = manifest[manifest.PatientID == pid].PatientBirthDate.iloc[0]
        assert ds.PatientBirthDate == birth  # "" when empty in the file


def test_patient_level_is_not_in_the_study_root_model(server):
    found, final = c_find(server, STUDY_ROOT, "PATIENT", PatientID="")
    assert found == [] and final.Status == 0xA900
    assert "QueryRetrieveLevel" in final.ErrorComment


@pytest.mark.parametrize("model", [STUDY_ROOT, PATIENT_ROOT])
def test_study_level(server, manifest, model):
    studies = studies_of(manifest)
    pid = studies.PatientID.value_counts().idxmax()  # a patient with two studies
    keys = dict(
        PatientID=pid,
        StudyInstanceUID="",
        StudyDate="",
        StudyTime="",
        AccessionNumber="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    found = find_ok(server, model, "STUDY", **keys)
    mine = studies[studies.PatientID == pid]
    assert len(mine) == 2
    assert values(found, "StudyInstanceUID") == sorted(mine.StudyInstanceUID)
    per_study = manifest.groupby("StudyInstanceUID")
    for ds in found:
        uid = ds.StudyInstanceUID
        row = mine[mine.StudyInstanceUID == uid].iloc[0]
        assert (ds.StudyDate, ds.StudyTime, ds.AccessionNumber) == (
            row.StudyDate,
            row.StudyTime,
            row.AccessionNumber,
        )
        modalities = ds.ModalitiesInStudy
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        assert modalities == sorted(per_study.Modality.unique()[uid])
        assert ds.NumberOfStudyRelatedSeries == per_study.SeriesInstanceUID.nunique()[uid]
        assert ds.NumberOfStudyRelatedInstances == per_study.size()[uid]


def test_all_studies_in_the_study_root(server, manifest):
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyInstanceUID="")
    assert values(found, "StudyInstanceUID") == sorted(manifest.StudyInstanceUID.unique())


@pytest.mark.parametrize("model", [STUDY_ROOT, PATIENT_ROOT])
def test_series_level(server, manifest, model):
    row = manifest.drop_duplicates("SeriesInstanceUID").iloc[0]
    keys = dict(
        StudyInstanceUID=row.StudyInstanceUID,
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        SeriesDescription="",
        NumberOfSeriesRelatedInstances="",
    )
    if model == PATIENT_ROOT:
        keys["PatientID"] = row.PatientID
    found = find_ok(server, model, "SERIES", **keys)
    expected = manifest[manifest.StudyInstanceUID == row.StudyInstanceUID]
    assert values(found, "SeriesInstanceUID") == sorted(expected.SeriesInstanceUID.unique())
    for ds in found:
        series = expected[expected.SeriesInstanceUID == ds.SeriesInstanceUID]
        assert ds.Modality == series.Modality.iloc[0]
        assert ds.SeriesNumber == series.SeriesNumber.iloc[0]
        assert ds.SeriesDescription == series.SeriesDescription.iloc[0]
        assert ds.NumberOfSeriesRelatedInstances == len(series)
        assert ds.StudyInstanceUID == row.StudyInstanceUID


@pytest.mark.parametrize("model", [STUDY_ROOT, PATIENT_ROOT])
def test_image_level(server, manifest, model):
    row = manifest.iloc[0]
    keys = dict(
        StudyInstanceUID=row.StudyInstanceUID,
        SeriesInstanceUID=row.SeriesInstanceUID,
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
        Rows="",
        ImagePositionPatient="",
        PixelSpacing="",
        SliceThickness="",
    )
    if model == PATIENT_ROOT:
        keys["PatientID"] = row.PatientID
    found = find_ok(server, model, "IMAGE", **keys)
    expected = manifest[manifest.SeriesInstanceUID == row.SeriesInstanceUID]
    assert values(found, "SOPInstanceUID") == sorted(expected.SOPInstanceUID)
    for ds in found:
        instance = expected[expected.SOPInstanceUID == ds.SOPInstanceUID].iloc[0]
        assert ds.InstanceNumber == instance.InstanceNumber
        assert ds.Rows == instance.Rows == 16
        assert ds.SOPClassUID == instance.SOPClassUID
        assert np.allclose(
            [float(v) for v in ds.ImagePositionPatient], instance.ImagePositionPatient
        )
        assert np.allclose([float(v) for v in ds.PixelSpacing], instance.PixelSpacing)
        assert float(ds.SliceThickness) == pytest.approx(instance.SliceThickness)


def test_image_level_matching_on_an_instance_attribute(server, manifest):
    row = manifest.iloc[0]
    found = find_ok(
        server,
        STUDY_ROOT,
        "IMAGE",
        StudyInstanceUID=row.StudyInstanceUID,
        SeriesInstanceUID=row.SeriesInstanceUID,
        InstanceNumber=str(row.InstanceNumber),
        SOPInstanceUID="",
    )
    assert values(found, "SOPInstanceUID") == [row.SOPInstanceUID]


def test_responses_hold_exactly_the_requested_keys(server, manifest):
    found = find_ok(
        server, STUDY_ROOT, "SERIES", StudyInstanceUID=manifest.StudyInstanceUID.iloc[0],
        Modality="", PatientName="", ReferencedSeriesSequence=[],
    )  # fmt: skip
    assert found
    for ds in found:
        keywords = {elem.keyword for elem in ds}
        assert keywords - {"SpecificCharacterSet"} == {
            "QueryRetrieveLevel",
            "RetrieveAETitle",
            "StudyInstanceUID",
            "Modality",
            "PatientName",
            "ReferencedSeriesSequence",
        }
        # Not a series-level attribute: returned, but empty.
        assert ds.PatientName == "" and len(ds.ReferencedSeriesSequence) == 0


# --- the hierarchical keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "level", "keys", "missing"),
    [
        (PATIENT_ROOT, "STUDY", {"StudyInstanceUID": ""}, "PatientID"),
        (PATIENT_ROOT, "SERIES", {"PatientID": "PF030001"}, "StudyInstanceUID"),
        (PATIENT_ROOT, "IMAGE", {"PatientID": "PF030001", "StudyInstanceUID": "1.2"}, "Series"),
        (STUDY_ROOT, "SERIES", {"SeriesInstanceUID": ""}, "StudyInstanceUID"),
        (STUDY_ROOT, "IMAGE", {"StudyInstanceUID": "1.2"}, "SeriesInstanceUID"),
        (STUDY_ROOT, "SERIES", {"StudyInstanceUID": "1.2\\1.3"}, "StudyInstanceUID"),
        (PATIENT_ROOT, "STUDY", {"PatientID": "PF03*"}, "PatientID"),
        (PATIENT_ROOT, "STUDY", {"PatientID": "PF03000?"}, "PatientID"),
    ],
)
def test_upper_level_unique_keys_are_required_and_single(server, model, level, keys, missing):
    found, final = c_find(server, model, level, **keys)
    assert found == []
    assert final.Status == 0xA900
    assert missing in final.ErrorComment and level in final.ErrorComment
    assert len(final.ErrorComment) <= 64


@pytest.mark.parametrize("level", [None, "", "FOO", "study"])
def test_bad_query_retrieve_level(server, level):
    assoc = associate(server, STUDY_ROOT)
    ds = query("STUDY", PatientID="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "study" is not a valid CS value
        if level is None:
            del ds.QueryRetrieveLevel
        else:
            ds.QueryRetrieveLevel = level
    try:
        statuses = [status.Status for status, _ in assoc.send_c_find(ds, STUDY_ROOT)]
    finally:
        assoc.release()
    assert statuses == [0xA900]


def test_bad_matching_value_is_unable_to_process(server):
    found, final = c_find(server, STUDY_ROOT, "STUDY", StudyDate="20260230", PatientID="")
    assert found == [] and final.Status == 0xC000
    assert "StudyDate" in final.ErrorComment and "impossible" in final.ErrorComment
    found, final = c_find(server, STUDY_ROOT, "STUDY", StudyDate="2026-03-01-2026-04-01")
    assert final.Status == 0xC000 and "StudyDate" in final.ErrorComment


# --- matching ---------------------------------------------------------------------------------


def test_wildcards(server, manifest):
    patients = manifest.drop_duplicates("PatientID")
    found = find_ok(server, PATIENT_ROOT, "PATIENT", PatientID="PF03000?")
    assert values(found, "PatientID") == sorted(patients.PatientID)
    found = find_ok(server, PATIENT_ROOT, "PATIENT", PatientID="*5")
    assert values(found, "PatientID") == ["PF030005"]
    # PN matching is case-insensitive: "smith*" finds "Smith^John".
    found = find_ok(server, PATIENT_ROOT, "PATIENT", PatientName="smith*")
    assert [str(ds.PatientName) for ds in found] == ["Smith^John"]
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyDescription="*MR*", StudyInstanceUID="")
    studies = studies_of(manifest)
    expected = studies[studies.StudyDescription.str.contains("MR")].StudyInstanceUID
    assert values(found, "StudyInstanceUID") == sorted(expected)


def test_date_and_time_ranges(server, manifest):
    studies = studies_of(manifest)
    dates = sorted(studies.StudyDate)
    lo, hi = dates[1], dates[-2]
    uid = {"StudyInstanceUID": ""}
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyDate=f"{lo}-{hi}", **uid)
    inside = studies[(studies.StudyDate >= lo) & (studies.StudyDate <= hi)]
    assert values(found, "StudyInstanceUID") == sorted(inside.StudyInstanceUID)
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyDate=f"-{lo}", **uid)
    assert values(found, "StudyInstanceUID") == sorted(
        studies[studies.StudyDate <= lo].StudyInstanceUID
    )
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyDate=f"{hi}-", **uid)
    assert values(found, "StudyInstanceUID") == sorted(
        studies[studies.StudyDate >= hi].StudyInstanceUID
    )
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyTime="-1200", **uid)
    morning = studies[studies.StudyTime < "120100"]
    assert values(found, "StudyInstanceUID") == sorted(morning.StudyInstanceUID)


def test_uid_list_matching(server, manifest):
    uids = sorted(manifest.StudyInstanceUID.unique())[:3]
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyInstanceUID=uids)
    assert values(found, "StudyInstanceUID") == uids
    found = find_ok(server, STUDY_ROOT, "STUDY", StudyInstanceUID="\\".join([uids[0], "1.2.3"]))
    assert values(found, "StudyInstanceUID") == uids[:1]


def test_modalities_in_study_and_multiple_values(server, manifest):
    per_study = manifest.groupby("StudyInstanceUID").Modality.agg(set)
    found = find_ok(server, STUDY_ROOT, "STUDY", ModalitiesInStudy="MR", StudyInstanceUID="")
    assert values(found, "StudyInstanceUID") == sorted(
        per_study[per_study.map(lambda s: "MR" in s)].index
    )
    found = find_ok(server, STUDY_ROOT, "STUDY", ModalitiesInStudy="PT\\CT", StudyInstanceUID="")
    assert values(found, "StudyInstanceUID") == sorted(
        per_study[per_study.map(lambda s: "CT" in s)].index
    )


def test_no_match_is_just_success(server):
    found = find_ok(server, STUDY_ROOT, "STUDY", PatientID="NOBODY")
    assert found == []


# --- character sets ---------------------------------------------------------------------------


def test_both_character_sets_are_answered_and_decoded(server, manifest):
    found = find_ok(server, PATIENT_ROOT, "PATIENT", PatientID="", PatientName="")
    got = {ds.PatientID: ds for ds in found}
    patients = manifest.drop_duplicates("PatientID")
    for row in patients.itertuples():
        ds = got[row.PatientID]
        assert str(ds.PatientName) == row.PatientName
        assert ds.get("SpecificCharacterSet", "") == row.SpecificCharacterSet
    assert {"ISO_IR 100", "ISO_IR 192", ""} <= set(patients.SpecificCharacterSet)


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_non_ascii_matching_values_in_either_character_set(server, manifest, charset):
    for name in ["Müller^Jürgen", "müller*"]:
        ds = query("PATIENT", SpecificCharacterSet=charset, PatientName=name, PatientID="")
        assoc = associate(server, PATIENT_ROOT)
        try:
            found = [d for s, d in assoc.send_c_find(ds, PATIENT_ROOT) if s.Status in PENDING]
        finally:
            assoc.release()
        assert [str(d.PatientName) for d in found] == ["Müller^Jürgen"]
        assert found[0].SpecificCharacterSet == "ISO_IR 100"


def test_values_the_row_charset_cannot_hold_are_sent_in_utf8(tmp_path):
    ds = small_ct()
    # No Specific Character Set, but a Latin-1 byte: pacsframe reads it as U+FFFD.
    ds.PatientName = b"M\xfcller^Hans"
    ds.save_as(tmp_path / "latin1-without-charset.dcm", enforce_file_format=True)
    with DemoPACS(tmp_path) as pacs:
        found = find_ok(pacs, PATIENT_ROOT, "PATIENT", PatientName="", PatientID="")
    assert found[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(found[0].PatientName) == "M\ufffdller^Hans"


# --- C-CANCEL -----------------------------------------------------------------------------------


def test_cancel_stops_the_answer(server, manifest):
    request = query("IMAGE", StudyInstanceUID="", SOPInstanceUID="")
    request.StudyInstanceUID = manifest.StudyInstanceUID.iloc[0]
    request.SeriesInstanceUID = manifest.SeriesInstanceUID.iloc[0]
    expected = (manifest.SeriesInstanceUID == request.SeriesInstanceUID).sum()
    assert expected >= 2
    event = types.SimpleNamespace(
        request=types.SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT),
        identifier=request,
        context=types.SimpleNamespace(transfer_syntax=ImplicitVRLittleEndian),
        is_cancelled=False,
    )
    answers = []
    for status, _identifier in server_module.handle_find(event, server):
        answers.append(status)
        event.is_cancelled = True  # C-CANCEL arrives after the first match
    assert answers == [0xFF00, 0xFE00]


# --- C-STORE ----------------------------------------------------------------------------------


def small_ct(**uids: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids.get("sop", generate_uid())
    ds.StudyInstanceUID = uids.get("study", generate_uid())
    ds.SeriesInstanceUID = uids.get("series", generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "STORED1"
    ds.PatientName = "Stored^Patient"
    ds.StudyDate = "20260405"
    ds.Modality = "CT"
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype="<u2").tobytes()
    return ds


@pytest.fixture
def store_server(tmp_path) -> Iterator[DemoPACS]:
    folder = tmp_path / "store"
    make_cohort(folder, patients=1, seed=9, studies_per_patient=1, series_per_study=1,
                instances_per_series=2, matrix=8)  # fmt: skip
    pacs = DemoPACS(folder).start()
    yield pacs
    pacs.stop()


def c_store(server: DemoPACS, ds: Dataset) -> Dataset:
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_stored_instance_is_written_and_found(store_server):
    ds = small_ct()
    status = c_store(store_server, ds)
    assert status.Status == 0x0000
    path = store_server.folder / ds.StudyInstanceUID / ds.SeriesInstanceUID
    path = path / f"{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    on_disk = dcmread(path)
    assert on_disk.SOPInstanceUID == ds.SOPInstanceUID
    assert on_disk.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert on_disk.PixelData == ds.PixelData
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]
    found = find_ok(
        store_server,
        PATIENT_ROOT,
        "IMAGE",
        PatientID="STORED1",
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID="",
    )
    assert values(found, "SOPInstanceUID") == [ds.SOPInstanceUID]
    studies = find_ok(
        store_server, STUDY_ROOT, "STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances=""
    )
    assert len(studies) == 2  # the cohort's study and the new one
    # Sending the same instance again replaces it instead of adding a row.
    assert c_store(store_server, ds).Status == 0x0000
    assert (store_server.instances().SOPInstanceUID == ds.SOPInstanceUID).sum() == 1


def test_stored_instances_survive_a_restart(store_server):
    ds = small_ct()
    assert c_store(store_server, ds).Status == 0x0000
    store_server.stop()
    store_server.start()
    assert ds.SOPInstanceUID in set(store_server.instances().SOPInstanceUID)


@pytest.mark.parametrize(
    "uids",
    [
        {"study": "../../x"},
        {"series": "../../../etc"},
        {"study": "1.2.3/../../x"},
        {"series": "1.02.3"},
        {"study": "1." + "2" * 70},
        {"study": ".."},
    ],
)
def test_path_like_uids_are_refused_and_nothing_is_written(store_server, uids):
    outside = store_server.folder.parent
    before = files_under(outside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs
        ds = small_ct(**uids)
        status = c_store(store_server, ds)
    assert status.Status in (0xA900, 0xC000)
    assert "not a valid UID" in status.ErrorComment
    assert files_under(outside) == before
    assert ds.SOPInstanceUID not in set(store_server.instances().SOPInstanceUID)


# --- serve ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_runs_until_interrupted(tmp_path):
    port = free_port()
    code = (
        "import sys; from pacsframe.demo import serve; "
        f"serve(sys.argv[1], ae_title='SERVED', port={port})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ae = AE(ae_title="PFTEST")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + 30
        assoc = None
        while time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", port, ae_title="SERVED")
            if assoc.is_established:
                break
            time.sleep(0.2)
        assert assoc is not None and assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert b"KeyboardInterrupt" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- C-GET and C-MOVE ---------------------------------------------------------------------------

PATIENT_GET = PatientRootQueryRetrieveInformationModelGet
STUDY_GET = StudyRootQueryRetrieveInformationModelGet
PATIENT_MOVE = PatientRootQueryRetrieveInformationModelMove
STUDY_MOVE = StudyRootQueryRetrieveInformationModelMove


class Received:
    """What a C-GET requestor (or a storage SCP) received, by SOPInstanceUID."""

    def __init__(self) -> None:
        self.datasets: dict[str, Dataset] = {}
        self.lock = threading.Lock()

    def handle_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.datasets[str(ds.SOPInstanceUID)] = ds
        return 0x0000


def c_get(
    server: DemoPACS, model: str, level: str, *, cancel_after: int | None = None, **keys: object
) -> tuple[list[Dataset], Received]:
    """Every response status of one C-GET, and the instances received."""
    received = Received()
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(model)
    roles = []
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        roles.append(build_role(sop_class, scp_role=True))
    state = {"assoc": None}

    def on_store(event):
        status = received.handle_store(event)
        if cancel_after is not None and len(received.datasets) == cancel_after:
            # The C-CANCEL goes out while the SCP is between sub-operations.
            context = next(
                cx for cx in state["assoc"].accepted_contexts if cx.abstract_syntax == model
            )
            state["assoc"].send_c_cancel(1, context.context_id)
        return status

    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title=server.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    state["assoc"] = assoc
    statuses = []
    try:
        for status, _identifier in assoc.send_c_get(query(level, **keys), model, msg_id=1):
            statuses.append(status)
    finally:
        assoc.release()
    assert statuses, "the association ended without a response"
    return statuses, received


def get_ok(server: DemoPACS, model: str, level: str, **keys: object) -> Received:
    statuses, received = c_get(server, model, level, **keys)
    final = statuses[-1]
    assert final.Status == 0x0000, final
    assert final.NumberOfCompletedSuboperations == len(received.datasets)
    assert final.NumberOfFailedSuboperations == 0
    return received


def assert_as_stored(received: Received, rows: pd.DataFrame) -> None:
    """Exactly ``rows`` arrived, each with the file's UIDs and pixel bytes."""
    assert sorted(received.datasets) == sorted(rows.SOPInstanceUID)
    for row in rows.itertuples():
        stored = dcmread(row.path)
        got = received.datasets[row.SOPInstanceUID]
        assert got.SOPInstanceUID == stored.SOPInstanceUID
        assert got.SeriesInstanceUID == stored.SeriesInstanceUID
        assert got.PixelData == stored.PixelData
        assert got.PatientName == stored.PatientName


@pytest.mark.parametrize("model", [PATIENT_GET, STUDY_GET])
def test_get_a_study(server, manifest, model):
    study = manifest.StudyInstanceUID.iloc[-1]
    rows = manifest[manifest.StudyInstanceUID == study]
    keys = {"StudyInstanceUID": study}
    if model == PATIENT_GET:
        keys["PatientID"] = rows.PatientID.iloc[0]
    assert_as_stored(get_ok(server, model, "STUDY", **keys), rows)


@pytest.mark.parametrize("model", [PATIENT_GET, STUDY_GET])
def test_get_a_series(server, manifest, model):
    row = manifest.iloc[0]
    rows = manifest[manifest.SeriesInstanceUID == row.SeriesInstanceUID]
    keys = {"StudyInstanceUID": row.StudyInstanceUID, "SeriesInstanceUID": row.SeriesInstanceUID}
    if model == PATIENT_GET:
        keys["PatientID"] = row.PatientID
    assert_as_stored(get_ok(server, model, "SERIES", **keys), rows)


@pytest.mark.parametrize("model", [PATIENT_GET, STUDY_GET])
def test_get_a_list_of_instances(server, manifest, model):
    series = manifest.groupby("SeriesInstanceUID").filter(lambda g: len(g) >= 3)
    series = series[series.SeriesInstanceUID == series.SeriesInstanceUID.iloc[0]]
    wanted = series.iloc[[0, 2]]
    keys = {
        "StudyInstanceUID": wanted.StudyInstanceUID.iloc[0],
        "SeriesInstanceUID": wanted.SeriesInstanceUID.iloc[0],
        "SOPInstanceUID": list(wanted.SOPInstanceUID),
    }
    if model == PATIENT_GET:
        keys["PatientID"] = wanted.PatientID.iloc[0]
    assert_as_stored(get_ok(server, model, "IMAGE", **keys), wanted)


def test_get_a_patient_in_the_patient_root(server, manifest):
    patient = manifest.PatientID.iloc[0]
    rows = manifest[manifest.PatientID == patient]
    assert rows.StudyInstanceUID.nunique() >= 1
    assert_as_stored(get_ok(server, PATIENT_GET, "PATIENT", PatientID=patient), rows)


def test_get_of_nothing_is_success_with_no_sub_operations(server):
    received = get_ok(server, STUDY_GET, "STUDY", StudyInstanceUID="1.2.3.999")
    assert received.datasets == {}


def test_received_dataset_is_the_stored_dataset(server, manifest):
    """With the file's transfer syntax accepted, the encoded dataset is the file's."""
    row = manifest.iloc[0]
    received = get_ok(
        server,
        STUDY_GET,
        "IMAGE",
        StudyInstanceUID=row.StudyInstanceUID,
        SeriesInstanceUID=row.SeriesInstanceUID,
        SOPInstanceUID=row.SOPInstanceUID,
    )
    got = received.datasets[row.SOPInstanceUID]
    stored = dcmread(row.path)
    assert got.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
    for elem in stored:
        assert got[elem.tag].value == elem.value, elem.keyword


@pytest.mark.parametrize(
    ("model", "level", "keys", "comment"),
    [
        (STUDY_GET, "PATIENT", {"PatientID": "X"}, "QueryRetrieveLevel PATIENT"),
        (STUDY_GET, "FRAME", {"StudyInstanceUID": "1.2"}, "QueryRetrieveLevel FRAME"),
        (STUDY_GET, "STUDY", {}, "StudyInstanceUID"),
        (STUDY_GET, "SERIES", {"SeriesInstanceUID": "1.2.3"}, "StudyInstanceUID"),
        (STUDY_GET, "SERIES", {"StudyInstanceUID": "1.2\\1.3", "SeriesInstanceUID": "1"}, "one"),
        (STUDY_GET, "STUDY", {"StudyInstanceUID": "1.2.*"}, "wildcards"),
        (PATIENT_GET, "STUDY", {"StudyInstanceUID": "1.2.3"}, "PatientID"),
        (PATIENT_GET, "IMAGE", {"PatientID": "P", "StudyInstanceUID": "1.2"}, "SeriesInst"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_get_with_a_bad_identifier_fails_with_a_comment(server, model, level, keys, comment):
    statuses, received = c_get(server, model, level, **keys)
    assert len(statuses) == 1
    assert statuses[0].Status == 0xA900
    assert comment in statuses[0].ErrorComment
    assert received.datasets == {}


def test_cancel_stops_a_get(server, manifest):
    study = manifest.StudyInstanceUID.value_counts().index[0]
    total = (manifest.StudyInstanceUID == study).sum()
    assert total >= 3
    statuses, received = c_get(server, STUDY_GET, "STUDY", cancel_after=1, StudyInstanceUID=study)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert 1 <= len(received.datasets) < total
    assert final.NumberOfRemainingSuboperations == total - len(received.datasets)
    assert final.NumberOfCompletedSuboperations == len(received.datasets)


def test_unreadable_file_is_a_failed_sub_operation(tmp_path):
    folder = tmp_path / "broken"
    manifest = make_cohort(folder, patients=1, seed=5, studies_per_patient=1,
                           series_per_study=1, instances_per_series=3, matrix=8)  # fmt: skip
    with DemoPACS(folder) as pacs:
        broken = manifest.iloc[1]
        Path(broken.path).write_bytes(b"not DICOM any more")
        statuses, received = c_get(
            pacs, STUDY_GET, "STUDY", StudyInstanceUID=manifest.StudyInstanceUID.iloc[0]
        )
    final = statuses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfFailedSuboperations == 1
    assert final.NumberOfCompletedSuboperations == 2
    assert broken.SOPInstanceUID not in received.datasets


@pytest.fixture
def store_scp() -> Iterator[tuple[Received, int]]:
    """A pynetdicom storage SCP on a free port, as a C-MOVE destination."""
    received = Received()
    ae = AE(ae_title="PFDEST")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    scp = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, received.handle_store)],
    )
    try:
        yield received, scp.server_address[1]
    finally:
        ae.shutdown()


def c_move(server: DemoPACS, model: str, level: str, destination: str, **keys: object) -> list:
    assoc = associate(server, model)
    try:
        return [s for s, _ in assoc.send_c_move(query(level, **keys), destination, model)]
    finally:
        assoc.release()


@pytest.mark.parametrize("model", [PATIENT_MOVE, STUDY_MOVE])
def test_move_a_study_to_a_known_ae(cohort, manifest, store_scp, model):
    received, port = store_scp
    study = manifest.StudyInstanceUID.iloc[0]
    rows = manifest[manifest.StudyInstanceUID == study]
    keys = {"StudyInstanceUID": study}
    if model == PATIENT_MOVE:
        keys["PatientID"] = rows.PatientID.iloc[0]
    with DemoPACS(cohort[0], known_aes={"PFDEST": ("127.0.0.1", port)}) as pacs:
        statuses = c_move(pacs, model, "STUDY", "PFDEST", **keys)
    final = statuses[-1]
    assert final.Status == 0x0000, final
    assert final.NumberOfCompletedSuboperations == len(rows)
    assert_as_stored(received, rows)


def test_move_instances_to_an_ae_added_at_runtime(server, manifest, store_scp):
    received, port = store_scp
    wanted = manifest.iloc[[0, 1]]
    wanted = wanted[wanted.SeriesInstanceUID == wanted.SeriesInstanceUID.iloc[0]]
    server.add_known_ae("PFLATER", "127.0.0.1", port)
    statuses = c_move(
        server,
        STUDY_MOVE,
        "IMAGE",
        "PFLATER",
        StudyInstanceUID=wanted.StudyInstanceUID.iloc[0],
        SeriesInstanceUID=wanted.SeriesInstanceUID.iloc[0],
        SOPInstanceUID=list(wanted.SOPInstanceUID),
    )
    assert statuses[-1].Status == 0x0000
    assert_as_stored(received, wanted)


def test_move_to_an_unknown_ae_fails_with_a_comment(server, manifest):
    statuses = c_move(
        server, STUDY_MOVE, "STUDY", "NOBODY", StudyInstanceUID=manifest.StudyInstanceUID.iloc[0]
    )
    assert len(statuses) == 1
    assert statuses[0].Status == 0xA801
    assert statuses[0].ErrorComment == "Move destination unknown: NOBODY"


def test_move_to_an_ae_that_is_not_listening(server, manifest):
    server.add_known_ae("GONE", "127.0.0.1", free_port())
    statuses = c_move(
        server, STUDY_MOVE, "STUDY", "GONE", StudyInstanceUID=manifest.StudyInstanceUID.iloc[0]
    )
    assert statuses[-1].Status == 0xA801
    assert "GONE" in statuses[-1].ErrorComment


def test_move_with_a_bad_identifier_fails_with_a_comment(server, store_scp):
    _, port = store_scp
    server.add_known_ae("PFDEST", "127.0.0.1", port)
    statuses = c_move(server, PATIENT_MOVE, "STUDY", "PFDEST", StudyInstanceUID="1.2.3")
    assert len(statuses) == 1
    assert statuses[0].Status == 0xA900
    assert "PatientID" in statuses[0].ErrorComment


def test_several_retrieves_at_once(server, manifest):
    studies = list(manifest.StudyInstanceUID.unique())
    results: dict[str, Received] = {}
    errors: list[BaseException] = []

    def run(study: str) -> None:
        try:
            results[study] = get_ok(server, STUDY_GET, "STUDY", StudyInstanceUID=study)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for study in studies:
        assert_as_stored(results[study], manifest[manifest.StudyInstanceUID == study])
