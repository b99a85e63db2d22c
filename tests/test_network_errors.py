"""Association failures each end as an AssociationError that says what happened."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from servers import free_port

import pacsframe as pf


def test_connection_refused_names_host_and_port():
    port = free_port()
    pacs = pf.PACS("127.0.0.1", port, "NOBODY", connect_timeout=5)
    with pytest.raises(pf.AssociationError, match=f"refused by 127.0.0.1:{port}") as info:
        pacs.echo()
    assert info.value.reason == "refused"
    assert isinstance(info.value, ConnectionError)


@pytest.fixture
def silent_peer():
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_peer_that_never_answers_times_out(silent_peer):
    pacs = pf.PACS("127.0.0.1", silent_peer, "SILENT", acse_timeout=1)
    started = time.monotonic()
    with pytest.raises(pf.AssociationError, match="did not answer the association") as info:
        pacs.find_studies(PatientID="1")
    assert info.value.reason == "timeout"
    assert time.monotonic() - started < 20


@pytest.fixture
def hanging_find_peer():
    """A real DICOM peer that accepts the association, then never answers C-FIND."""
    release = threading.Event()

    def on_find(event):
        release.wait(60)  # bounded: the test ends long before
        yield 0xC000, None

    ae = AE(ae_title="HANGS")
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    yield server.server_address[1]
    release.set()
    server.shutdown()


def test_find_that_never_answers_times_out(hanging_find_peer):
    # Long enough for a busy machine to answer the echo, short against the hang.
    pacs = pf.PACS("127.0.0.1", hanging_find_peer, "HANGS", dimse_timeout=5)
    pacs.echo()  # the association itself works
    with pytest.raises(pf.AssociationError, match="no STUDY-level C-FIND response") as info:
        pacs.find_studies(PatientID="1")
    assert info.value.reason == "timeout"
    assert "dimse_timeout" in str(info.value)


def test_wrong_called_ae_is_rejected_by_orthanc(orthanc):
    pacs = pf.PACS(orthanc.host, orthanc.dicom_port, "NOT-ORTHANC")
    with pytest.raises(pf.AssociationError, match="rejected the association") as info:
        pacs.find_studies()
    message = str(info.value)
    assert info.value.reason == "rejected"
    assert "'NOT-ORTHANC'" in message and "called AE" in message
    assert "reason:" in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port=0 must be"),
        ({"port": "104"}, "must be an integer"),
        ({"ae_title": "A" * 17}, "not a valid AE title"),
        ({"ae_title": ""}, "non-empty AE title"),
        ({"calling_ae": "BAD\\AE"}, "not a valid AE title"),
        ({"dimse_timeout": 0}, "positive number of seconds"),
    ],
)
def test_bad_peer_settings_fail_before_connecting(kwargs, message):
    settings = {"host": "127.0.0.1", "port": 104, "ae_title": "X", **kwargs}
    with pytest.raises(pf.QueryError, match=message):
        pf.PACS(**settings)


def test_query_errors_are_raised_before_connecting():
    # Nothing listens on this port: a QueryError proves nothing was attempted.
    pacs = pf.PACS("127.0.0.1", free_port(), "X")
    with pytest.raises(pf.QueryError, match="wildcards are not allowed"):
        pacs.find_studies(StudyDate="2026*")
    with pytest.raises(pf.QueryError, match="needs StudyInstanceUID"):
        pacs.find_series(Modality="CT")
    with pytest.raises(pf.QueryError, match="did you mean"):
        pacs.find_studies(PatientNme="X")


@pytest.fixture
def aborting_peer():
    """A TCP peer that reads the A-ASSOCIATE-RQ and answers with an A-ABORT PDU."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    server.settimeout(10)

    def answer() -> None:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            return
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            # A-ABORT: type 0x07, length 4, source 2 (service provider), reason 0.
            conn.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0]))
            time.sleep(0.5)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    thread.join(15)
    server.close()


def test_peer_that_aborts_the_association_request(aborting_peer):
    pacs = pf.PACS("127.0.0.1", aborting_peer, "ABORTS")
    with pytest.raises(pf.AssociationError, match="aborted the association request") as info:
        pacs.echo()
    assert info.value.reason == "aborted"


@pytest.fixture
def aborting_find_peer():
    """A real DICOM peer that aborts the association when it gets a C-FIND."""

    def on_find(event):
        event.assoc.abort()
        yield 0xC000, None

    ae = AE(ae_title="ABORTS")
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    yield server.server_address[1]
    server.shutdown()


def test_abort_during_find(aborting_find_peer):
    pacs = pf.PACS("127.0.0.1", aborting_find_peer, "ABORTS", dimse_timeout=20)
    with pytest.raises(pf.AssociationError, match="aborted the association during") as info:
        pacs.find_studies()
    assert info.value.reason == "aborted"


def test_peer_without_c_get_says_use_move(tmp_path):
    ae = AE(ae_title="FINDONLY")
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        pacs = pf.PACS("127.0.0.1", server.server_address[1], "FINDONLY", cache=tmp_path)
        with pytest.raises(pf.NotSupported, match=r"pacs\.move\(frame\)"):
            pacs.get(["1.2.3"], progress=False)
    finally:
        server.shutdown()


def test_a_kept_association_the_peer_closed_while_idle_is_replaced(tmp_path):
    """Inside ``with pacs:`` an association the peer dropped between calls (its idle
    timeout, a restart) is noticed before reuse and a new one is opened."""
    from pacsframe.demo import DemoPACS, make_cohort

    make_cohort(tmp_path / "src", patients=2, matrix=8, instances_per_series=1)
    with DemoPACS(tmp_path / "src") as server:
        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title)
        with pacs:
            studies = len(pacs.find_studies())
            first = pacs._held["net:query"]
            server.stop()  # closes every association it serves
            server.start()  # same port
            assert len(pacs.find_studies()) == studies
            assert pacs._held["net:query"] is not first
