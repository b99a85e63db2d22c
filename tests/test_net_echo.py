"""pacsframe.net over real sockets: C-ECHO and C-FIND against real peers.

Peers: the embedded demo PACS (pynetdicom), Orthanc and dcmtk's storescp (with
CI=true a missing Orthanc or dcmtk fails, never skips), plus tiny scripted
peers on loopback that break the protocol on purpose.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import dsutils
from servers import DcmtkStoreSCP, OrthancServer, require_tool
from test_tls import certs  # noqa: F401 (a fixture: the TLS tests' CA and certificates)

import pacsframe as pf
from pacsframe import net
from pacsframe.demo import DemoPACS
from pacsframe.errors import AssociationError, ProtocolError
from pacsframe.net import dimse, pdu
from pacsframe.net.driver import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION

pytestmark = pytest.mark.timeout(120)

STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@pytest.fixture(scope="module")
def strict_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An empty Orthanc that checks the called AE title."""
    require_tool("Orthanc")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-net"), check_called_aet=True)
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


# ----------------------------------------------------------------- real peers


def test_echo_demo_pacs(demo_server) -> None:
    seconds = net.echo("127.0.0.1", demo_server.port, called_ae=demo_server.ae_title)
    assert 0 < seconds < 60


def test_echo_orthanc(strict_orthanc: OrthancServer) -> None:
    with net.associate(
        strict_orthanc.host, strict_orthanc.dicom_port, called_ae=strict_orthanc.aet
    ) as assoc:
        assert assoc.accept.user_information.implementation_class_uid
        assert assoc.contexts == {1: (VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)}
        # Several echoes on one association: message IDs and state carry on.
        assert [assoc.echo() for _ in range(3)] == [0, 0, 0]


def test_orthanc_rejects_wrong_called_ae(strict_orthanc: OrthancServer) -> None:
    with pytest.raises(AssociationError) as info:
        net.echo(strict_orthanc.host, strict_orthanc.dicom_port, called_ae="NOT-ORTHANC")
    error = info.value
    assert error.reason == "rejected"
    assert not isinstance(error, ProtocolError)
    message = str(error)
    assert "rejected the association" in message
    assert "'NOT-ORTHANC'" in message and "Check that" in message


def test_echo_dcmtk_storescp(tmp_path: Path) -> None:
    require_tool("storescp")
    with DcmtkStoreSCP(tmp_path / "storescp") as server:
        seconds = net.echo("127.0.0.1", server.dicom_port, called_ae=server.aet)
    assert seconds > 0


def test_find_studies_matches_pacs_find(demo_server, cohort) -> None:
    """C-FIND over the new driver returns the rows PACS.find_studies returns."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = ""
    query.StudyDate = ""
    identifier = dsutils.encode(query, True, True)
    assert identifier is not None
    with net.associate(
        "127.0.0.1",
        demo_server.port,
        called_ae=demo_server.ae_title,
        contexts=[(STUDY_FIND, [IMPLICIT_VR_LITTLE_ENDIAN])],
    ) as assoc:
        answers = [
            dsutils.decode(BytesIO(raw), True, True) for raw in assoc.find(STUDY_FIND, identifier)
        ]
        # The association is still usable after a complete C-FIND.
        again = list(assoc.find(STUDY_FIND, identifier))
    ours = sorted((a.StudyInstanceUID, a.PatientID) for a in answers)
    frame = pf.PACS("127.0.0.1", demo_server.port, demo_server.ae_title).find_studies()
    theirs = sorted(zip(frame.StudyInstanceUID, frame.PatientID, strict=True))
    assert ours == theirs
    assert len(again) == len(answers) == cohort[1].StudyInstanceUID.nunique()


def test_find_closed_early_cancels_and_association_goes_on(demo_server) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    identifier = dsutils.encode(query, True, True)
    with net.associate(
        "127.0.0.1",
        demo_server.port,
        called_ae=demo_server.ae_title,
        contexts=[
            (STUDY_FIND, [IMPLICIT_VR_LITTLE_ENDIAN]),
            (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
        ],
    ) as assoc:
        results = assoc.find(STUDY_FIND, identifier)
        next(results)
        results.close()  # sends C-CANCEL and reads up to the final response
        assert assoc.echo() == 0


def test_find_responses_give_the_final_status_and_comment(demo_server, cohort) -> None:
    """Each pending response with its identifier, then the final one, judged by the caller."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    identifier = dsutils.encode(query, True, True)
    with net.associate(
        "127.0.0.1",
        demo_server.port,
        called_ae=demo_server.ae_title,
        contexts=[(STUDY_FIND, [IMPLICIT_VR_LITTLE_ENDIAN])],
    ) as assoc:
        assert assoc.idle
        responses = list(assoc.find_responses(STUDY_FIND, identifier))
        assert assoc.idle  # the final response came: nothing in flight
        *pending, final = responses
        assert {status for status, _, _ in pending} <= {0xFF00, 0xFF01}
        assert all(comment is None and data for _, comment, data in pending)
        assert len(pending) == cohort[1].StudyInstanceUID.nunique()
        assert final == (0x0000, None, None)
        # A failure status is the last item, not an exception: a bad level.
        query.QueryRetrieveLevel = "NONSENSE"
        *_, (status, _, data) = assoc.find_responses(STUDY_FIND, dsutils.encode(query, True, True))
        assert status not in (0x0000, 0xFF00, 0xFF01) and data is None
        assert assoc.idle


def test_not_supported_without_context(demo_server) -> None:
    with net.associate("127.0.0.1", demo_server.port, called_ae=demo_server.ae_title) as assoc:
        with pytest.raises(pf.NotSupported, match="accepted no presentation context"):
            list(assoc.find(STUDY_FIND, b""))
        assert assoc.echo() == 0


# ------------------------------------------------------- scripted faulty peers


class ScriptedPeer:
    """A one-connection TCP peer on loopback that runs ``script(conn)``."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self._script = script
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(30)
            self._script(conn)
            # Keep what the client sends afterwards (an A-ABORT), until it closes.
            for _ in range(100):
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                self.received += data

    def __enter__(self) -> ScriptedPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=30)
        self.listener.close()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    # Bounded: every pass gets at least one byte or raises (closed, or socket timeout).
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection")
        data += chunk
    return data


def _read_pdu(conn: socket.socket) -> bytes:
    header = _recv_exactly(conn, 6)
    (length,) = struct.unpack(">L", header[2:])
    return header + _recv_exactly(conn, length)


def _accept_bytes(max_length: int = 16384) -> bytes:
    return pdu.encode(
        pdu.AssociateAC(
            "SCP",
            "PACSFRAME",
            (pdu.PresentationContextAC(1, 0, IMPLICIT_VR_LITTLE_ENDIAN),),
            pdu.UserInformation(max_length, "1.2.3"),
        )
    )


def test_pdata_before_accept_aborts_with_protocol_error() -> None:
    def script(conn: socket.socket) -> None:
        _read_pdu(conn)
        conn.sendall(pdu.encode(pdu.PDataTF((pdu.PDV(1, True, True, b"early"),))))

    with (
        ScriptedPeer(script) as peer,
        pytest.raises(ProtocolError, match="P-DATA-TF while the association was awaiting"),
    ):
        net.echo("127.0.0.1", peer.port, called_ae="SCP", acse_timeout=20)
    assert pdu.decode(peer.received) == pdu.Abort(2, pdu.UNEXPECTED_PDU)


def _one_pdv(is_command: bool, data: bytes, context_id: int = 1) -> bytes:
    return pdu.encode(pdu.PDataTF((pdu.PDV(context_id, is_command, True, data),)))


# A C-ECHO-RSP that says a data set follows (to be followed by a command instead).
_ECHO_RSP_CLAIMING_DATA = replace(dimse.c_echo_rsp(1), command_data_set_type=dimse.DATASET_PRESENT)

# What a scripted peer sends after accepting and reading the C-ECHO-RQ, and the error.
_AFTER_ECHO_RQ = {
    "over our max PDU": (struct.pack(">BxL", 4, 10_000_000), "over the maximum PDU length"),
    "data set without command": (
        _one_pdv(False, b"data"),
        "data set without a command",
    ),
    "command without its data set": (
        _one_pdv(True, dimse.encode_command(_ECHO_RSP_CLAIMING_DATA)) * 2,
        "new command before the data set",
    ),
    "context never accepted": (
        _one_pdv(True, b"x", context_id=3),
        "context 3, which was not accepted",
    ),
}


@pytest.mark.parametrize("case", sorted(_AFTER_ECHO_RQ))
def test_protocol_breaking_answers_abort(case: str) -> None:
    answer, match = _AFTER_ECHO_RQ[case]

    def script(conn: socket.socket) -> None:
        _read_pdu(conn)
        conn.sendall(_accept_bytes())
        _read_pdu(conn)  # the C-ECHO-RQ
        conn.sendall(answer)

    with ScriptedPeer(script) as peer, pytest.raises(ProtocolError, match=match):
        net.echo("127.0.0.1", peer.port, called_ae="SCP", dimse_timeout=20)
    # We told the peer why, as the service provider (PS3.8 AA-8).
    assert pdu.decode(peer.received).source == 2


def test_tls_echo_and_wrong_ca(certs, tmp_path: Path) -> None:  # noqa: F811
    with DemoPACS(tmp_path / "tls", tls=certs.tls(who="server")) as server:
        context = certs.tls().client_context()
        seconds = net.echo(
            "127.0.0.1", server.port, called_ae=server.ae_title, ssl_context=context
        )
        assert seconds > 0
        wrong = certs.tls(ca="otherca").client_context()
        with pytest.raises(AssociationError, match="TLS handshake") as info:
            net.echo("127.0.0.1", server.port, called_ae=server.ae_title, ssl_context=wrong)
    assert info.value.reason == "tls"


def test_silent_peer_times_out() -> None:
    def script(conn: socket.socket) -> None:
        _read_pdu(conn)  # and never answer

    with (
        ScriptedPeer(script) as peer,
        pytest.raises(AssociationError, match="timed out waiting for the A-ASSOCIATE") as info,
    ):
        net.echo("127.0.0.1", peer.port, called_ae="SCP", acse_timeout=0.5)
    assert info.value.reason == "timeout"
    assert pdu.decode(peer.received) == pdu.Abort(0, 0)


def test_peer_abort_is_reported() -> None:
    def script(conn: socket.socket) -> None:
        _read_pdu(conn)
        conn.sendall(_accept_bytes())
        _read_pdu(conn)
        conn.sendall(pdu.encode(pdu.Abort(2, 6)))

    with (
        ScriptedPeer(script) as peer,
        pytest.raises(AssociationError, match=r"aborted the association .*invalid PDU") as info,
    ):
        net.echo("127.0.0.1", peer.port, called_ae="SCP", dimse_timeout=20)
    assert info.value.reason == "aborted"


def test_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(AssociationError, match="connection refused") as info:
        net.echo("127.0.0.1", port, called_ae="ANY")
    assert info.value.reason == "refused"


def test_tcp_nodelay_is_set(demo_server) -> None:
    with net.associate("127.0.0.1", demo_server.port, called_ae=demo_server.ae_title) as assoc:
        assert assoc._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
