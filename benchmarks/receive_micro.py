"""Micro-benchmark of the engine's C-GET receive path (not part of the tests).

A peer in a child process (so its CPU is not counted) listens on loopback,
accepts our association with a maximum PDU of 16384 and answers one C-GET
with N C-STORE sub-operations, as Orthanc does: a 512x512 16-bit CT data set
(~0.5 MiB) in 16 KiB P-DATA-TF PDUs of one PDV each, each object sent after
the previous C-STORE-RSP arrived. We time our side with ``time.process_time``
(the CPU of this process: the driver, the state machine and the sink).

Sinks: ``null`` (a writer that drops the bytes) or ``cache`` (the real
``pacsframe.cache.Cache`` in a temporary folder, through the C-GET receiver
``retrieve._Receiver.writer``, as ``pacs.get`` uses it).

Usage::

    PYTHONPATH=$PWD python benchmarks/receive_micro.py [--objects 500] [--runs 5] \\
        [--sink null|cache|both]

Prints the median CPU seconds per 500 objects for each sink.

Note: Orthanc 1.10 (default configuration) sends P-DATA-TF up to the maximum
*we* announce (pacsframe's 256 KiB: about five PDUs per such object), so a
plain ``pacs.get`` from it sees few PDUs; the 16 KiB case here is a peer that
caps its PDUs, or ``PACS(max_pdu=16384)``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import tempfile
import time

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from pacsframe.cache import Cache
from pacsframe.net import association, dimse, driver, operations, pdu
from pacsframe.retrieve import _Receiver

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root C-GET
PEER_MAX_PDU = 16384


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _dataset(index: int, pixels: bytes) -> tuple[str, bytes]:
    sop = f"1.2.826.0.1.3680043.8.498.{index + 1}"
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.8"
    ds.PatientID = "BENCH"
    ds.Modality = "CT"
    ds.InstanceNumber = index + 1
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    head = _encode(ds)
    pixel = Dataset()
    pixel.PixelData = pixels
    pixel["PixelData"].VR = "OW"
    return sop, head + _encode(pixel)


def _pdata(context_id: int, is_command: bool, data: bytes) -> bytes:
    """P-DATA-TF PDUs of one PDV each, within the peer's 16 KiB maximum (as Orthanc)."""
    step = PEER_MAX_PDU - 6
    parts = []
    for offset in range(0, max(len(data), 1), step):
        chunk = data[offset : offset + step]
        last = offset + step >= len(data)
        parts.append(pdu.encode_pdv_header(context_id, is_command, last, len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def _command(machine: association.Association, sock: socket.socket) -> tuple[int, bytes]:
    while True:
        event = machine.next_event()
        if event is association.NEED_DATA:
            machine.receive_data(sock.recv(1 << 16))
            continue
        if isinstance(event, association.CommandReceived):
            return event.context_id, event.data
        if isinstance(event, (association.ReleaseRequested, association.DatasetReceived)):
            return -1, b""
        raise RuntimeError(f"peer: unexpected {event!r}")


def _peer(listener: socket.socket, objects: int, runs: int) -> None:
    pixels = bytes(range(256)) * (512 * 512 * 2 // 256)
    data = [_dataset(i, pixels) for i in range(objects)]
    for _ in range(runs):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        machine = association.Association("acceptor")
        event = machine.next_event()
        while event is association.NEED_DATA:
            machine.receive_data(sock.recv(1 << 16))
            event = machine.next_event()
        assert isinstance(event, association.AssociateRequested)
        request = event.request
        contexts = tuple(
            pdu.PresentationContextAC(cx.context_id, 0, cx.transfer_syntaxes[0])
            for cx in request.contexts
        )
        accept = pdu.AssociateAC(
            request.called_ae,
            request.calling_ae,
            contexts,
            pdu.UserInformation(
                PEER_MAX_PDU, "1.2.3.4", "BENCHPEER", request.user_information.roles
            ),
        )
        sock.sendall(machine.send(accept))
        get_cid, raw = _command(machine, sock)
        rq = dimse.decode_command(raw)
        _command(machine, sock)  # the identifier comes as a data set: skipped
        store_cid = next(
            cx.context_id
            for cx in request.contexts
            if cx.abstract_syntax == CT and IMPLICIT in cx.transfer_syntaxes
        )
        assert (
            machine.accepted_contexts[store_cid]
            == request.contexts[
                [c.context_id for c in request.contexts].index(store_cid)
            ].transfer_syntaxes[0]
        )
        for i, (sop, dataset) in enumerate(data):
            command = dimse.encode_command(dimse.c_store_rq(i + 1, CT, sop))
            sock.sendall(_pdata(store_cid, True, command) + _pdata(store_cid, False, dataset))
            _command(machine, sock)  # the C-STORE-RSP
        final = dimse.c_get_rsp(rq.message_id, GET_MODEL, 0x0000, (0, objects, 0, 0))
        sock.sendall(_pdata(get_cid, True, dimse.encode_command(final)))
        _command(machine, sock)  # A-RELEASE-RQ
        sock.sendall(pdu.encode(pdu.ReleaseRP()))
        sock.close()


class _Null:
    def __init__(self, request: operations.StoreRequest) -> None:
        self.size = 0

    def write(self, data: memoryview, /) -> None:
        self.size += len(data)

    def commit(self) -> int:
        return 0

    def discard(self) -> None:
        pass


def _identifier() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    return _encode(ds)


def _run(port: int, sink: str, objects: int) -> float:
    contexts, roles = operations.retrieve_negotiation(GET_MODEL, [(CT, (IMPLICIT,))])
    with tempfile.TemporaryDirectory() as folder:
        cache = Cache(folder) if sink == "cache" else None
        receiver = (
            _Receiver(cache, overwrite=False, on_received=None, bar=None)
            if cache is not None
            else None
        )
        on_store = receiver.writer if receiver is not None else _Null
        started = time.process_time()
        with driver.associate(
            "127.0.0.1", port, called_ae="PEER", contexts=contexts, roles=roles
        ) as assoc:
            responses = list(assoc.get(_identifier(), GET_MODEL, on_store))
        spent = time.process_time() - started
        assert responses[-1].status == 0, responses[-1]
        if receiver is not None:
            assert len(receiver.rows) == objects, len(receiver.rows)
            assert all(r["status"] == "completed" for r in receiver.rows)
            cache.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sink", choices=("null", "cache", "both"), default="both")
    args = parser.parse_args()
    sinks = ("null", "cache") if args.sink == "both" else (args.sink,)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    context = multiprocessing.get_context("fork")
    child = context.Process(
        target=_peer, args=(listener, args.objects, args.runs * len(sinks)), daemon=True
    )
    child.start()
    times: dict[str, list[float]] = {s: [] for s in sinks}
    for _ in range(args.runs):
        for sink in sinks:  # alternate, so a busy moment hits both
            times[sink].append(_run(port, sink, args.objects))
    child.join(10)
    for sink in sinks:
        per500 = [t * 500 / args.objects for t in times[sink]]
        print(
            f"{sink:5s} CPU s per 500 objects: median {statistics.median(per500):.3f} "
            f"(runs {', '.join(f'{t:.3f}' for t in per500)})"
        )


if __name__ == "__main__":
    main()
