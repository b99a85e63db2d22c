"""C-FIND end to end over TCP: the same tests against the demo PACS and Orthanc."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import pacsframe as pf
from pacsframe import frames
from pacsframe.query import DEFAULT_KEYS


def by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame.sort_values(column).reset_index(drop=True)


def studies_of(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.drop_duplicates("StudyInstanceUID")


def test_echo(peer):
    assert 0 < peer.pacs.echo() < 10


def test_patients_patient_root(peer):
    got = peer.pacs.find_patients()
    m = peer.manifest
    assert list(got.columns) == list(DEFAULT_KEYS["PATIENT"])
    assert sorted(got.PatientID) == sorted(m.PatientID.unique())
    expected = m.groupby("PatientID").StudyInstanceUID.nunique()
    counts = got.set_index("PatientID").NumberOfPatientRelatedStudies
    assert str(counts.dtype) == "Int64"
    assert counts.sort_index().tolist() == expected.sort_index().tolist()
    attrs = got.attrs["pacsframe"]
    assert attrs["level"] == "PATIENT" and attrs["model"] == "patient"
    json.dumps(attrs)


def test_studies_study_root_typed_columns(peer):
    got = by(peer.pacs.find_studies(), "StudyInstanceUID")
    m = studies_of(peer.manifest).sort_values("StudyInstanceUID").reset_index(drop=True)
    assert list(got.columns) == list(DEFAULT_KEYS["STUDY"])
    assert got.StudyInstanceUID.tolist() == m.StudyInstanceUID.tolist()
    assert str(got.StudyDate.dtype) == "datetime64[ns]"
    assert str(got.StudyTime.dtype) == "timedelta64[ns]"
    assert str(got.NumberOfStudyRelatedInstances.dtype) == "Int64"
    assert str(got.PatientID.dtype) == "string"
    assert got.StudyDate.tolist() == pd.to_datetime(m.StudyDate, format="%Y%m%d").tolist()
    per_study = peer.manifest.groupby("StudyInstanceUID")
    assert got.NumberOfStudyRelatedInstances.tolist() == per_study.size().sort_index().tolist()
    assert got.NumberOfStudyRelatedSeries.tolist() == (
        per_study.SeriesInstanceUID.nunique().sort_index().tolist()
    )
    modalities = per_study.Modality.agg(lambda s: sorted(set(s))).sort_index().tolist()
    assert [sorted(v) for v in got.ModalitiesInStudy] == modalities
    # StudyDate + StudyTime is a timestamp, as the dtype table promises.
    assert (got.StudyDate + got.StudyTime).notna().all()


def test_empty_values_are_na(peer):
    got = peer.pacs.find_studies()
    m = studies_of(peer.manifest)
    assert got.AccessionNumber.isna().sum() == (m.AccessionNumber == "").sum()
    patients = peer.pacs.find_patients()
    births = peer.manifest.drop_duplicates("PatientID")
    assert patients.PatientBirthDate.isna().sum() == (births.PatientBirthDate == "").sum()


def test_study_level_patient_root_needs_and_uses_patient_id(peer):
    pid = peer.manifest.PatientID.iloc[0]
    got = peer.pacs.find("study", model="patient", PatientID=pid)
    expected = peer.manifest[peer.manifest.PatientID == pid].StudyInstanceUID.unique()
    assert sorted(got.StudyInstanceUID) == sorted(expected)
    with pytest.raises(pf.QueryError, match="needs PatientID"):
        peer.pacs.find("study", model="patient")


def test_drill_down_series_and_instances(peer):
    studies = peer.pacs.find_studies()
    series = peer.pacs.find_series(studies)
    m = peer.manifest
    assert sorted(series.SeriesInstanceUID) == sorted(m.SeriesInstanceUID.unique())
    # Parent columns are carried along, in front.
    assert list(series.columns[: len(studies.columns)]) == list(studies.columns)
    row = series.iloc[0]
    expected_name = m[m.SeriesInstanceUID == row.SeriesInstanceUID].PatientName.iloc[0]
    assert row.PatientName == expected_name
    assert str(series.SeriesNumber.dtype) == "Int64"
    instances = peer.pacs.find_instances(series)
    assert sorted(instances.SOPInstanceUID) == sorted(m.SOPInstanceUID)
    assert str(instances.InstanceNumber.dtype) == "Int64"
    assert set(instances.Rows.dropna()) == {16}
    # From studies straight to instances: the series level is queried in between.
    direct = peer.pacs.find_instances(studies)
    assert sorted(direct.SOPInstanceUID) == sorted(m.SOPInstanceUID)


def test_drill_down_from_filtered_frame_and_list(peer):
    studies = peer.pacs.find_studies()
    one = studies[studies.StudyInstanceUID == studies.StudyInstanceUID.iloc[0]]
    series = peer.pacs.find_series(one)
    expected = peer.manifest[peer.manifest.StudyInstanceUID == one.StudyInstanceUID.iloc[0]]
    assert sorted(series.SeriesInstanceUID) == sorted(expected.SeriesInstanceUID.unique())
    from_list = peer.pacs.find_series(list(one.StudyInstanceUID))
    assert sorted(from_list.SeriesInstanceUID) == sorted(series.SeriesInstanceUID)
    from_series = peer.pacs.find_series(one.StudyInstanceUID)
    assert len(from_series) == len(series)


def test_patient_root_all_levels(peer):
    patients = peer.pacs.find_patients()
    studies = peer.pacs.find("study", patients, model="patient")
    series = peer.pacs.find("series", studies, model="patient")
    images = peer.pacs.find("image", series, model="patient")
    m = peer.manifest
    assert sorted(studies.StudyInstanceUID) == sorted(m.StudyInstanceUID.unique())
    assert sorted(series.SeriesInstanceUID) == sorted(m.SeriesInstanceUID.unique())
    assert sorted(images.SOPInstanceUID) == sorted(m.SOPInstanceUID)


def test_date_ranges(peer):
    m = studies_of(peer.manifest)
    dates = sorted(m.StudyDate)
    lo, hi = dates[1], dates[-2]
    iso = lambda d: f"{d[:4]}-{d[4:6]}-{d[6:]}"  # noqa: E731
    got = peer.pacs.find_studies(StudyDate=(iso(lo), iso(hi)))
    expected = m[(m.StudyDate >= lo) & (m.StudyDate <= hi)]
    assert sorted(got.StudyInstanceUID) == sorted(expected.StudyInstanceUID)
    open_end = peer.pacs.find_studies(StudyDate=(iso(lo), None))
    assert sorted(open_end.StudyInstanceUID) == sorted(m[m.StudyDate >= lo].StudyInstanceUID)
    open_start = peer.pacs.find_studies(StudyDate=f"-{hi}")
    assert sorted(open_start.StudyInstanceUID) == sorted(m[m.StudyDate <= hi].StudyInstanceUID)
    single = peer.pacs.find_studies(StudyDate=pd.Timestamp(iso(dates[0])))
    assert sorted(single.StudyInstanceUID) == sorted(m[m.StudyDate == dates[0]].StudyInstanceUID)


def test_wildcards(peer):
    m = peer.manifest.drop_duplicates("PatientID")
    pid = m.PatientID.iloc[0]
    got = peer.pacs.find_studies(PatientID=pid[:-1] + "?")
    prefix = m[m.PatientID.str[:-1] == pid[:-1]]
    assert set(got.PatientID) == set(prefix.PatientID)
    family = m.PatientName.iloc[-1].split("^")[0]
    got = peer.pacs.find_studies(PatientName=family[:3] + "*")
    assert set(got.PatientID) == set(m[m.PatientName.str.startswith(family[:3])].PatientID)


def test_modalities_in_study(peer):
    per_study = peer.manifest.groupby("StudyInstanceUID").Modality.agg(set)
    got = peer.pacs.find_studies(ModalitiesInStudy="MR")
    assert sorted(got.StudyInstanceUID) == sorted(
        per_study[per_study.apply(lambda s: "MR" in s)].index
    )


def test_uid_list_matching(peer):
    uids = sorted(peer.manifest.StudyInstanceUID.unique())[:2]
    got = peer.pacs.find_studies(StudyInstanceUID=uids)
    assert sorted(got.StudyInstanceUID) == uids


def test_non_ascii_names(peer):
    got = peer.pacs.find_patients()
    m = peer.manifest.drop_duplicates("PatientID")
    expected = dict(zip(m.PatientID, m.PatientName, strict=True))
    names = dict(zip(got.PatientID, got.PatientName, strict=True))
    latin1 = m[m.SpecificCharacterSet == "ISO_IR 100"].PatientID
    utf8 = m[m.SpecificCharacterSet == "ISO_IR 192"].PatientID
    plain = m[m.SpecificCharacterSet == ""].PatientID
    assert len(latin1) and len(utf8) and len(plain)
    for pid in [*latin1, *utf8, *plain]:
        assert names[pid] == expected[pid]


def test_non_ascii_matching_value(peer):
    m = peer.manifest.drop_duplicates("PatientID")
    name = m[m.SpecificCharacterSet == "ISO_IR 100"].PatientName.iloc[0]
    got = peer.pacs.find_studies(PatientName=name)
    assert set(got.PatientName) == {name}


def test_empty_result_keeps_columns_and_dtypes(peer):
    got = peer.pacs.find_studies(PatientID="NO-SUCH-PATIENT")
    assert len(got) == 0
    assert list(got.columns) == list(DEFAULT_KEYS["STUDY"])
    assert str(got.StudyDate.dtype) == "datetime64[ns]"
    assert str(got.NumberOfStudyRelatedSeries.dtype) == "Int64"


def test_return_keys_add_columns(peer):
    got = peer.pacs.find_series(
        peer.pacs.find_studies(), return_keys=["SeriesDescription", "Manufacturer"]
    )
    assert "Manufacturer" in got.columns
    assert got.Manufacturer.notna().all()


def test_frames_write_to_parquet(peer, tmp_path):
    got = peer.pacs.find_studies()
    path = tmp_path / "studies.parquet"
    got.drop(columns=["ModalitiesInStudy"]).to_parquet(path)
    back = pd.read_parquet(path)
    assert back.attrs["pacsframe"]["level"] == "STUDY"
    got.to_pickle(tmp_path / "studies.pkl")


def test_association_reused_within_a_call_and_a_block(peer, monkeypatch):
    opened = []
    original = peer.pacs.connect

    def counting(*args, **kwargs):
        opened.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(peer.pacs, "connect", counting)
    studies = peer.pacs.find_studies()
    peer.pacs.find_series(studies)
    assert len(opened) == 2  # one per call, however many studies were drilled
    with peer.pacs:
        peer.pacs.find_studies()
        peer.pacs.find_series(studies)
        peer.pacs.echo()
    assert len(opened) == 3


def test_a_find_interrupted_in_a_block_leaves_no_answers_for_the_next(peer, monkeypatch):
    expected = by(peer.pacs.find_studies(), "StudyInstanceUID")
    rows = []
    original = frames.FrameBuilder.add_raw

    def interrupted(self, data, implicit_vr):
        rows.append(1)
        if len(rows) == 2:
            raise KeyboardInterrupt
        return original(self, data, implicit_vr)

    with peer.pacs:
        peer.pacs.echo()  # the association is held from here on
        monkeypatch.setattr(frames.FrameBuilder, "add_raw", interrupted)
        with pytest.raises(KeyboardInterrupt):
            peer.pacs.find_studies()
        monkeypatch.undo()
        again = peer.pacs.find_studies()
    assert len(rows) == 2
    pd.testing.assert_frame_equal(by(again, "StudyInstanceUID"), expected)


def test_orthanc_latin1_answers_decode(cohort, tmp_path):
    """Orthanc in its default Latin-1 mode answers ISO_IR 100; names still read right."""
    from servers import OrthancServer, require_tool

    require_tool("Orthanc")
    _, manifest = cohort
    patients = manifest.drop_duplicates("PatientID")
    latin1 = patients[patients.SpecificCharacterSet != "ISO_IR 192"]
    with OrthancServer(tmp_path, extra_config={"DefaultEncoding": "Latin1"}) as server:
        server.start()
        pacs = pf.PACS(server.host, server.dicom_port, server.aet)
        stored = pacs.store(manifest[manifest.PatientID.isin(latin1.PatientID)])
        assert stored.failed == 0
        got = pacs.find_patients()
    assert dict(zip(got.PatientID, got.PatientName, strict=True)) == dict(
        zip(latin1.PatientID, latin1.PatientName, strict=True)
    )
    assert any(not name.isascii() for name in got.PatientName)
