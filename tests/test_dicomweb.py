"""QIDO-RS through pf.DICOMweb against the demo PACS over real loopback HTTP.

The same test bodies run over DIMSE (pf.PACS) and DICOMweb on the same DemoPACS:
the frames must be equal column by column. Faults (a refused port, 401, 404, a slow
server, a 500 in the middle of paging) come from the demo's own options and from
small ``http.server`` peers in front of it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pandas as pd
import pytest
import requests

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort

PASSWORD = "pw-Xy7!secret"
UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("dicomweb")
    manifest = make_cohort(
        folder,
        patients=6,
        seed=11,
        studies_per_patient=(1, 3),
        series_per_study=(1, 3),
        instances_per_series=(1, 3),
        matrix=8,
    )
    return folder, manifest


@pytest.fixture(scope="module")
def server(cohort):
    with DemoPACS(cohort[0], http_port=0) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def dimse(server) -> pf.PACS:
    return pf.PACS("127.0.0.1", server.port, server.ae_title, dimse_timeout=30)


@pytest.fixture(scope="module")
def web(server) -> pf.DICOMweb:
    with pf.DICOMweb(server.url) as client:
        yield client


def same(a: pd.DataFrame, b: pd.DataFrame, level: str) -> None:
    """Equal column by column (names, order, dtypes, values), whatever the row order."""
    assert list(a.columns) == list(b.columns)
    key = UNIQUE[level]
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_like=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(handler: type[BaseHTTPRequestHandler]):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"


def _proxy(upstream: str, fault: Callable[[str, dict[str, str]], tuple[int, bytes] | None]):
    """A front server that forwards to ``upstream`` unless ``fault(path, params)`` answers."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            params = dict(parse_qsl(parts.query, keep_blank_values=True))
            answer = fault(parts.path, params)
            if answer is None:
                rest = self.path.removeprefix("/dicom-web")
                got = requests.get(upstream + rest, headers={"Accept": "application/dicom+json"})
                status, body = got.status_code, got.content
                headers = {
                    k: v for k, v in got.headers.items() if k in ("Content-Type", "Warning")
                }
            else:
                status, body = answer
                headers = {"Content-Type": "text/plain"}
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return _serve(Handler)


@contextlib.contextmanager
def proxied(upstream: str, fault, page: int = 2, limit: int | None = None):
    """A DICOMweb client (pages of ``page`` rows, ``limit`` asked) through ``_proxy``."""
    httpd, url = _proxy(upstream, fault)
    try:
        web = pf.DICOMweb(url)
        web._page, web._limit = page, page if limit is None else limit
        yield web
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the same answers over DIMSE and DICOMweb --------------------------------------------


@pytest.mark.parametrize(
    "call, keys",
    [
        ("find_patients", {}),
        ("find_patients", {"PatientName": "*"}),
        ("find_studies", {}),
        ("find_studies", {"ModalitiesInStudy": "CT"}),
        ("find_studies", {"StudyDate": ("2000-01-01", None), "return_keys": ["PatientAge"]}),
        ("find_studies", {"PatientName": "M*", "StudyTime": "0000-120000"}),
    ],
)
def test_same_frames(dimse, web, call, keys):
    a = getattr(dimse, call)(**keys)
    b = getattr(web, call)(**keys)
    level = "PATIENT" if call == "find_patients" else "STUDY"
    same(a, b, level)
    assert b.attrs["pacsframe"]["level"] == level


def test_same_drill_down(dimse, web, manifest=None):
    studies_a, studies_b = dimse.find_studies(), web.find_studies()
    same(studies_a, studies_b, "STUDY")
    series_a, series_b = dimse.find_series(studies_a), web.find_series(studies_b)
    same(series_a, series_b, "SERIES")
    same(dimse.find_instances(series_a), web.find_instances(series_b), "IMAGE")
    # Through a level in between, from a list of UIDs, with matching keys.
    same(dimse.find_instances(studies_a), web.find_instances(studies_b), "IMAGE")
    uids = studies_a.StudyInstanceUID.tolist()[:3]
    same(dimse.find_series(uids, Modality="MR"), web.find_series(uids, Modality="MR"), "SERIES")
    same(dimse.find_studies(dimse.find_patients()), web.find_studies(web.find_patients()), "STUDY")
    # Without drill-down: a UID list matches at the level's own key.
    pick = studies_a.StudyInstanceUID.tolist()[:2]
    same(
        dimse.find_studies(StudyInstanceUID=pick), web.find_studies(StudyInstanceUID=pick), "STUDY"
    )
    one = series_a.iloc[0]
    keys = {"StudyInstanceUID": one.StudyInstanceUID, "SeriesInstanceUID": one.SeriesInstanceUID}
    same(dimse.find_instances(**keys), web.find_instances(**keys), "IMAGE")


def test_empty_answer_has_the_columns(dimse, web):
    a = dimse.find_studies(PatientID="NOBODY")
    b = web.find_studies(PatientID="NOBODY")
    assert b.empty
    same(a, b, "STUDY")


@pytest.mark.parametrize(
    "call, args, keys",
    [
        ("find_studies", (), {"PatientNme": "X"}),
        ("find_studies", (), {"StudyDate": "2026*"}),
        ("find_studies", (), {"StudyDate": "2026-02-30"}),
        ("find_series", (), {"Modality": "CT"}),
        ("find_studies", (), {"timeout": 0}),
        ("find_series", ("1.2.3",), {}),
        ("find", ("nonsense",), {}),
    ],
)
def test_validation_is_the_same_and_sends_nothing(call, args, keys):
    # Nothing listens on either port: an error other than QueryError would mean a send.
    port = _free_port()
    dimse = pf.PACS("127.0.0.1", port, "NOBODY")
    web = pf.DICOMweb(f"http://127.0.0.1:{port}/dicom-web")
    with pytest.raises(pf.QueryError) as a:
        getattr(dimse, call)(*args, **keys)
    with pytest.raises(pf.QueryError) as b:
        getattr(web, call)(*args, **keys)
    assert str(a.value) == str(b.value)


def test_paging(web, dimse, server):
    small = pf.DICOMweb(server.url)
    small._page = small._limit = 2
    same(dimse.find_studies(), small.find_studies(), "STUDY")
    same(
        dimse.find_instances(dimse.find_studies()),
        small.find_instances(small.find_studies()),
        "IMAGE",
    )


def test_limit_larger_than_the_trusted_page(server, dimse):
    """Pages of _limit rows lose nothing: below _page rows an answer ends; a page of at
    least _page rows but fewer than asked is followed by one from where it ended."""
    asked = []

    def fault(path, params):
        asked.append((params.get("limit"), params.get("offset", "0")))
        return None

    with proxied(server.url, fault, limit=1000) as web:
        got = web.find_studies(progress=False)
        one = web.find_studies(StudyInstanceUID=got.StudyInstanceUID.iloc[0], progress=False)
    same(dimse.find_studies(), got, "STUDY")
    # The whole answer in the first page, then the empty page that proves it whole; a
    # page shorter than _page is whole by itself.
    assert asked == [("1000", "0"), ("1000", str(len(got))), ("1000", "0")]
    assert len(one) == 1


@pytest.mark.parametrize("warning", [True, False])
def test_server_maximum_between_page_and_limit_is_followed(cohort, dimse, warning):
    # The demo answers at most 3 matches per request (its max_results), with or
    # without a Warning header; asked for 5 rows a page, with pages of 2 trusted.
    with DemoPACS(cohort[0], http_port=0, max_results=3, qido_cap_warning=warning) as capped:
        web = pf.DICOMweb(capped.url)
        web._page, web._limit = 2, 5
        got = web.find_studies(progress=False)
    same(dimse.find_studies(), got, "STUDY")
    assert len(got) > 3


@pytest.mark.filterwarnings("ignore:.*capped the STUDY-level QIDO-RS answer")
@pytest.mark.parametrize("status", [400, 413])
def test_limit_refused_falls_back_to_the_page(server, dimse, status):
    asked = []

    def fault(path, params):
        asked.append(params.get("limit"))
        if int(params.get("limit", "0")) > 2 or params.get("PatientID") == "refused":
            return status, b"limit must be at most 2\n"
        return None

    with proxied(server.url, fault, limit=1000) as web:
        got = web.find_studies(progress=False)
        first = list(asked)
        asked.clear()
        again = web.find_studies(progress=False)
        second = list(asked)
    with proxied(server.url, fault, limit=1000) as bad:
        if status == 400:  # a 400 at the page size too is the query's fault: raised
            with pytest.raises(pf.HTTPError) as info:
                bad.find_studies(PatientID="refused", progress=False)
            assert info.value.status == 400
        else:  # a 413 at the page size too refuses the answer's size: split, then capped
            with pytest.raises(pf.ResultsCapped):
                bad.find_studies(PatientID="refused", progress=False)
    same(dimse.find_studies(), got, "STUDY")
    same(got, again, "STUDY")
    assert got.attrs["pacsframe"]["split"] is False
    assert first[:2] == ["1000", "2"] and set(first[2:]) == {"2"}
    assert set(second) == {"2"}  # the refusal is remembered
    assert asked[len(second) :][:2] == ["1000", "2"]


# --- capped answers ----------------------------------------------------------------------


def test_cap_with_warning_header(cohort, dimse):
    with DemoPACS(cohort[0], http_port=0, max_results=2) as capped:
        got = pf.DICOMweb(capped.url).find_studies()
    same(dimse.find_studies(), got, "STUDY")


@pytest.mark.filterwarnings("ignore:.*capped the STUDY-level QIDO-RS answer")
def test_silent_cap_is_split(cohort, dimse):
    with DemoPACS(cohort[0], http_port=0, max_results=2, qido_cap_warning=False) as capped:
        blind = pf.DICOMweb(capped.url).find_studies(progress=False)
        web = pf.DICOMweb(capped.url, max_results=2)
        got = web.find_studies(progress=False)
        assert got.attrs["pacsframe"]["split"] is True
        with pytest.raises(pf.ResultsCapped) as info:
            web.find_series(got, progress=False)
    assert len(blind) == 2  # a silent cap is invisible without max_results=
    expected = dimse.find_studies()
    same(expected, got, "STUDY")
    assert not got.StudyInstanceUID.duplicated().any()
    partial = info.value.partial
    assert not partial.SeriesInstanceUID.duplicated().any() and len(partial) > 0
    assert "QIDO-RS" in str(info.value)


@pytest.mark.filterwarnings("ignore:.*capped the STUDY-level QIDO-RS answer")
def test_413_is_split(server, dimse):
    def fault(path, params):
        # The server refuses an answer of more than 3 matches, as "too large".
        keys = {k: v for k, v in params.items() if k not in ("limit", "offset")}
        got = requests.get(server.url + path.removeprefix("/dicom-web"), params=keys)
        if got.status_code == 200 and len(got.json()) > 3:
            return 413, b"Request Entity Too Large: narrow the query\n"
        return None

    httpd, url = _proxy(server.url, fault)
    try:
        got = pf.DICOMweb(url).find_studies(StudyDate=("2000-01-01", "2030-12-31"), progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    expected = dimse.find_studies(StudyDate=("2000-01-01", "2030-12-31"))
    assert got.attrs["pacsframe"]["split"] is True
    same(expected, got, "STUDY")


def test_patient_level_has_no_parents(web):
    with pytest.raises(pf.QueryError, match="no parents"):
        web.find("patient", ["1.2.3"], model="patient")


# --- errors ------------------------------------------------------------------------------


def test_refused():
    web = pf.DICOMweb(f"http://127.0.0.1:{_free_port()}/dicom-web")
    with pytest.raises(pf.AssociationError) as info:
        web.find_studies()
    assert info.value.reason == "refused" and "QIDO-RS search for studies" in str(info.value)
    with pytest.raises(pf.AssociationError):
        web.echo()


def test_auth_and_credentials_never_shown(cohort, caplog):
    caplog.set_level(logging.DEBUG)
    with DemoPACS(cohort[0], http_port=0, http_auth=("alice", PASSWORD)) as locked:
        with pytest.raises(pf.AssociationError) as none:
            pf.DICOMweb(locked.url).find_studies()
        wrong = pf.DICOMweb(locked.url, auth=("alice", PASSWORD[:-1] + "?"))
        with pytest.raises(pf.AssociationError) as bad:
            wrong.find_studies(PatientID="PF-SECRET-ID")
        url = locked.url.replace("http://", f"http://alice:{PASSWORD}@")
        good = pf.DICOMweb(url)
        assert good.echo() >= 0
        found = good.find_studies(PatientID="PF-SECRET-ID")
        html = good._repr_html_()
    assert none.value.reason == "auth" and "credentials" in str(none.value)
    assert bad.value.reason == "auth"
    assert found.empty
    for text in (
        str(none.value),
        str(bad.value),
        repr(good),
        html,
        repr(wrong),
        str(found.attrs),
        caplog.text,
    ):
        assert PASSWORD not in text and PASSWORD[:-1] not in text
    assert "PF-SECRET-ID" not in caplog.text


def test_missing_service(server):
    web = pf.DICOMweb(server.url + "/not-here")
    with pytest.raises(pf.NotSupported) as info:
        web.find_studies()
    assert info.value.status == 404 and "service root" in str(info.value)
    with pytest.raises(pf.NotSupported):
        web.move(pd.DataFrame())


def test_slow_server_against_timeout():
    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(3)
            try:
                self.send_response(204)
                self.end_headers()
            except OSError:
                pass

    httpd, url = _serve(Slow)
    try:
        started = time.monotonic()
        with pytest.raises(pf.AssociationError) as info:
            pf.DICOMweb(url).find_studies(timeout=0.5)
        assert time.monotonic() - started < 2.5  # the server answers after 3 s
        assert info.value.reason == "timeout" and "timeout=0.5" in str(info.value)
        assert "web.find_studies()" in str(info.value)
        assert info.value.partial.empty
        assert "StudyInstanceUID" in info.value.partial.columns
        with pytest.raises(pf.AssociationError) as info:
            pf.DICOMweb(url, timeout=(2, 0.3)).echo()
        assert info.value.reason == "timeout"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_500_in_the_middle_of_paging(server):
    asked = []

    def fault(path, params):
        asked.append(params.get("offset", "0"))
        if params.get("offset") == "4":
            return 500, b"Database error: lock timeout\nTraceback ...\n"
        return None

    with proxied(server.url, fault) as web, pytest.raises(pf.HTTPError) as info:
        web.find_studies()
    # The failing page was asked ahead (while the page before it was typed); its
    # error is raised as it was, nothing partial, and no page after it is asked.
    assert asked == ["0", "2", "4"]
    assert info.value.status == 500
    assert info.value.comment == "Database error: lock timeout"
    assert "HTTP 500" in str(info.value) and isinstance(info.value, pf.DimseError)
    assert getattr(info.value, "partial", None) is None


def test_next_page_is_asked_while_the_page_before_is_typed(server, dimse, monkeypatch):
    second_asked = threading.Event()
    asked = []

    def fault(path, params):
        asked.append(params.get("offset", "0"))
        if params.get("offset") == "2":
            second_asked.set()
        return None

    seen: list[bool] = []
    add_json = pf.frames.FrameBuilder.add_json

    def typing(builder, obj):
        if len(builder) == 0:
            # The first row of the first page: the full page's successor is asked
            # before this page is typed, so it arrives while we wait here.
            seen.append(second_asked.wait(10))
        return add_json(builder, obj)

    monkeypatch.setattr(pf.frames.FrameBuilder, "add_json", typing)
    with proxied(server.url, fault) as web:
        got = web.find_studies(progress=False)
        asked_once = list(asked)
        asked.clear()
        small = web.find_studies(StudyInstanceUID=got.StudyInstanceUID.iloc[0], progress=False)
    assert seen == [True, True]
    same(dimse.find_studies(), got, "STUDY")
    # Each page once, in order: the full ones, then the short one that ends the answer.
    assert asked_once == [str(2 * i) for i in range(len(got) // 2 + 1)]
    assert asked == ["0"] and len(small) == 1  # one page, not full: nothing asked ahead


def test_slow_page_asked_ahead_against_timeout(server):
    def fault(path, params):
        if params.get("offset") == "2":
            time.sleep(3)  # the second page: asked ahead, answered too late
        return None

    with proxied(server.url, fault) as web:
        started = time.monotonic()
        with pytest.raises(pf.AssociationError) as info:
            web.find_studies(timeout=1, progress=False)
        assert time.monotonic() - started < 2.5  # the page comes after 3 s
    assert info.value.reason == "timeout" and "web.find_studies()" in str(info.value)
    # The rows of the first page, typed as usual; none of the late page.
    partial = info.value.partial
    assert len(partial) == 2 and partial.StudyInstanceUID.notna().all()
    assert partial.attrs["pacsframe"]["level"] == "STUDY"


# --- configuration -----------------------------------------------------------------------


def test_from_config(server, tmp_path, monkeypatch, dimse):
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[peers.web]\nurl = "{server.url}"\nuser = "alice"\nmax_results = 500\n'
        f'[peers.dimse]\nhost = "127.0.0.1"\nport = {server.port}\n'
        f'ae_title = "{server.ae_title}"\n'
    )
    monkeypatch.setenv("PACSFRAME_PASSWORD", PASSWORD)
    web = pf.DICOMweb.from_config("web", cfg)
    assert isinstance(web, pf.DICOMweb) and web.max_results == 500
    assert web.transport.auth == ("alice", PASSWORD)
    assert PASSWORD not in repr(web)
    same(dimse.find_studies(), web.find_studies(), "STUDY")  # the demo ignores basic auth
    assert isinstance(pf.PACS.from_config("web", cfg), pf.DICOMweb)
    with pytest.raises(pf.QueryError, match="DIMSE peer"):
        pf.DICOMweb.from_config("dimse", cfg)


def test_query_form_searches_over_dicomweb(web, dimse):
    patient = dimse.find_patients().PatientID.iloc[0]
    results = []
    for backend in (dimse, web):
        form = pf.QueryForm(backend)
        form.level.value = "study"
        form.patient_id.value = patient
        form.search_button.click()
        assert 'data-kind="ok"' in form.status.value
        results.append(form.result)
    same(results[0], results[1], "STUDY")


def test_logs_name_no_patient(server, cohort, caplog):
    from test_log_privacy import UID, identifying_values

    caplog.set_level(logging.DEBUG)
    for name in ("pacsframe", "urllib3", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    manifest = cohort[1]
    first = manifest.iloc[0]
    web = pf.DICOMweb(server.url)
    web._page = web._limit = 2
    web.echo()
    patients = web.find_patients(PatientName=first.PatientName, PatientID=first.PatientID)
    assert len(patients) == 1
    studies = web.find_studies(PatientID=first.PatientID, PatientName="*")
    web.find_instances(web.find_series(studies))
    text = UID.sub("<uid>", caplog.text)
    assert "/studies" in text  # requests are logged, by path
    leaked = [value for value in identifying_values(manifest) if value in text]
    assert not leaked
