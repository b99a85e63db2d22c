"""The acceptor side of pacsframe.net.association against real requestors.

A minimal SCP written in the test over the sans-I/O machine (the storage SCP of a
later step will be built the same way) answers C-ECHO and C-STORE from dcmtk's
echoscu/storescu and from pynetdicom, with C-STORE-RSP from the template.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification
from servers import dcmtk_env, require_tool
from test_servers import make_secondary_capture

from pacsframe.net import dimse, pdu
from pacsframe.net.association import (
    NEED_DATA,
    AssociateRequested,
    Association,
    CommandReceived,
    ConnectionClosed,
    DatasetReceived,
    ReleaseRequested,
)

pytestmark = pytest.mark.timeout(120)

SUPPORTED = {Verification, SecondaryCaptureImageStorage}
TRANSFER = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class TinySCP:
    """One association at a time on loopback: echo, and store into ``self.stored``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stored: list[tuple[str, bytes]] = []
        self.errors: list[BaseException] = []
        self._template = dimse.StoreResponseTemplate()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TinySCP:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.listener.close()
        assert not self.errors, self.errors

    def _serve(self) -> None:
        # Short accept waits, so that __exit__ stops the loop at once (closing a
        # listening socket does not wake a thread blocked in accept on Linux).
        self.listener.settimeout(0.1)
        # Bounded: at most 600 waits of 0.1 s.
        for _ in range(600):
            if self._stop.is_set():
                return
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                try:
                    self._one(conn)
                except BaseException as exc:  # reported by __exit__
                    self.errors.append(exc)

    def _one(self, conn: socket.socket) -> None:
        machine = Association("acceptor")
        command: dimse.Command | None = None
        # Bounded: every pass consumes an event or reads (socket timeout 30 s).
        for _ in range(100_000):
            event = machine.next_event()
            if event is NEED_DATA:
                machine.receive_data(conn.recv(65536))
                continue
            if isinstance(event, AssociateRequested):
                conn.sendall(machine.send(self._answer(event.request)))
            elif isinstance(event, CommandReceived):
                command = dimse.decode_command(event.data)
                if command.command_field == dimse.C_ECHO_RQ:
                    rsp = dimse.encode_command(dimse.c_echo_rsp(command.message_id or 0))
                    conn.sendall(machine.send_message(event.context_id, rsp, None))
            elif isinstance(event, DatasetReceived):
                assert command is not None and command.command_field == dimse.C_STORE_RQ
                self.stored.append((command.affected_sop_instance_uid or "", event.data))
                rsp = self._template.encode(
                    command.message_id or 0,
                    command.affected_sop_class_uid or "",
                    command.affected_sop_instance_uid or "",
                    0x0000,
                )
                conn.sendall(machine.send_message(event.context_id, rsp, None))
            elif isinstance(event, ReleaseRequested):
                conn.sendall(machine.send(pdu.ReleaseRP()))
            elif isinstance(event, ConnectionClosed):
                return

    @staticmethod
    def _answer(request: pdu.AssociateRQ) -> pdu.AssociateAC:
        results = []
        for cx in request.contexts:
            chosen = next((ts for ts in TRANSFER if ts in cx.transfer_syntaxes), None)
            if cx.abstract_syntax not in SUPPORTED:
                results.append(pdu.PresentationContextAC(cx.context_id, 3, TRANSFER[1]))
            elif chosen is None:
                results.append(pdu.PresentationContextAC(cx.context_id, 4, TRANSFER[1]))
            else:
                results.append(pdu.PresentationContextAC(cx.context_id, 0, chosen))
        return pdu.AssociateAC(
            request.called_ae,
            request.calling_ae,
            tuple(results),
            pdu.UserInformation(16384, "1.2.826.0.1.3680043.9.9", "TINYSCP"),
        )


def test_dcmtk_echoscu_and_storescu(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    storescu = require_tool("storescu")
    path = make_secondary_capture(tmp_path / "sc.dcm")
    with TinySCP() as scp:
        for command in (
            [echoscu, "-aec", "TINY", "127.0.0.1", str(scp.port)],
            [storescu, "-aec", "TINY", "127.0.0.1", str(scp.port), str(path)],
        ):
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=60, env=dcmtk_env()
            )
            assert done.returncode == 0, done.stdout + done.stderr
    [(uid, data)] = scp.stored
    original = pydicom.dcmread(path)
    assert uid == original.SOPInstanceUID
    # storescu sends explicit VR little endian here: the pixel bytes arrive intact.
    assert bytes(original.PixelData) in data


def test_pynetdicom_echo_and_store(tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_secondary_capture(tmp_path / "sc.dcm"))
    with TinySCP() as scp:
        ae = AE("PYNETDICOM")
        ae.add_requested_context(Verification)
        ae.add_requested_context(SecondaryCaptureImageStorage, TRANSFER[0])
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR: rejected by the SCP
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="TINY")
        assert assoc.is_established
        try:
            assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [
                "1.2.840.10008.5.1.4.1.1.4"
            ]
            assert assoc.send_c_echo().Status == 0
            assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
    assert [uid for uid, _ in scp.stored] == [ds.SOPInstanceUID]
