"""The DICOMweb transport: pacsframe's errors for HTTP failures, over real loopback HTTP.

Small ``http.server`` peers stand in for misbehaving archives (slow, failing); the
demo PACS's DICOMweb side stands in for a well-behaved one, with and without basic auth.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import pacsframe as pf
from pacsframe.deadline import deadline_for
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.webhttp import WebTransport, redact

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("webhttp")
    make_cohort(
        folder,
        patients=2,
        seed=5,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=1,
        matrix=8,
    )
    return folder


@pytest.fixture(scope="module")
def locked(folder):
    with DemoPACS(folder, http_port=0, http_auth=("alice", PASSWORD)) as server:
        yield server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        status = 500 if self.path.startswith("/fail") else 200
        body = b"Internal failure: the database is locked\nsecond line\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


@pytest.fixture(scope="module")
def odd():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_redact_and_base():
    t = WebTransport(f"http://alice:{PASSWORD}@127.0.0.1:1/dicom-web/")
    assert t.base == "http://127.0.0.1:1/dicom-web"
    assert t.auth == ("alice", PASSWORD)
    assert PASSWORD not in repr(t)
    assert redact("http://u:p@h/x?token=abc&PatientID=1") == "http://h/x?token=***&PatientID=1"
    with pytest.raises(pf.QueryError):
        WebTransport("ftp://host/x")


def test_refused():
    t = WebTransport(f"http://127.0.0.1:{_free_port()}/dicom-web", timeout=2)
    with pytest.raises(pf.AssociationError) as info:
        t.request("GET", "/studies", what="QIDO-RS search for studies")
    assert info.value.reason == "refused"
    assert "QIDO-RS search for studies" in str(info.value)


def test_auth(locked, caplog):
    caplog.set_level(logging.DEBUG, logger="pacsframe")
    with pytest.raises(pf.AssociationError) as info:
        WebTransport(locked.url).request("GET", "/studies", what="QIDO-RS search for studies")
    assert info.value.reason == "auth" and "credentials" in str(info.value)
    wrong = WebTransport(locked.url, auth=("alice", PASSWORD + "x"))
    with pytest.raises(pf.AssociationError) as info:
        wrong.request("GET", "/studies", params={"PatientID": "P-SECRET"}, what="QIDO-RS search")
    assert info.value.reason == "auth"
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(wrong)
    header = WebTransport(locked.url, headers={"Authorization": f"Bearer {PASSWORD}"})
    with pytest.raises(pf.AssociationError) as info:
        header.request("GET", "/studies", what="QIDO-RS search")
    assert PASSWORD not in str(info.value)
    good = WebTransport(locked.url, auth=("alice", PASSWORD))
    response = good.request("GET", "/studies", params={"PatientID": "P-SECRET"}, what="QIDO")
    assert response.status_code in (200, 204)
    assert PASSWORD not in caplog.text and "P-SECRET" not in caplog.text
    assert "/studies" in caplog.text


def test_missing(locked):
    t = WebTransport(locked.url, auth=("alice", PASSWORD))
    with pytest.raises(pf.NotSupported) as info:
        t.request("GET", "/no-such-service", what="WADO-RS retrieve")
    assert info.value.status == 404
    response = t.request("GET", "/no-such-service", what="WADO-RS retrieve", missing="return")
    assert response.status_code == 404


def test_http_error_and_timeouts(odd):
    t = WebTransport(odd, timeout=(2, 0.5))
    with pytest.raises(pf.HTTPError) as info:
        t.request("GET", "/fail", what="QIDO-RS search for studies")
    assert info.value.status == 500
    assert info.value.comment == "Internal failure: the database is locked"
    assert isinstance(info.value, pf.DimseError)
    with pytest.raises(pf.AssociationError) as info:
        t.request("GET", "/slow", what="QIDO-RS search for studies")
    assert info.value.reason == "timeout"
    slow = WebTransport(odd, timeout=30)
    started = time.monotonic()
    with pytest.raises(pf.AssociationError) as info, deadline_for(0.5, "find_studies"):
        slow.request("GET", "/slow", what="QIDO-RS search for studies")
    assert time.monotonic() - started < 2
    assert info.value.reason == "timeout" and "timeout=0.5" in str(info.value)


def test_returned_statuses_come_back_with_their_body(odd, locked):
    t = WebTransport(odd)
    response = t.request("GET", "/fail", what="STOW-RS of 1 object(s)", returned=(500,))
    assert response.status_code == 500 and response.text.startswith("Internal failure")
    error = t.error(response, "STOW-RS of 1 object(s)")
    assert isinstance(error, pf.HTTPError) and error.status == 500
    assert error.comment == "Internal failure: the database is locked"
    streamed = t.request("GET", "/fail", what="WADO-RS", returned=(500,), stream=True)
    assert t.error(streamed, "WADO-RS", stream=True).comment == error.comment
    with pytest.raises(pf.HTTPError):  # a status not asked for still raises
        t.request("GET", "/fail", what="STOW-RS of 1 object(s)", returned=(409,))
    with pytest.raises(pf.AssociationError) as info:  # 401 always raises
        WebTransport(locked.url).request("GET", "/studies", what="QIDO-RS", returned=(401,))
    assert info.value.reason == "auth"
