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


DROP = (0, b"")  # a fault's answer: close the connection without a response


def _proxy(upstream: str, fault: Callable[[str, dict[str, str]], tuple[int, bytes] | None]):
    """A front server that forwards to ``upstream`` unless ``fault(path, params)`` answers
    (``(status, body)``, ``(status, body, headers)``, or ``DROP``: the connection is
    closed without a response)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            params = dict(parse_qsl(parts.query, keep_blank_values=True))
            answer = fault(parts.path, params)
            if answer == DROP:
                self.close_connection = True
                return
            if answer is None:
                rest = self.path.removeprefix("/dicom-web")
                got = requests.get(upstream + rest, headers={"Accept": "application/dicom+json"})
                status, body = got.status_code, got.content
                headers = {
                    k: v for k, v in got.headers.items() if k in ("Content-Type", "Warning")
                }
            else:  # (status, body) or (status, body, headers)
                status, body, *given = answer
                headers = given[0] if given else {"Content-Type": "text/plain"}
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return _serve(Handler)


@contextlib.contextmanager
def proxied(upstream: str, fault, page: int = 2):
    """A DICOMweb client (pages of ``page`` rows) through ``_proxy``."""
    httpd, url = _proxy(upstream, fault)
    try:
        web = pf.DICOMweb(url)
        web._page = page
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
    small._page = 2
    same(dimse.find_studies(), small.find_studies(), "STUDY")
    same(
        dimse.find_instances(dimse.find_studies()),
        small.find_instances(small.find_studies()),
        "IMAGE",
    )


def _asked(asked: list, count: int) -> list:
    """``asked`` sorted by offset once it holds ``count`` requests (an abandoned request
    ahead may reach the proxy after the search returned); bounded, 10 s at most."""
    for _ in range(200):
        if len(asked) >= count:
            break
        time.sleep(0.05)
    return sorted(asked, key=lambda a: [_number(x) for x in (a if isinstance(a, tuple) else [a])])


def _number(value):
    return int(value) if str(value).isdigit() else value


def _last_page(total: int, page: int) -> int:
    """The offset of the page that ends an answer of ``total`` rows (fewer than a page)."""
    return total - total % page


def test_pages_are_asked_one_ahead(server, dimse):
    """Every request asks limit=_page; each page is asked with the one after it, so a
    multi-page answer costs its pages plus one abandoned request, a one-page answer two."""
    asked = []

    def fault(path, params):
        asked.append((params.get("limit"), params.get("offset", "0")))
        return None

    expected = dimse.find_studies()
    total = len(expected)
    assert total > 4  # several pages of 2
    with proxied(server.url, fault) as web:
        got = web.find_studies(progress=False)
        pages = _asked(asked, total // 2 + 2)
        asked.clear()
        one = web.find_studies(StudyInstanceUID=got.StudyInstanceUID.iloc[0], progress=False)
        single = _asked(asked, 2)
    same(expected, got, "STUDY")
    last = _last_page(total, 2)
    assert pages == [("2", str(o)) for o in range(0, last + 4, 2)]
    assert len(one) == 1 and single == [("2", "0"), ("2", "2")]
    asked.clear()
    with proxied(server.url, fault, page=1000) as web:  # the default page size
        assert web._page == pf.DICOMweb._page == 1000
        same(expected, web.find_studies(progress=False), "STUDY")
    assert _asked(asked, 2) == [("1000", "0"), ("1000", "1000")]


def test_search_below_one_parent_asks_its_first_page_alone(server, dimse):
    """A drill-down's search per parent (/studies/{uid}/series) asks no page ahead of its
    first: such answers seldom fill a page. A full first page is followed as usual."""
    asked = []

    def fault(path, params):
        if path.endswith("/series"):
            asked.append((path.split("/")[-2], int(params.get("offset", "0"))))
        return None

    studies = dimse.find_studies()
    expected = dimse.find_series(studies)
    offsets = {}
    for uid in studies.StudyInstanceUID:
        count = int((expected.StudyInstanceUID == uid).sum())
        # One page, not full: that request alone. Full: the pages from there on go one
        # ahead (the last one abandoned).
        offsets[uid] = [0] if count < 2 else list(range(0, _last_page(count, 2) + 4, 2))
    with proxied(server.url, fault) as web:
        got = web.find_series(studies, progress=False)
        _asked(asked, sum(len(o) for o in offsets.values()))
    same(expected, got, "SERIES")
    assert {uid: sorted(o for u, o in asked if u == uid) for uid in offsets} == offsets
    assert any(o != [0] for o in offsets.values()) and any(o == [0] for o in offsets.values())


@pytest.mark.parametrize("failure", [(500, b"Internal error\n"), (400, b"bad offset\n"), DROP])
def test_failed_request_ahead_that_is_not_needed_is_ignored(server, dimse, failure, caplog):
    caplog.set_level(logging.DEBUG)
    expected = dimse.find_studies()
    total = len(expected)
    uid = expected.StudyInstanceUID.iloc[0]
    failed = []

    def fault(path, params):
        # Only requests past the answer's end fail: the page asked ahead of the last.
        offset = int(params.get("offset", "0"))
        if offset > total or (params.get("StudyInstanceUID") == uid and offset > 0):
            failed.append(offset)
            return failure
        return None

    with proxied(server.url, fault) as web:
        got = web.find_studies(progress=False)
        one = web.find_studies(StudyInstanceUID=uid, progress=False)
    same(expected, got, "STUDY")
    assert len(one) == 1 and one.StudyInstanceUID.iloc[0] == uid
    assert _asked(failed, 2) == sorted([_last_page(total, 2) + 2, 2])
    assert "Internal error" not in caplog.text and "bad offset" not in caplog.text


@pytest.mark.parametrize("failure", [(500, b"Internal error\n"), (400, b"bad offset\n"), DROP])
def test_failed_first_page_is_raised(server, failure):
    def fault(path, params):
        return failure if "offset" not in params else None

    with proxied(server.url, fault) as web, pytest.raises(pf.PacsFrameError) as info:
        web.find_studies(progress=False)
    if failure == DROP:
        assert isinstance(info.value, pf.AssociationError)
    else:
        assert isinstance(info.value, pf.HTTPError) and info.value.status == failure[0]
    assert getattr(info.value, "partial", None) is None


@pytest.mark.filterwarnings("ignore:.*capped the STUDY-level QIDO-RS answer")
@pytest.mark.parametrize("warning", [True, False])
def test_server_maximum_below_the_page(cohort, dimse, warning):
    # The demo answers at most 3 matches per request (its max_results), with or
    # without a Warning header; pages of 5 asked.
    expected = dimse.find_studies()
    assert len(expected) > 6
    asked = []

    def fault(path, params):
        asked.append(params.get("offset", "0"))
        return None

    with (
        DemoPACS(cohort[0], http_port=0, max_results=3, qido_cap_warning=warning) as capped,
        proxied(capped.url, fault, page=5) as web,
    ):
        got = web.find_studies(progress=False)
        if not warning:  # a silent maximum is seen only through max_results=
            web.max_results = 3
            split = web.find_studies(progress=False)
    if warning:
        # Followed from where each page ended; the maximum becomes the step, so the
        # request asked ahead of the first page (at 5) is the only one abandoned.
        same(expected, got, "STUDY")
        for _ in range(200):  # the abandoned request may reach the proxy late
            if "5" in asked:
                break
            time.sleep(0.05)
        offsets = set(asked)
        assert {"0", "3", "5", "6"} <= offsets and not offsets & {"8", "10"}
    else:
        assert len(got) == 3  # invisible: the page of 3 < 5 ends the answer
        assert split.attrs["pacsframe"]["split"] is True
        same(expected, split, "STUDY")


@pytest.mark.parametrize("ignored", ["limit", "limit and offset"])
def test_server_ignoring_limit_types_each_row_once(server, dimse, ignored):
    def fault(path, params):
        dropped = ("limit", "offset") if "offset" in ignored else ("limit",)
        keys = {k: v for k, v in params.items() if k not in dropped}
        got = requests.get(server.url + path.removeprefix("/dicom-web"), params=keys)
        return got.status_code, got.content, {"Content-Type": "application/dicom+json"}

    with proxied(server.url, fault) as web:
        got = web.find_studies(progress=False, timeout=60)  # bounded, were it to loop
    same(dimse.find_studies(), got, "STUDY")
    assert not got.StudyInstanceUID.duplicated().any()
    assert got.attrs["pacsframe"]["split"] is False  # the whole answer, not a cut one


@pytest.mark.filterwarnings("ignore:.*capped the STUDY-level QIDO-RS answer")
def test_server_ignoring_offset_is_split_not_repeated(server, dimse):
    # Each page answered from the start: the repeated page is seen, never typed, and
    # the answer is split by dates like a capped one.
    def fault(path, params):
        keys = {k: v for k, v in params.items() if k != "offset"}
        got = requests.get(server.url + path.removeprefix("/dicom-web"), params=keys)
        return got.status_code, got.content, {"Content-Type": "application/dicom+json"}

    with proxied(server.url, fault) as web:
        got = web.find_studies(progress=False, timeout=60)  # bounded, were it to loop
    same(dimse.find_studies(), got, "STUDY")
    assert got.attrs["pacsframe"]["split"] is True
    assert not got.StudyInstanceUID.duplicated().any()


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
    # The failing page was asked ahead (with the one before it); its error is raised
    # when it is taken, nothing partial. The page after it was asked ahead too (when the
    # failing one was taken), and none after that.
    assert _asked(asked, 4) == ["0", "2", "4", "6"]
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
        asked_once = list(_asked(asked, len(got) // 2 + 2))
        asked.clear()
        small = web.find_studies(StudyInstanceUID=got.StudyInstanceUID.iloc[0], progress=False)
    assert seen == [True, True]
    same(dimse.find_studies(), got, "STUDY")
    # Each page once: the full ones, the short one that ends the answer, and the one
    # asked ahead of it (abandoned).
    assert asked_once == [str(2 * i) for i in range(len(got) // 2 + 2)]
    assert _asked(asked, 2) == ["0", "2"] and len(small) == 1  # one page: two requests


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
    web._page = 2
    web.echo()
    patients = web.find_patients(PatientName=first.PatientName, PatientID=first.PatientID)
    assert len(patients) == 1
    studies = web.find_studies(PatientID=first.PatientID, PatientName="*")
    web.find_instances(web.find_series(studies))
    text = UID.sub("<uid>", caplog.text)
    assert "/studies" in text  # requests are logged, by path
    leaked = [value for value in identifying_values(manifest) if value in text]
    assert not leaked
