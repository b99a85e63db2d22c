"""pacsframe.net.server: our storage SCP against real peers on loopback.

Peers: dcmtk's echoscu and storescu, pynetdicom's AE, the demo PACS and Orthanc
moving studies to us (with CI=true a missing tool fails, never skips), and our
own client driver playing a peer that breaks off or breaks the rules. Objects go
to temporary files renamed into place on commit (the writers of
test_net_retrieve, shared with the C-GET path).
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from servers import dcmtk_env, require_tool
from test_net_retrieve import (
    EXPLICIT,
    STUDY_MOVE,
    Received,
    TempFileWriter,
    dataset_bytes,
    largest_study,
    study_identifier,
)
from test_tls import certs  # noqa: F401 - a fixture

from pacsframe import net
from pacsframe.errors import AssociationError
from pacsframe.net import dimse, pdu
from pacsframe.net.driver import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION, ClientAssociation
from pacsframe.net.operations import StoreRequest, read_part10
from pacsframe.net.server import StorageServer
from pacsframe.storage import storage_contexts

pytestmark = pytest.mark.timeout(180)

AE_TITLE = "PF_SCP"
STORAGE = [(cx.abstract_syntax, cx.transfer_syntax) for cx in storage_contexts("acceptor")]


# ------------------------------------------------------------------- helpers


def scp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pacsframe-scp-")]


def wait_for(condition, what: str, seconds: float = 20.0) -> None:
    """Poll ``condition`` (bounded) until true; fail saying ``what`` never happened."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.02)


def read_until_closed(sock: socket.socket) -> bytes:
    """What ``sock`` receives until the peer closes (each read waits at most its timeout)."""
    data = b""
    # Bounded: a few small PDUs at most before the close.
    for _ in range(100):
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    pytest.fail("the server kept sending instead of closing")


def assert_byte_equal(received: Received, paths: list[str]) -> None:
    """Every source file arrived once, committed, as its own data set bytes."""
    expected = {read_part10(p).sop_instance_uid: p for p in paths}
    assert set(received.committed) == set(expected)
    for uid, path in expected.items():
        assert received.syntaxes[uid] == read_part10(path).transfer_syntax
        assert received.committed[uid].read_bytes() == dataset_bytes(path), uid
    assert not received.partial_files() and not received.discarded


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StorageServer, Received]]:
    received = Received(tmp_path)
    with StorageServer(received, ae_title=AE_TITLE, storage=STORAGE, acse_timeout=10) as server:
        yield server, received
    assert not scp_threads()


def cohort_paths(cohort) -> list[str]:
    _, manifest = cohort
    return [str(p) for p in manifest.path]


def store_client(port: int, paths: list[str], **options) -> ClientAssociation:
    """Our client with a context per (SOP class, transfer syntax) of ``paths``, and echo."""
    pairs = {(m.sop_class_uid, m.transfer_syntax) for m in map(read_part10, paths)}
    contexts = [(uid, [syntax]) for uid, syntax in sorted(pairs)]
    contexts.append((VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]))
    return net.associate(
        "127.0.0.1", port, called_ae=AE_TITLE, contexts=contexts, dimse_timeout=30, **options
    )


# -------------------------------------------------------- dcmtk, pynetdicom


def test_dcmtk_echoscu_and_storescu_store_the_cohort_byte_equal(scp, cohort) -> None:
    echoscu = require_tool("echoscu")
    storescu = require_tool("storescu")
    server, received = scp
    paths = cohort_paths(cohort)
    for command in (
        [echoscu, "-aec", AE_TITLE, "127.0.0.1", str(server.port)],
        [storescu, "-aec", AE_TITLE, "127.0.0.1", str(server.port), *paths],
    ):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env=dcmtk_env()
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert_byte_equal(received, paths)


def test_storescu_sends_a_compressed_object_as_stored(scp, cohort, tmp_path) -> None:
    storescu = require_tool("storescu")
    server, received = scp
    source = cohort_paths(cohort)[0]
    ds = pydicom.dcmread(source)
    ds.compress(RLELossless, generate_instance_uid=False)
    path = str(tmp_path / "rle.dcm")
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(
        # -xr: propose RLE lossless too, not only uncompressed syntaxes.
        [storescu, "-xr", "-aec", AE_TITLE, "127.0.0.1", str(server.port), path],
        capture_output=True,
        text=True,
        timeout=60,
        env=dcmtk_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # We prefer lossless compressed syntaxes: the object arrives as stored.
    assert_byte_equal(received, [path])


def test_pynetdicom_echo_and_store(scp, cohort) -> None:
    server, received = scp
    paths = cohort_paths(cohort)[:6]
    metas = [read_part10(p) for p in paths]
    ae = AE("PYNETDICOM")
    ae.add_requested_context(Verification)
    for uid, syntax in sorted({(m.sop_class_uid, m.transfer_syntax) for m in metas}):
        ae.add_requested_context(uid, syntax)
    ae.add_requested_context("1.2.3.4.5")  # no such storage class: rejected
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == ["1.2.3.4.5"]
        # Our maximum PDU is announced; pynetdicom fragments within it.
        assert assoc.acceptor.maximum_length == server.max_pdu
        assert assoc.send_c_echo().Status == 0x0000
        for path in paths:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()
    # pynetdicom re-encodes the data set: compare decoded, not bytes.
    assert set(received.committed) == {m.sop_instance_uid for m in metas}
    for path in paths:
        original = pydicom.dcmread(path)
        arrived = pydicom.dcmread(
            received.committed[original.SOPInstanceUID], force=True, defer_size=None
        )
        assert arrived.PixelData == original.PixelData
        assert arrived.PatientName == original.PatientName


def test_our_client_stores_byte_equal_in_small_pdus(tmp_path, cohort) -> None:
    received = Received(tmp_path)
    paths = cohort_paths(cohort)[:4]
    # A small maximum PDU: each object arrives in many fragments.
    with (
        StorageServer(received, ae_title=AE_TITLE, storage=STORAGE, max_pdu=4096) as server,
        store_client(server.port, paths) as assoc,
    ):
        assert assoc.accept.user_information.max_length == 4096
        assert assoc.echo() == 0x0000
        assert [assoc.store(p) for p in paths] == [0x0000] * len(paths)
    assert_byte_equal(received, paths)
    for uid, path in received.committed.items():
        # At most 4090 data bytes per PDU (6 go to the PDV header).
        assert received.fragments[uid] >= path.stat().st_size // 4090


# ------------------------------------------------------------------- C-MOVE


def move_study(port: int, called_ae: str, study: str, destination: str, **options) -> list:
    with net.associate(
        "127.0.0.1",
        port,
        called_ae=called_ae,
        contexts=[(STUDY_MOVE, [EXPLICIT, IMPLICIT_VR_LITTLE_ENDIAN])],
        dimse_timeout=60,
        **options,
    ) as assoc:
        return list(
            assoc.move(study_identifier(assoc, STUDY_MOVE, study), STUDY_MOVE, destination)
        )


def test_move_from_demo_pacs_to_our_scp(demo_server, cohort, scp) -> None:
    server, received = scp
    _, manifest = cohort
    study, rows = largest_study(manifest)
    demo_server.add_known_ae(AE_TITLE, "127.0.0.1", server.port)
    responses = move_study(demo_server.port, demo_server.ae_title, study, AE_TITLE)
    final = responses[-1]
    assert (final.status, final.completed, final.failed) == (0x0000, len(rows), 0)
    assert_byte_equal(received, [str(p) for p in rows.path])


def test_move_from_orthanc_to_our_scp(orthanc, cohort, scp) -> None:
    server, received = scp
    _, manifest = cohort
    study, rows = largest_study(manifest)
    orthanc.add_modality(AE_TITLE, AE_TITLE, "127.0.0.1", server.port)
    # Orthanc answers C-MOVE only to a registered calling AE.
    orthanc.add_modality("PF_MOVER", "PF_MOVER", "127.0.0.1", server.port)
    responses = move_study(orthanc.dicom_port, orthanc.aet, study, AE_TITLE, calling_ae="PF_MOVER")
    final = responses[-1]
    assert (final.status, final.completed, final.failed) == (0x0000, len(rows), 0)
    assert_byte_equal(received, [str(p) for p in rows.path])


def test_dcmtk_movescu_moves_from_the_demo_pacs_to_our_scp(demo_server, cohort, scp) -> None:
    movescu = require_tool("movescu")
    server, received = scp
    _, manifest = cohort
    study, rows = largest_study(manifest)
    demo_server.add_known_ae(AE_TITLE, "127.0.0.1", server.port)
    peer = ["-aec", demo_server.ae_title, "127.0.0.1", str(demo_server.port)]
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    done = subprocess.run(
        [movescu, "-S", "-aem", AE_TITLE, *keys, *peer],
        capture_output=True,
        text=True,
        timeout=120,
        env=dcmtk_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_byte_equal(received, [str(p) for p in rows.path])


# ---------------------------------------------------------- acceptance policy


def test_wrong_called_ae_and_unlisted_calling_ae_are_rejected(tmp_path) -> None:
    received = Received(tmp_path)
    with StorageServer(received, ae_title=AE_TITLE, calling_aes=["FRIEND"]) as server:
        with pytest.raises(AssociationError, match="called AE title not recognized") as info:
            net.associate("127.0.0.1", server.port, called_ae="SOMEONE", calling_ae="FRIEND")
        assert info.value.reason == "rejected"
        with pytest.raises(AssociationError, match="calling AE title not recognized"):
            net.associate("127.0.0.1", server.port, called_ae=AE_TITLE, calling_ae="STRANGER")
        # Verification is accepted even with no storage contexts at all.
        assert net.echo("127.0.0.1", server.port, called_ae=AE_TITLE, calling_ae="FRIEND") > 0
        echoscu = require_tool("echoscu")
        dcmtk = subprocess.run(
            [echoscu, "-aec", "SOMEONE", "-aet", "FRIEND", "127.0.0.1", str(server.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dcmtk_env(),
        )
        output = dcmtk.stdout + dcmtk.stderr
        assert dcmtk.returncode != 0 and "Called AE Title Not Recognized" in output, output


def test_a_silent_client_is_dropped_after_the_timeout(tmp_path) -> None:
    received = Received(tmp_path)
    with StorageServer(received, ae_title=AE_TITLE, acse_timeout=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent:
            # The server closes within its ACSE timeout.
            data = read_until_closed(silent)
            assert data in (b"", pdu.encode(pdu.Abort(0, 0)))
        assert net.echo("127.0.0.1", server.port, called_ae=AE_TITLE) > 0


def test_over_max_associations_is_rejected_as_transient(tmp_path) -> None:
    received = Received(tmp_path)
    with StorageServer(received, ae_title=AE_TITLE, max_associations=1) as server:
        with net.associate("127.0.0.1", server.port, called_ae=AE_TITLE) as first:
            with pytest.raises(AssociationError, match=r"local limit exceeded.*try later"):
                net.associate("127.0.0.1", server.port, called_ae=AE_TITLE)
            assert first.echo() == 0x0000
        # The first association's thread ends after its release; then there is room.
        wait_for(lambda: len(scp_threads()) == 1, "the released association's thread ending")
        assert net.echo("127.0.0.1", server.port, called_ae=AE_TITLE) > 0


# ------------------------------------------------------------ broken peers


def _store_half(assoc: ClientAssociation, path: str) -> None:
    """Send a C-STORE-RQ and the first half of its data set, not marked last."""
    meta = read_part10(path)
    cid = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
    command = dimse.encode_command(
        dimse.c_store_rq(assoc.new_message_id(), meta.sop_class_uid, meta.sop_instance_uid)
    )
    half = dataset_bytes(path)[:2000]
    assoc._send_bytes(
        assoc._machine.send_message(cid, command, None)
        + pdu.encode_pdv_header(cid, False, False, len(half))
        + half
    )


@pytest.mark.parametrize("how", ["abort", "close"])
def test_a_client_gone_mid_object_is_discarded_and_the_server_goes_on(
    scp, cohort, how: str
) -> None:
    server, received = scp
    paths = cohort_paths(cohort)[:2]
    assoc = store_client(server.port, paths)
    _store_half(assoc, paths[0])
    wait_for(lambda: received.partial_files(), "the first fragment reaching the writer")
    if how == "abort":
        assoc.abort()
    else:
        assoc._sock.close()  # no A-ABORT: the connection just drops
    uid = read_part10(paths[0]).sop_instance_uid
    wait_for(lambda: received.discarded == [uid], "the writer's discard")
    assert not received.partial_files() and not received.committed
    with store_client(server.port, paths) as again:
        assert [again.store(p) for p in paths] == [0x0000, 0x0000]
    assert set(received.committed) == {read_part10(p).sop_instance_uid for p in paths}


class Refusing(Received):
    """Raises ``error`` from the writer of the first object."""

    def __init__(self, folder: Path, error: Exception) -> None:
        super().__init__(folder)
        self.error: Exception | None = error

    def __call__(self, request: StoreRequest) -> TempFileWriter:
        writer = super().__call__(request)
        error, self.error = self.error, None
        if error is not None:

            def fail(data: memoryview) -> None:
                raise error

            writer.write = fail  # type: ignore[method-assign]
        return writer


def test_writer_os_error_answers_out_of_resources(tmp_path, cohort) -> None:
    received = Refusing(tmp_path, OSError("disk full"))
    paths = cohort_paths(cohort)[:2]
    with (
        StorageServer(received, ae_title=AE_TITLE, storage=STORAGE) as server,
        store_client(server.port, paths) as assoc,
    ):
        assert [assoc.store(p) for p in paths] == [0xA700, 0x0000]
    assert list(received.committed) == [read_part10(paths[1]).sop_instance_uid]
    assert not received.partial_files()


def test_writer_bug_aborts_that_association_only(tmp_path, cohort, caplog) -> None:
    received = Refusing(tmp_path, RuntimeError("a bug"))
    paths = cohort_paths(cohort)[:2]
    with StorageServer(received, ae_title=AE_TITLE, storage=STORAGE) as server:
        with caplog.at_level(logging.INFO, logger="pacsframe"):
            with (
                pytest.raises(AssociationError, match="aborted") as info,
                store_client(server.port, paths) as assoc,
            ):
                assoc.store(paths[0])
            assert info.value.reason == "aborted"
            wait_for(lambda: "RuntimeError" in caplog.text, "the log line")
        with store_client(server.port, paths) as assoc:
            assert [assoc.store(p) for p in paths] == [0x0000, 0x0000]
    assert not received.partial_files()
    # The log names the failure, never the object (nor the writer's message).
    assert "a bug" not in caplog.text
    assert read_part10(paths[0]).sop_instance_uid not in caplog.text


@pytest.mark.parametrize("case", ["dataset without command", "C-FIND to a storage SCP"])
def test_protocol_breaking_client_is_aborted_and_logged(scp, cohort, caplog, case: str) -> None:
    server, _ = scp
    paths = cohort_paths(cohort)[:1]
    with caplog.at_level(logging.WARNING, logger="pacsframe"):
        assoc = store_client(server.port, paths)
        cid = assoc.context_for(read_part10(paths[0]).sop_class_uid)
        if case == "dataset without command":
            assoc._send_bytes(pdu.encode_pdv_header(cid, False, True, 4) + b"abcd")
        else:
            find = dimse.c_find_rq(assoc.new_message_id(), "1.2.840.10008.5.1.4.1.2.2.1")
            assoc.send(cid, find, b"")
        with pytest.raises(AssociationError, match="aborted the association") as info:
            assoc.receive()
        assert info.value.reason == "aborted"
        wait_for(lambda: "storage SCP PF_SCP aborted" in caplog.text, "the log line")
    assert net.echo("127.0.0.1", server.port, called_ae=AE_TITLE) > 0


@pytest.mark.parametrize(
    "opening",
    [b"\x09\x00\x00\x00\x00\x02ab", b"\x04\x00\x00\x00\x00\x06" + b"\x00" * 6],
    ids=["unknown PDU type", "P-DATA-TF before A-ASSOCIATE-RQ"],
)
def test_garbage_before_associating_gets_an_abort(scp, caplog, opening: bytes) -> None:
    server, _ = scp
    with (
        caplog.at_level(logging.WARNING, logger="pacsframe"),
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as peer,
    ):
        peer.sendall(opening)
        answer = read_until_closed(peer)  # the server answers and closes at once
        assert answer[:1] == b"\x07"  # A-ABORT
        assert pdu.decode(answer).source == 2  # type: ignore[union-attr]
        wait_for(lambda: "storage SCP PF_SCP aborted" in caplog.text, "the log line")
    assert net.echo("127.0.0.1", server.port, called_ae=AE_TITLE) > 0


# --------------------------------------------------------------- lifecycle


def test_stop_is_prompt_and_leaves_no_thread_and_no_listener(tmp_path, cohort) -> None:
    received = Received(tmp_path)
    server = StorageServer(received, ae_title=AE_TITLE, storage=STORAGE).start()
    port = server.port
    assert port and server.running
    paths = cohort_paths(cohort)[:1]
    # An idle association and a half-sent object are both cut by stop().
    idle = store_client(port, paths)
    busy = store_client(port, paths)
    _store_half(busy, paths[0])
    wait_for(lambda: received.partial_files(), "the first fragment reaching the writer")
    started = time.monotonic()
    server.stop()
    # Generous bound: the point is that stop() does not wait for peers or timeouts.
    assert time.monotonic() - started < 5
    assert not scp_threads() and not server.running
    assert received.discarded and not received.partial_files()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for assoc in (idle, busy):
        assoc.abort()
    server.stop()  # twice is fine


# ---------------------------------------------------------------------- TLS


def test_tls_echo_and_store_and_a_plain_client_refused(tmp_path, cohort, certs) -> None:  # noqa: F811
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.path("server.pem"), certs.path("server.key"))
    client_context = ssl.create_default_context(cafile=certs.path("ca.pem"))
    received = Received(tmp_path)
    paths = cohort_paths(cohort)[:2]
    with StorageServer(
        received, ae_title=AE_TITLE, storage=STORAGE, ssl_context=server_context, tls_timeout=2
    ) as server:
        with store_client(server.port, paths, ssl_context=client_context) as assoc:
            assert assoc.echo() == 0x0000
            assert [assoc.store(p) for p in paths] == [0x0000, 0x0000]
        # A plain client gets no association, and the server goes on.
        with pytest.raises(AssociationError):
            net.echo("127.0.0.1", server.port, called_ae=AE_TITLE, acse_timeout=10)
        assert (
            net.echo("127.0.0.1", server.port, called_ae=AE_TITLE, ssl_context=client_context) > 0
        )
    assert_byte_equal(received, paths)
