"""QueryForm / QueryModel against the demo PACS, driven as a user would: set
widget values, click buttons, read state; plus the HTML reprs of PACS and Cache."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys

import pandas as pd
import pytest

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.widgets import QueryModel, parse_more_keys


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("widgets-cohort")
    manifest = make_cohort(folder, patients=3, seed=23, matrix=16)
    server = DemoPACS(folder, port=0, http_port=0).start()
    yield server, manifest
    server.stop()


@pytest.fixture
def pacs(cohort, tmp_path):
    server, _ = cohort
    return pf.PACS("127.0.0.1", server.port, ae_title=server.ae_title, cache=tmp_path / "cache")


@pytest.fixture
def web(cohort, tmp_path):
    server, _ = cohort
    with pf.DICOMweb(server.url, cache=tmp_path / "web-cache") as client:
        yield client


@pytest.fixture
def manifest(cohort):
    return cohort[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_search_by_patient_id(pacs, manifest):
    form = pf.QueryForm(pacs)
    patient = manifest.PatientID.iloc[0]
    form.level.value = "study"
    form.patient_id.value = patient
    form.search_button.click()
    expected = manifest[manifest.PatientID == patient].StudyInstanceUID.nunique()
    assert sorted(form.result.StudyInstanceUID) == sorted(
        manifest[manifest.PatientID == patient].StudyInstanceUID.unique()
    )
    assert len(form.results.options) == expected
    assert all(patient in label for label, _ in form.results.options)
    noun = "study" if expected == 1 else "studies"
    assert f"{expected} {noun} found" in form.status.value
    assert 'data-kind="ok"' in form.status.value
    assert "<table" in form.table.value and patient in form.table.value


def test_select_and_retrieve(pacs, manifest):
    form = pf.QueryForm(pacs, workers=2)
    form.level.value = "series"
    form.search_button.click()
    assert len(form.result) == manifest.SeriesInstanceUID.nunique()
    form.results.value = (0, 1)
    assert len(form.selected) == 2
    uids = set(form.selected.SeriesInstanceUID)
    assert "Selected" in form.table.value
    form.retrieve_button.click()
    want = int(manifest.SeriesInstanceUID.isin(uids).sum())
    assert form.retrieved is not None
    assert form.retrieved.completed == want
    assert form.retrieved.failed == 0
    assert form.progress.value == form.progress.max == want
    assert f"Retrieved {want} objects (0 failed, 0 already cached)" in form.status.value
    assert "RetrieveResult" in form.retrieved_box.value
    # A second click finds everything cached.
    form.retrieve_button.click()
    assert form.retrieved.completed == 0 and form.retrieved.cached == want
    assert form.progress.value == form.progress.max == want
    assert f"{want} already cached" in form.status.value


def test_retrieve_study_by_index(pacs, manifest):
    form = pf.QueryForm(pacs)
    form.search_button.click()
    form.results.index = (0,)
    study = form.selected.StudyInstanceUID.iloc[0]
    form.retrieve_button.click()
    assert form.retrieved.completed == int((manifest.StudyInstanceUID == study).sum())
    assert form.progress.value == form.progress.max


def test_retrieve_without_selection_says_so(pacs):
    form = pf.QueryForm(pacs)
    form.search_button.click()
    form.retrieve_button.click()
    assert "Select one or more rows" in form.status.value
    assert form.retrieved is None


def test_date_pickers_make_a_range(pacs, manifest):
    form = pf.QueryForm(pacs)
    dates = pd.to_datetime(manifest.StudyDate, format="%Y%m%d")
    first = dates.min().date()
    form.date_from.value = first
    form.date_to.value = first
    day = first.strftime("%Y%m%d")
    assert form.query == {"StudyDate": f"{day}-{day}"}
    form.search_button.click()
    assert len(form.result) == manifest[dates.dt.date == first].StudyInstanceUID.nunique()
    assert (form.result.StudyDate.dt.date == first).all()
    form.date_to.value = None
    assert form.query == {"StudyDate": f"{day}-"}
    form.date_to.value = first - datetime.timedelta(days=1)
    form.search_button.click()
    assert "swap the From and To dates" in form.status.value


def test_modality_multi_select(pacs, manifest):
    form = pf.QueryForm(pacs)
    form.modality.value = ("MR",)
    assert form.query == {"ModalitiesInStudy": "MR"}
    form.search_button.click()
    assert all("MR" in m for m in form.result.ModalitiesInStudy)
    form.level.value = "series"
    form.search_button.click()
    assert set(form.result.Modality) == {"MR"}
    assert len(form.result) == manifest[manifest.Modality == "MR"].SeriesInstanceUID.nunique()
    # Several codes at series level: the answer is filtered (Modality takes no list).
    form.modality.value = ("CT", "MR")
    assert form.query["Modality"] == "CT\\MR"
    form.search_button.click()
    assert len(form.result) == manifest.SeriesInstanceUID.nunique()


def test_more_keys(pacs, manifest):
    assert parse_more_keys("SeriesNumber=1;\nmodality = CT") == {
        "SeriesNumber": "1",
        "Modality": "CT",
    }
    form = pf.QueryForm(pacs)
    form.level.value = "series"
    form.more_keys.value = "SeriesNumber=1"
    form.search_button.click()
    assert len(form.result) == manifest[manifest.SeriesNumber == 1].SeriesInstanceUID.nunique()
    assert (form.result.SeriesNumber == 1).all()


def test_image_level_drills_down(pacs, manifest):
    form = pf.QueryForm(pacs)
    patient = manifest.PatientID.iloc[-1]
    form.level.value = "image"
    form.patient_id.value = patient
    form.search_button.click()
    assert len(form.result) == int((manifest.PatientID == patient).sum())
    assert "images found in" in form.status.value


def test_patient_level_hides_study_fields(pacs, manifest):
    form = pf.QueryForm(pacs)
    form.accession_number.value = "X*"
    form.level.value = "patient"
    assert form.accession_number.layout.display == "none"
    assert form.query == {}
    form.search_button.click()
    assert len(form.result) == manifest.PatientID.nunique()
    assert "3 patients found" in form.status.value


@pytest.mark.parametrize(
    ("more", "words"),
    [
        ("StudyDate=2026*", "wildcards are not allowed"),
        ("PatientsName=X", "did you mean 'PatientName'"),
        ("no equals sign", "is not Keyword=value"),
    ],
)
def test_bad_input_is_a_sentence(pacs, more, words):
    form = pf.QueryForm(pacs)
    form.more_keys.value = more
    form.search_button.click()  # must not raise
    assert words in form.status.value
    assert 'data-kind="error"' in form.status.value
    assert "Traceback" not in form.status.value
    assert form.result is None
    with pytest.raises(pf.QueryError):
        form.query  # noqa: B018


def test_unreachable_peer(tmp_path):
    pacs = pf.PACS("127.0.0.1", _free_port(), connect_timeout=2, cache=tmp_path / "c")
    form = pf.QueryForm(pacs)
    assert form.search() is False
    assert "connection refused" in form.status.value
    assert 'data-kind="error"' in form.status.value


def test_model_without_widgets_in_subprocess():
    code = (
        "import sys, tempfile\n"
        "import pacsframe, pacsframe.widgets as w\n"
        "assert 'ipywidgets' not in sys.modules, 'imported at import time'\n"
        "m = w.QueryModel(pacsframe.PACS('127.0.0.1', 4242, cache=tempfile.mkdtemp()))\n"
        "m.fields['PatientID'] = 'X'\n"
        "assert m.query == {'PatientID': 'X'}\n"
        "assert 'ipywidgets' not in sys.modules, 'imported by the model'\n"
        "w.QueryForm(m.pacs)\n"
        "assert 'ipywidgets' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_directly(pacs, manifest):
    model = QueryModel(pacs)
    model.fields["PatientID"] = manifest.PatientID.iloc[0]
    assert model.search()
    assert len(model.option_lines()) == len(model.result)
    assert model.header_line().split()[:3] == ["#", "Patient", "ID"]
    model.select([0])
    progress = []
    assert model.retrieve(lambda done, expected: progress.append((done, expected)))
    assert progress[-1][0] == progress[-1][1] == model.retrieved.completed


def test_form_displays(pacs):
    form = pf.QueryForm(pacs)
    bundle = form._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "pf-query-form" in form.widget._dom_classes
    for box, css in [
        (form.patient_id, "pf-patient-id"),
        (form.search_button, "pf-search"),
        (form.results, "pf-results"),
        (form.retrieve_button, "pf-retrieve"),
        (form.status, "pf-status"),
        (form.progress, "pf-progress"),
    ]:
        assert css in box._dom_classes
    assert form.patient_id.placeholder and form.more_keys.placeholder


def test_reprs(pacs, manifest):
    text = pacs._repr_html_()
    assert f"127.0.0.1:{pacs.port}" in text and "PFDEMO" in text and "PACSFRAME" in text
    assert str(pacs.cache.root) in text
    assert "empty" in pacs.cache._repr_html_()
    result = pacs.get(pacs.find_studies(), progress=False)
    assert f"<td>{result.completed}</td>" in result._repr_html_()
    html = pacs.cache._repr_html_()
    assert f"{len(manifest)} instances" in html
    for modality, n in manifest.Modality.value_counts().items():
        assert f"<td>{modality}</td><td>{n}</td>" in html


def test_pacs_repr_reports_reachability_only_after_echo(tmp_path):
    from servers import free_port

    pacs = pf.PACS("127.0.0.1", free_port(), "NOBODY", cache=tmp_path, connect_timeout=2)
    assert "not checked" in pacs._repr_html_()
    with pytest.raises(pf.AssociationError):
        pacs.echo()
    assert "not reachable at the last echo()" in pacs._repr_html_()


# --- the same form over DICOMweb (QIDO-RS, WADO-RS) --------------------------------------


def _flow(peer, level, patient=None, modalities=(), more=""):
    form = pf.QueryForm(peer, workers=2)
    form.level.value = level
    if patient:
        form.patient_id.value = patient
    form.modality.value = tuple(modalities)
    form.more_keys.value = more
    assert form.search_button.click() is None
    assert 'data-kind="ok"' in form.status.value, form.status.value
    return form


def _sorted(frame):
    key = next(
        c
        for c in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID")
        if c in frame.columns
    )
    out = frame.sort_values(key, ignore_index=True)
    out.attrs = {}
    return out


@pytest.mark.parametrize(
    ("level", "patient", "modalities", "more"),
    [
        ("patient", None, (), ""),
        ("study", None, ("MR",), ""),
        ("study", "PF*", (), "StudyDate=20000101-"),
        ("series", None, ("CT", "MR"), ""),
        ("series", None, (), "SeriesNumber=1"),
        ("image", "first", (), ""),
    ],
)
def test_same_form_same_frame_over_dicomweb(pacs, web, manifest, level, patient, modalities, more):
    if patient == "first":
        patient = manifest.PatientID.iloc[0]
    over_dimse = _flow(pacs, level, patient, modalities, more)
    over_web = _flow(web, level, patient, modalities, more)
    assert len(over_web.result) > 0
    pd.testing.assert_frame_equal(_sorted(over_web.result), _sorted(over_dimse.result))
    assert over_web.status.value == over_dimse.status.value
    assert over_web.model.query == over_dimse.model.query


def test_retrieve_over_dicomweb_fills_the_cache(web, manifest):
    form = pf.QueryForm(web, workers=2)
    assert "WADO-RS" in form.retrieve_button.tooltip and "no move" in form.retrieve_button.tooltip
    assert not hasattr(form, "move_button")
    form.level.value = "series"
    form.search_button.click()
    form.results.value = (0, 1)
    uids = set(form.selected.SeriesInstanceUID)
    form.retrieve_button.click()
    want = int(manifest.SeriesInstanceUID.isin(uids).sum())
    assert form.retrieved.completed == want and form.retrieved.failed == 0
    assert form.progress.value == form.progress.max == want
    assert f"Retrieved {want} objects (0 failed, 0 already cached)" in form.status.value
    cached = web.cache.instances()
    assert set(cached.SeriesInstanceUID) == uids and len(cached) == want
    assert sorted(cached.SOPInstanceUID) == sorted(
        manifest[manifest.SeriesInstanceUID.isin(uids)].SOPInstanceUID
    )
    form.retrieve_button.click()
    assert form.retrieved.completed == 0 and form.retrieved.cached == want


def test_patient_rows_over_dicomweb_come_through_their_studies(web, manifest):
    form = pf.QueryForm(web)
    form.level.value = "patient"
    form.search_button.click()
    patient = manifest.PatientID.iloc[0]
    form.select([int(form.result.index[form.result.PatientID == patient][0])])
    form.retrieve_button.click()
    want = int((manifest.PatientID == patient).sum())
    assert form.retrieved.completed == want, form.status.value
    assert form.progress.value == form.progress.max == want
    assert set(web.cache.instances().PatientID) == {patient}


def test_dicomweb_errors_are_sentences(web, tmp_path):
    form = pf.QueryForm(web)
    form.more_keys.value = "PatientsName=X"
    form.search_button.click()
    assert "did you mean 'PatientName'" in form.status.value
    unreachable = pf.DICOMweb(f"http://127.0.0.1:{_free_port()}", cache=tmp_path / "c")
    form = pf.QueryForm(unreachable)
    assert form.search() is False
    assert 'data-kind="error"' in form.status.value and "Traceback" not in form.status.value
    assert "could not connect to" in form.status.value
    assert (
        "C-GET" in pf.QueryForm(pf.PACS("127.0.0.1", 4242, cache=tmp_path)).retrieve_button.tooltip
    )
