"""C-GET and C-MOVE into the cache: the same tests against the demo PACS and Orthanc."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest

import pacsframe as pf


def no_partial_files(root) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".part")]


def test_get_study_level(client, peer):
    studies = client.find_studies()
    one = studies[studies.StudyInstanceUID == studies.StudyInstanceUID.iloc[0]]
    result = client.get(one, progress=False)
    expected = peer.manifest[peer.manifest.StudyInstanceUID == one.StudyInstanceUID.iloc[0]]
    assert result.completed == len(expected) and result.failed == 0
    assert sorted(result.instances.SOPInstanceUID) == sorted(expected.SOPInstanceUID)
    for row in result.instances.itertuples():
        path = client.cache.root / row.StudyInstanceUID / row.SeriesInstanceUID
        assert row.path == str(path / f"{row.SOPInstanceUID}.dcm")
    original = expected.set_index("SOPInstanceUID").path
    for row in result.instances.itertuples():
        got = pydicom.dcmread(row.path)
        want = pydicom.dcmread(original[row.SOPInstanceUID])
        assert got.PixelData == want.PixelData
    assert no_partial_files(client.cache.root)


def test_get_series_and_instances(client, peer):
    series = client.find_series(client.find_studies())
    first = series.iloc[:1]
    result = client.get(first, progress=False, workers=2)
    m = peer.manifest
    assert result.completed == (m.SeriesInstanceUID == first.SeriesInstanceUID.iloc[0]).sum()
    instances = client.find_instances(series.iloc[1:2])
    result = client.get(instances.iloc[:1], progress=False)
    assert result.completed == 1
    assert result.instances.SOPInstanceUID.tolist() == [instances.SOPInstanceUID.iloc[0]]


def test_get_patient_level_in_patient_root(client, peer):
    patients = client.find_patients()
    one = patients.iloc[:1]
    result = client.get(one, progress=False)
    expected = peer.manifest[peer.manifest.PatientID == one.PatientID.iloc[0]]
    assert result.completed == len(expected)
    assert set(client.cache.instances().PatientID) == {one.PatientID.iloc[0]}


def test_cached_objects_are_not_fetched_again(client, peer):
    studies = client.find_studies()
    first = client.get(studies, progress=False)
    assert first.completed == len(peer.manifest)
    again = client.get(studies, progress=False)
    assert (again.completed, again.cached, again.requests) == (0, len(peer.manifest), 0)
    # Same at series and instance level: one index query, no C-GET.
    series = client.find_series(studies)
    assert client.get(series, progress=False).requests == 0
    instances = client.find_instances(series.iloc[:2])
    assert client.get(instances, progress=False).requests == 0


def test_resume_after_a_failure_fetches_only_what_is_missing(client, peer):
    studies = client.find_studies()
    received: list[str] = []

    def fail_after_five(path, meta):
        received.append(meta["SOPInstanceUID"])
        if len(received) == 5:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        client.get(studies, progress=False, workers=1, on_received=fail_after_five)
    held = client.cache.instances()
    assert set(received) <= set(held.SOPInstanceUID)
    assert len(held) >= 5
    assert no_partial_files(client.cache.root)
    rest = client.get(studies, progress=False)
    assert rest.completed == len(peer.manifest) - len(held)
    assert rest.cached == len(held)
    assert sorted(client.cache.instances().SOPInstanceUID) == sorted(peer.manifest.SOPInstanceUID)


def test_move_to_our_own_scp(client, peer):
    series = client.find_series(client.find_studies())
    chosen = series.iloc[:2]
    result = client.move(chosen, progress=False)
    expected = peer.manifest[peer.manifest.SeriesInstanceUID.isin(chosen.SeriesInstanceUID)]
    assert result.completed == len(expected) and result.failed == 0
    assert sorted(client.cache.instances().SOPInstanceUID) == sorted(expected.SOPInstanceUID)
    again = client.move(chosen, progress=False)
    assert (again.completed, again.requests) == (0, 0)


def test_move_to_unknown_ae_is_a_typed_error(client):
    studies = client.find_studies()
    with pytest.raises(pf.MoveDestinationUnknown, match=r"'NOWHERE'.*register") as info:
        client.move(studies.iloc[:1], destination="NOWHERE", progress=False)
    assert info.value.status in (0xA801, 0xC000)


def test_on_received_gets_path_and_meta(client):
    seen = []
    series = client.find_series(client.find_studies()).iloc[:1]
    client.get(series, progress=False, on_received=lambda path, meta: seen.append((path, meta)))
    assert seen
    path, meta = seen[0]
    assert path.endswith(f"{meta['SOPInstanceUID']}.dcm")
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"} <= set(meta)


def test_retrieve_input_errors_before_sending(client):
    with pytest.raises(pf.QueryError, match="workers"):
        client.get(client.find_studies(), workers=0)
    with pytest.raises(pf.QueryError, match="cannot tell the level"):
        client.get(pd.DataFrame({"Modality": ["CT"]}))
    with pytest.raises(pf.QueryError, match="patient-root"):
        client.get(pd.DataFrame({"PatientID": ["X"]}), model="study")


def test_workers_split_one_study_by_series(client, peer):
    per_study = peer.manifest.groupby("StudyInstanceUID").SeriesInstanceUID.nunique()
    study = per_study[per_study > 1].index[0]
    studies = client.find_studies(StudyInstanceUID=study)
    result = client.get(studies, workers=4, progress=False)
    assert result.requests == per_study[study]  # one C-GET per series, in parallel
    assert result.completed == (peer.manifest.StudyInstanceUID == study).sum()


def test_load_series_matches_the_cohort_geometry(client, peer):
    m = peer.manifest
    uid = m.groupby("SeriesInstanceUID").size().idxmax()
    client.get(
        client.find_series(
            client.find_studies(
                StudyInstanceUID=m[m.SeriesInstanceUID == uid].StudyInstanceUID.iloc[0]
            )
        ),
        progress=False,
    )
    volume = client.cache.load_series(uid)
    rows = m[m.SeriesInstanceUID == uid].sort_values("InstanceNumber")
    assert volume.array.shape == (len(rows), rows.Rows.iloc[0], rows.Columns.iloc[0])
    z = [p[2] for p in rows.ImagePositionPatient]
    assert volume.origin[2] == pytest.approx(min(z))
    assert volume.spacing[0] == pytest.approx(abs(z[1] - z[0]))
    assert volume.spacing[1:] == pytest.approx(rows.PixelSpacing.iloc[0])
    order = client.cache.instances(SOPInstanceUID=volume.sop_instance_uids).set_index(
        "SOPInstanceUID"
    )
    numbers = [order.InstanceNumber[s] for s in volume.sop_instance_uids]
    assert numbers == sorted(numbers) or numbers == sorted(numbers, reverse=True)


def test_progress_bar_and_html(client, capsys):
    result = client.get(client.find_series(client.find_studies()).iloc[:1], progress=True)
    assert "C-GET from" in capsys.readouterr().err
    html = result._repr_html_()
    assert "RetrieveResult" in html and f"<td>{result.completed}</td>" in html
