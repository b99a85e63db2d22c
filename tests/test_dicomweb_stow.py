"""STOW-RS per-object statuses against real peers: Orthanc's DICOMweb plugin and the demo.

Each store call has some objects accepted and some refused; the ``StoreResult``
must name exactly which failed (SOP Instance UID, status, FailureReason) and what
it calls stored must be what the peer holds, asked through the peer's own API
(Orthanc's REST ``/instances``, the demo's index). What Debian's
orthanc-dicomweb 1.7 (with Orthanc 1.10) answers, read in its ``StowRs.cpp`` and
seen here:

* ``POST /studies/{study}`` with an object of another study: that object in the
  FailedSOPSequence (FailureReason 0x0110), the others stored: HTTP 409.
* an object without SeriesInstanceUID: FailedSOPSequence (0xC000), the others
  stored: HTTP 400 (the standard's 400 means none stored).
* an object Orthanc cannot store (storage full, a protected patient): the
  plugin's request stops there and answers 200 naming only the objects before it
  (both sequences present, the failed one empty), so the unnamed objects are
  failed rows, and Orthanc holds none of them.

What the plugin cannot report: an object a Lua ``ReceivedInstanceFilter`` drops is
listed as stored (ReferencedSOPSequence, HTTP 200) although Orthanc does not keep
it, and it never answers 202. The demo answers as PS3.18 10.5.3 says: 200 all
stored, 202 some, 409 none.
"""

from __future__ import annotations

import http.server
import logging
import threading
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import requests
from pydicom import dcmread
from pydicom.uid import generate_uid
from servers import OrthancServer, require_tool

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Two patients, one study each, three instances each."""
    return make_cohort(
        tmp_path_factory.mktemp("stow-cohort"),
        patients=2,
        seed=31,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=3,
        matrix=8,
    )


def _split(cohort: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    first = cohort.StudyInstanceUID.iloc[0]
    a, b = cohort[cohort.StudyInstanceUID == first], cohort[cohort.StudyInstanceUID != first]
    assert len(a) == 3 and len(b) == 3 and a.PatientID.nunique() == b.PatientID.nunique() == 1
    return a, b


@pytest.fixture
def orthanc(tmp_path):
    require_tool("Orthanc")
    if not Path(PLUGIN).is_file():
        pytest.skip("Debian's orthanc-dicomweb plugin is not installed")
    servers: list[OrthancServer] = []

    def start(**extra) -> OrthancServer:
        config = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        server = OrthancServer(tmp_path / f"orthanc{len(servers)}", extra_config=config | extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def _held_by_orthanc(server: OrthancServer) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in server.rest("GET", "/instances?expand")}


def _user_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback: never through a proxy
    return session


def _statuses(result) -> dict[str, tuple[str, int | None]]:
    frame = result.instances
    return {
        r.SOPInstanceUID: (r.status, None if pd.isna(r.code) else int(r.code))
        for r in frame.itertuples()
    }


def _http_statuses(caplog) -> list[int]:
    """The statuses of the STOW-RS POSTs, from pacsframe's request log lines."""
    return [
        int(r.getMessage().split(": ")[1].split(",")[0])
        for r in caplog.records
        if r.name == "pacsframe" and r.getMessage().startswith("HTTP POST ")
    ]


def _check_consistent(result, held: set[str], sent: pd.Series) -> None:
    """What the result calls stored is exactly what the peer holds of what was sent."""
    completed = set(result.instances.SOPInstanceUID[result.instances.status == "completed"])
    assert completed == held & set(sent)
    assert result.completed + result.failed == len(sent) and result.warning == 0


# --- Orthanc -----------------------------------------------------------------------------


@pytest.mark.orthanc
def test_orthanc_409_other_study_objects_fail_the_rest_are_stored(orthanc, cohort, caplog):
    server = orthanc()
    a, b = _split(cohort)
    session = _user_session()
    hooks = {k: list(v) for k, v in session.hooks.items()}
    client = pf.DICOMweb(server.url + "/dicom-web", session=session)
    mixed = pd.concat([a.iloc[:2], b.iloc[:1], a.iloc[2:], b.iloc[1:]])
    with caplog.at_level(logging.INFO, logger="pacsframe"):
        result = client.store(mixed, study=a.StudyInstanceUID.iloc[0])
    assert _http_statuses(caplog) == [409]
    expected = {uid: ("completed", 0) for uid in a.SOPInstanceUID}
    expected |= {uid: ("failed", 0x0110) for uid in b.SOPInstanceUID}
    assert _statuses(result) == expected
    assert list(result.instances.SOPInstanceUID) == list(mixed.SOPInstanceUID)
    assert (result.completed, result.failed) == (3, 3)
    assert result.failed_instances.error.str.startswith("0x0110").all()
    assert _held_by_orthanc(server) == set(a.SOPInstanceUID)
    _check_consistent(result, _held_by_orthanc(server), mixed.SOPInstanceUID)
    # The caller's session is used as given: no hook added, and it stays open.
    assert {k: list(v) for k, v in session.hooks.items()} == hooks
    client.close()
    assert session.get(server.url + "/system", timeout=5).status_code == 200


@pytest.mark.orthanc
def test_orthanc_400_object_without_series_uid_fails_the_rest_are_stored(orthanc, cohort, caplog):
    server = orthanc()
    a, _ = _split(cohort)
    broken = dcmread(a.path.iloc[0])
    broken.SOPInstanceUID = generate_uid()
    del broken.SeriesInstanceUID
    client = pf.DICOMweb(server.url + "/dicom-web", session=_user_session())
    with caplog.at_level(logging.INFO, logger="pacsframe"):
        result = client.store([a.path.iloc[1], broken, a.path.iloc[2]])
    assert _http_statuses(caplog) == [400]
    assert _statuses(result) == {
        a.SOPInstanceUID.iloc[1]: ("completed", 0),
        broken.SOPInstanceUID: ("failed", 0xC000),
        a.SOPInstanceUID.iloc[2]: ("completed", 0),
    }
    assert _held_by_orthanc(server) == set(a.SOPInstanceUID.iloc[1:])
    sent = pd.Series([a.SOPInstanceUID.iloc[1], broken.SOPInstanceUID, a.SOPInstanceUID.iloc[2]])
    _check_consistent(result, _held_by_orthanc(server), sent)


@pytest.mark.orthanc
def test_orthanc_full_storage_stops_the_request_and_unnamed_objects_fail(orthanc, cohort, caplog):
    """One patient at most, and that one protected: a second patient's object cannot be
    stored; the plugin stops the request there and answers 200 naming the earlier ones."""
    server = orthanc(MaximumPatientCount=1)
    a, b = _split(cohort)
    client = pf.DICOMweb(server.url + "/dicom-web", session=_user_session())
    assert client.store(a.path.iloc[:1]).completed == 1
    (patient,) = server.rest("GET", "/patients")
    server.rest("PUT", f"/patients/{patient}/protected", b"1")
    sent = [a.path.iloc[1], b.path.iloc[0], a.path.iloc[2]]
    with caplog.at_level(logging.INFO, logger="pacsframe"):
        result = client.store(sent)
    assert _http_statuses(caplog)[-1:] == [200]
    statuses = _statuses(result)
    assert statuses[a.SOPInstanceUID.iloc[1]] == ("completed", 0)
    assert statuses[b.SOPInstanceUID.iloc[0]][0] == "failed"
    assert "does not name it" in result.failed_instances.error.iloc[0]
    held = _held_by_orthanc(server)
    assert b.SOPInstanceUID.iloc[0] not in held
    _check_consistent(result, held, pd.Series([dcmread(p).SOPInstanceUID for p in sent]))


# --- the demo PACS ------------------------------------------------------------------------


def test_demo_202_other_study_objects_fail_the_rest_are_stored(cohort, tmp_path, caplog):
    a, b = _split(cohort)
    mixed = pd.concat([b.iloc[:1], a, b.iloc[1:]])
    with DemoPACS(tmp_path / "empty", http_port=0) as server:
        client = pf.DICOMweb(server.url, session=_user_session())
        with caplog.at_level(logging.INFO, logger="pacsframe"):
            result = client.store(mixed, study=a.StudyInstanceUID.iloc[0])
            nothing = client.store(b, study=a.StudyInstanceUID.iloc[0])
        held = set(server.instances().SOPInstanceUID)
    assert _http_statuses(caplog) == [202, 409]
    expected = {uid: ("completed", 0) for uid in a.SOPInstanceUID}
    expected |= {uid: ("failed", 0xA900) for uid in b.SOPInstanceUID}
    assert _statuses(result) == expected
    assert (result.completed, result.failed) == (3, 3)
    assert held == set(a.SOPInstanceUID)
    _check_consistent(result, held, mixed.SOPInstanceUID)
    assert _statuses(nothing) == {uid: ("failed", 0xA900) for uid in b.SOPInstanceUID}


def test_study_must_be_a_uid_before_sending(cohort):
    client = pf.DICOMweb("http://127.0.0.1:9")  # nothing listens: must not be reached
    for bad in ("../etc", "1.2.3/series", 123):
        with pytest.raises(pf.QueryError, match="study="):
            client.store(cohort.path.iloc[:1], study=bad)


# --- failures that are not a Store Instances Response --------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    """Reads the whole request body (Content-Length or chunked, keeping none of it) and
    answers ``server.answer`` = (status, content type, body)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.server.chunks += _drain(self)  # type: ignore[attr-defined]
        status, ctype, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _drain(handler: http.server.BaseHTTPRequestHandler) -> int:
    """Read the request body; the number of chunks (0 for a Content-Length body)."""
    chunks = 0
    if "chunked" in handler.headers.get("Transfer-Encoding", ""):
        for _ in range(1_000_000):  # bounded: far more chunks than any test sends
            size = int(handler.rfile.readline(100).split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline(100)
                return chunks
            while size:
                size -= len(handler.rfile.read(min(size, 65536)))
            handler.rfile.readline(10)
            chunks += 1
        raise AssertionError("too many chunks")
    left = int(handler.headers["Content-Length"])
    while left:
        left -= len(handler.rfile.read(min(left, 65536)))
    return chunks


@pytest.fixture
def answering():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.chunks = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "ctype", "body", "error", "reason"),
    [
        (409, "text/plain", b"study locked by another upload\nmore", pf.HTTPError, None),
        (400, "application/dicom+json", b"{}", pf.HTTPError, None),
        (415, "text/plain", b"only application/dicom", pf.HTTPError, None),
        (500, "text/plain", b"database is down", pf.HTTPError, None),
        (404, "text/plain", b"no STOW here", pf.NotSupported, None),
        (501, "text/plain", b"no STOW here", pf.NotSupported, None),
        (401, "text/plain", b"who are you", pf.AssociationError, "auth"),
        (403, "text/plain", b"not you", pf.AssociationError, "auth"),
    ],
)
def test_other_failures_raise_with_status_and_first_line(
    answering, cohort, status, ctype, body, error, reason
):
    answering.answer = (status, ctype, body)
    client = pf.DICOMweb(f"http://127.0.0.1:{answering.server_port}", session=_user_session())
    with pytest.raises(error) as info:
        client.store(cohort.path.iloc[:2])
    if reason is not None:
        assert info.value.reason == reason
    else:
        assert info.value.status == status
        assert info.value.comment == body.decode().splitlines()[0]
        assert f"HTTP {status}" in str(info.value)
    assert info.value.result.failed == 2  # every object a failed row, none lost


@pytest.mark.parametrize("kind", ["files", "datasets"])
def test_store_body_is_streamed(answering, tmp_path, kind):
    """Files go with a Content-Length, read in chunks; Datasets (no size known before
    encoding) with chunked transfer encoding, encoded one at a time: either way the
    peak is about one object or chunk, not the body."""
    manifest = make_cohort(
        tmp_path / "big",
        patients=1,
        seed=8,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=16,
        matrix=512,
    )
    size = sum(Path(p).stat().st_size for p in manifest.path)
    source = manifest if kind == "files" else [dcmread(p) for p in manifest.path]
    answering.answer = (200, "application/dicom+json", b"{}")
    client = pf.DICOMweb(f"http://127.0.0.1:{answering.server_port}", session=_user_session())
    tracemalloc.start()
    try:
        result = client.store(source)  # one request of 16 objects
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.completed == 16 and size > 8_000_000
    # Content-Length for files (no chunks); a chunk per yielded block for Datasets.
    assert (answering.chunks > 16) == (kind == "datasets")
    assert peak < size / 3, (peak, size)  # measured: ~1.9 MB (files), ~1.2 MB of 8.4 MB
