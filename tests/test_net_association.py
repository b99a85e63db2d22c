"""pacsframe.net.association: the sans-I/O state machine, with no network."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import dimse_primitives as prims
from pynetdicom import pdu as pnd_pdu
from pynetdicom.dimse_messages import C_STORE_RQ

from pacsframe.errors import ProtocolError
from pacsframe.net import dimse, pdu
from pacsframe.net.association import (
    NEED_DATA,
    AbortReceived,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    Association,
    CommandReceived,
    ConnectionClosed,
    DataFragments,
    DatasetReceived,
    PDataFragment,
    Released,
    ReleaseRequested,
    State,
)

pytestmark = pytest.mark.timeout(120)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request(max_length: int = 16384) -> pdu.AssociateRQ:
    return pdu.AssociateRQ(
        "SCP",
        "SCU",
        (
            pdu.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
            pdu.PresentationContextRQ(3, CT, (EXPLICIT, IMPLICIT)),
            pdu.PresentationContextRQ(5, "1.2.3.4.5", (IMPLICIT,)),
        ),
        pdu.UserInformation(max_length, "1.2.3"),
    )


def accept(max_length: int = 16384) -> pdu.AssociateAC:
    return pdu.AssociateAC(
        "SCP",
        "SCU",
        (
            pdu.PresentationContextAC(1, 0, IMPLICIT),
            pdu.PresentationContextAC(3, 0, EXPLICIT),
            pdu.PresentationContextAC(5, 3, IMPLICIT),
        ),
        pdu.UserInformation(max_length, "1.2.4"),
    )


def events(machine: Association, data: bytes | None = None) -> list[object]:
    """Feed ``data`` (``b""``: end of stream) and drain every event, boundedly."""
    if data is not None:
        machine.receive_data(data)
    out = []
    for _ in range(10_000):
        event = machine.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out
    raise AssertionError("next_event did not run out of events")


def established(scu_max: int = 16384, scp_max: int = 16384) -> tuple[Association, Association]:
    scu = Association("requestor", max_receive=scu_max)
    scp = Association("acceptor", max_receive=scp_max)
    [requested] = events(scp, scu.send(request(scu_max)))
    assert isinstance(requested, AssociateRequested)
    assert requested.request == request(scu_max)
    [accepted] = events(scu, scp.send(accept(scp_max)))
    assert isinstance(accepted, AssociateAccepted)
    assert scu.state is scp.state is State.ESTABLISHED
    # Context 5 was rejected: only 1 and 3 carry data.
    assert scu.accepted_contexts == {1: IMPLICIT, 3: EXPLICIT}
    assert scp.accepted_contexts == {1: IMPLICIT, 3: EXPLICIT}
    return scu, scp


def test_full_lifecycle() -> None:
    scu, scp = established()
    command = dimse.encode_command(dimse.c_echo_rq(1))
    assert events(scp, scu.send_message(1, command, None)) == [CommandReceived(1, command)]
    reply = dimse.encode_command(dimse.c_echo_rsp(1))
    assert events(scu, scp.send_message(1, reply, None)) == [CommandReceived(1, reply)]
    assert events(scp, scu.send(pdu.ReleaseRQ())) == [ReleaseRequested()]
    assert scu.state is State.AWAITING_RELEASE_RESPONSE
    assert events(scu, scp.send(pdu.ReleaseRP())) == [Released()]
    assert scu.state is scp.state is State.CLOSED
    assert scu.abort() == scp.abort() == b""  # released: nothing left to abort
    assert events(scu, b"") == [ConnectionClosed()]


def test_rejection() -> None:
    scu = Association("requestor")
    scp = Association("acceptor")
    events(scp, scu.send(request()))
    assert events(scu, scp.send(pdu.AssociateRJ(1, 1, 7))) == [
        AssociateRejected(pdu.AssociateRJ(1, 1, 7))
    ]
    assert scu.state is State.CLOSED


@pytest.mark.parametrize("peer_max", [7, 100, 4096, 16384, 0])
def test_fragments_respect_the_peers_maximum(peer_max: int) -> None:
    scu, scp = established(scp_max=peer_max, scu_max=1 << 20)
    dataset = bytes(range(256)) * 200  # 51,200 bytes
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    wire = scu.send_message(3, command, dataset)
    offset = 0
    while offset < len(wire):
        _, length = pdu.pdu_header(wire[offset:])
        if peer_max:
            assert length <= peer_max
        offset += 6 + length
    assert events(scp, wire) == [CommandReceived(3, command), DatasetReceived(3, dataset)]


def test_byte_at_a_time_gives_the_same_events() -> None:
    scu, scp = established()
    command = dimse.encode_command(dimse.c_find_rq(1, CT))
    wire = scu.send_message(3, command, b"identifier")
    got = []
    for i in range(len(wire)):
        got += events(scp, wire[i : i + 1])
    assert got == [CommandReceived(3, command), DatasetReceived(3, b"identifier")]


def test_streaming_mode_gives_fragments() -> None:
    scu, _ = established(scp_max=1000)
    scp = Association("acceptor", reassemble=False)
    events(scp, pdu.encode(request()))
    scp.send(accept())
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    out = events(scp, scu.send_message(3, command, b"x" * 2500))
    assert out[0] == CommandReceived(3, command)
    fragments = out[1:]
    assert all(isinstance(f, PDataFragment) for f in fragments)
    assert b"".join(bytes(f.data) for f in fragments) == b"x" * 2500
    assert [f.is_last for f in fragments] == [False, False, True]


def test_pynetdicom_fragments_reassemble_here() -> None:
    """pynetdicom's own DIMSE fragmentation, decoded by our acceptor."""
    _, scp = established()
    store = prims.C_STORE()
    store.MessageID = 7
    store.AffectedSOPClassUID = CT
    store.AffectedSOPInstanceUID = "1.2.3.4"
    store.Priority = 0
    payload = b"\x10\x00\x20\x00\x04\x00\x00\x00ABCD" * 3000
    from io import BytesIO

    store.DataSet = BytesIO(payload)
    message = C_STORE_RQ()
    message.primitive_to_message(store)
    wire = b""
    for primitive in message.encode_msg(3, 4096):
        tf = pnd_pdu.P_DATA_TF()
        tf.from_primitive(primitive)
        wire += tf.encode()
    out = events(scp, wire)
    assert [type(e) for e in out] == [CommandReceived, DatasetReceived]
    decoded = dimse.decode_command(out[0].data)
    assert (decoded.message_id, decoded.affected_sop_instance_uid) == (7, "1.2.3.4")
    assert out[1].data == payload


# ------------------------------------------------------------- protocol errors


def _pdata(context_id: int = 1, is_command: bool = True, is_last: bool = True) -> bytes:
    return pdu.encode(pdu.PDataTF((pdu.PDV(context_id, is_command, is_last, b"xx"),)))


def _raises(machine: Association, data: bytes, match: str, reason: int | None = None) -> None:
    machine.receive_data(data)
    with pytest.raises(ProtocolError, match=match) as info:
        events(machine)
    if reason is not None:
        assert info.value.abort_reason == reason
    assert info.value.reason == "aborted"
    # The machine is closed but still owes the peer an A-ABORT, once.
    abort = machine.protocol_abort(info.value)
    assert pdu.decode(abort) == pdu.Abort(2, info.value.abort_reason)
    assert machine.state is State.CLOSED
    assert machine.abort() == b""


def test_pdata_before_accept_is_a_protocol_error() -> None:
    scu = Association("requestor")
    scu.send(request())
    _raises(scu, _pdata(), "P-DATA-TF while the association was awaiting", pdu.UNEXPECTED_PDU)
    scp = Association("acceptor")
    _raises(scp, _pdata(), "P-DATA-TF while the association was idle", pdu.UNEXPECTED_PDU)


def test_data_on_a_context_never_accepted() -> None:
    _, scp = established()
    _raises(scp, _pdata(context_id=5), "context 5, which was not accepted")
    _, scp = established()
    _raises(scp, _pdata(context_id=9), "context 9")


def test_interleaved_command_and_dataset() -> None:
    _, scp = established()
    wire = _pdata(1, is_command=True, is_last=False) + _pdata(1, is_command=False)
    _raises(scp, wire, "interleaved a data set fragment .* unfinished command")


def test_pdu_over_our_maximum_is_refused_from_its_header() -> None:
    scu, _ = established(scu_max=4096)
    # Only the header arrives: the machine refuses before buffering 1 MB.
    _raises(scu, struct.pack(">BxL", 4, 1_000_000), "over the maximum PDU length of 4096")


def test_unknown_pdu_type_in_stream() -> None:
    scu, _ = established()
    _raises(scu, b"\x0a\x00\x00\x00\x00\x00", "unknown PDU type 0x0A", pdu.UNRECOGNIZED_PDU)


def test_accept_answering_unproposed_context() -> None:
    scu = Association("requestor")
    scu.send(request())
    bad = pdu.AssociateAC("SCP", "SCU", (pdu.PresentationContextAC(7, 0, IMPLICIT),))
    _raises(scu, pdu.encode(bad), "context 7, which was never proposed")
    scu = Association("requestor")
    scu.send(request())
    bad = pdu.AssociateAC("SCP", "SCU", (pdu.PresentationContextAC(1, 0, EXPLICIT),))
    _raises(scu, pdu.encode(bad), "not proposed for it")


def test_closed_connection_mid_association() -> None:
    scu, _ = established()
    _raises(scu, b"", "closed the connection while the association was established")
    scu, _ = established()
    scu.receive_data(_pdata()[:5])
    _raises(scu, b"", "after 5 bytes of a PDU")


def test_peer_abort_and_unexpected_release_rp() -> None:
    scu, _ = established()
    assert events(scu, pdu.encode(pdu.Abort(2, 1))) == [AbortReceived(pdu.Abort(2, 1))]
    assert scu.state is State.CLOSED
    scu, _ = established()
    _raises(scu, pdu.encode(pdu.ReleaseRP()), "A-RELEASE-RP while the association was established")


def test_release_collision() -> None:
    scu, scp = established()
    rq_from_scu = scu.send(pdu.ReleaseRQ())
    rq_from_scp = scp.send(pdu.ReleaseRQ())
    assert events(scu, rq_from_scp) == [ReleaseRequested()]
    assert events(scp, rq_from_scu) == [ReleaseRequested()]
    assert scu.state is State.AWAITING_RELEASE_RESPONSE
    assert events(scu, pdu.encode(pdu.ReleaseRP())) == [Released()]


def test_our_own_misuse_is_a_runtime_error() -> None:
    scu = Association("requestor")
    with pytest.raises(RuntimeError, match="cannot send AssociateAC as the requestor"):
        scu.send(accept())
    with pytest.raises(RuntimeError, match="cannot send data"):
        scu.send_message(1, b"x", None)
    scu, _ = established()
    with pytest.raises(RuntimeError, match="context 5 is not accepted"):
        scu.send_message(5, b"x", None)


def test_command_too_large() -> None:
    _, scp = established(scp_max=1 << 20)
    wire = pdu.encode(pdu.PDataTF((pdu.PDV(1, True, False, b"x" * 70_000),)))
    _raises(scp, wire, "command set exceeds 65536 bytes")


# ---------------------------------------------------------------------- fuzzing


def _valid_stream() -> bytes:
    scu, _ = established()
    return scu.send_message(
        3, dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3")), b"payload" * 50
    ) + scu.send(pdu.ReleaseRQ())


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 64))
def test_fuzz_arbitrary_bytes_into_an_established_acceptor(data: bytes, chunk: int) -> None:
    _, scp = established(scp_max=4096)
    try:
        for i in range(0, len(data), chunk):
            events(scp, data[i : i + chunk])
        events(scp, b"")
    except ProtocolError:
        assert scp.state in (State.CLOSED, State.ESTABLISHED, State.RELEASE_REQUESTED)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 200),
)
def test_fuzz_mutated_stream(flips: list[tuple[int, int]], chunk: int) -> None:
    wire = bytearray(_valid_stream())
    for position, value in flips:
        wire[position % len(wire)] = value
    _, scp = established(scp_max=4096)
    try:
        for i in range(0, len(wire), chunk):
            events(scp, bytes(wire[i : i + chunk]))
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_requestor_awaiting_accept(data: bytes) -> None:
    scu = Association("requestor")
    scu.send(request())
    try:
        events(scu, data)
        events(scu, b"")
    except ProtocolError:
        assert scu.state in (State.CLOSED, State.AWAITING_ASSOCIATE_RESPONSE)


# ----------------------------------------------------- batched data fragments (fast path)


def streaming(*, batch: bool, scp_max: int = 16384) -> tuple[Association, Association]:
    """An established pair whose acceptor streams data sets, batched or not."""
    scu, scp = established(scp_max=scp_max)
    scp.reassemble, scp.batch = False, batch
    return scu, scp


def trace(machine: Association, pieces: list[bytes], *, eof: bool = False) -> list[object]:
    """Every event for ``pieces`` fed one after another, with data fragments flattened.

    A :class:`DataFragments` becomes the :class:`PDataFragment` events it
    stands for, so a batched and an unbatched machine compare equal; a
    protocol error ends the trace with its message and abort reason.
    """
    out: list[object] = []
    # An empty piece feeds nothing (b"" alone means the end of the stream).
    for piece in [*(p for p in pieces if p), *([b""] if eof else [])]:
        machine.receive_data(piece)
        for _ in range(10_000):  # bounded, as events()
            try:
                event = machine.next_event()
            except ProtocolError as exc:
                out += [("error", str(exc), exc.abort_reason), machine.state]
                return out
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                if event is not NEED_DATA:
                    out.append(event)
                break
            if isinstance(event, DataFragments):
                last = len(event.fragments) - 1
                assert event.fragments, "an empty batch"
                out += [
                    ("data", event.context_id, bytes(f), event.is_last and i == last)
                    for i, f in enumerate(event.fragments)
                ]
            elif isinstance(event, PDataFragment):
                out.append(("data", event.context_id, bytes(event.data), event.is_last))
            else:
                out.append(event)
    out.append(machine.state)
    return out


def _store_stream(scu: Association, size: int = 5000, messages: int = 2) -> bytes:
    """C-STORE-RQs with data sets in PDUs of at most the acceptor's maximum."""
    wire = b""
    for i in range(messages):
        command = dimse.encode_command(dimse.c_store_rq(i + 1, CT, f"1.2.{i}"))
        wire += scu.send_message(3, command, bytes(range(251)) * (size // 251) + b"!" * i)
    return wire


def test_whole_pdus_in_the_buffer_come_as_one_batch() -> None:
    scu, scp = streaming(batch=True, scp_max=1000)
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    dataset = bytes(range(256)) * 20  # 5,120 bytes: six PDUs of at most 994
    out = events(scp, scu.send_message(3, command, dataset))
    assert out[0] == CommandReceived(3, command)
    [batch] = out[1:]
    assert isinstance(batch, DataFragments) and batch.context_id == 3 and batch.is_last
    assert [len(f) for f in batch.fragments] == [994] * 5 + [150]
    assert b"".join(batch.fragments) == dataset
    # The fragments stay valid while more bytes arrive.
    events(scp, scu.send_message(3, command, b"y" * 3000))
    assert b"".join(batch.fragments) == dataset


def test_a_batch_stops_at_the_end_of_its_data_set() -> None:
    scu, scp = streaming(batch=True, scp_max=1000)
    out = events(scp, _store_stream(scu, size=2500))
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["CommandReceived", "DataFragments"] * 2
    assert [e.is_last for e in out[1::2]] == [True, True]
    assert scp._current is None


@pytest.mark.parametrize("scp_max", [1000, 16384])
def test_a_stream_split_at_every_byte_gives_the_same_fragments(scp_max: int) -> None:
    scu, _ = streaming(batch=True, scp_max=scp_max)
    wire = _store_stream(scu)
    _, plain = streaming(batch=False, scp_max=scp_max)
    expected = trace(plain, [wire])
    for cut in range(len(wire) + 1):
        _, batched = streaming(batch=True, scp_max=scp_max)
        assert trace(batched, [wire[:cut], wire[cut:]]) == expected, cut
    _, batched = streaming(batch=True, scp_max=scp_max)
    assert trace(batched, [wire[i : i + 1] for i in range(len(wire))]) == expected


def _data_pdu(context_id: int, data: bytes, *, last: bool = False, control: int | None = None):
    header = pdu.encode_pdv_header(context_id, False, last, len(data))
    if control is not None:
        header = header[:-1] + bytes([control])
    return header + data


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_data_pdu(5, b"x"), "presentation context 5, which was not accepted"),
        (_data_pdu(1, b"x"), "interleaved a data set fragment on context 1"),
        (_data_pdu(3, b"x", control=4), "message control header 0x04"),
        (b"\x04\x00" + struct.pack(">L", 1100) + b"\0" * 1100, "over the maximum PDU length"),
        (b"\x09\x00\x00\x00\x00\x04" + b"\0" * 4, "unknown PDU type 0x09"),
        (_data_pdu(3, b"xy")[:6] + struct.pack(">L", 99) + b"\x03\x00xy", "a PDV of 99 bytes"),
        (b"\x04\x00\x00\x00\x00\x02\x00\x00", "ends 2 bytes into a PDV item header"),
    ],
)
def test_a_protocol_error_mid_batch_comes_after_the_good_fragments(
    bad: bytes, message: str
) -> None:
    scu, scp = streaming(batch=True, scp_max=1000)
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    head = scu.send_message(3, command, None)
    wire = head + _data_pdu(3, b"a" * 10) + _data_pdu(3, b"b" * 20) + bad + _data_pdu(3, b"c")
    got = trace(scp, [wire])
    _, plain = streaming(batch=False, scp_max=1000)
    assert got == trace(plain, [wire])
    assert got[1:3] == [("data", 3, b"a" * 10, False), ("data", 3, b"b" * 20, False)]
    kind, text, _ = got[3]
    assert kind == "error" and message in text, text


def test_a_pdu_with_several_pdvs_takes_the_general_path() -> None:
    scu, scp = streaming(batch=True)
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    two = pdu.encode(pdu.PDataTF((pdu.PDV(3, False, False, b"12"), pdu.PDV(3, False, True, b"3"))))
    wire = scu.send_message(3, command, None) + _data_pdu(3, b"0") + two
    out = events(scp, wire)
    assert isinstance(out[1], DataFragments) and [bytes(f) for f in out[1].fragments] == [b"0"]
    assert out[2:] == [
        PDataFragment(3, False, False, memoryview(b"12")),
        PDataFragment(3, False, True, memoryview(b"3")),
    ]


def test_batching_needs_streaming_mode() -> None:
    scu, scp = established(scp_max=1000)
    scp.batch = True  # still reassembling: whole data sets, as before
    command = dimse.encode_command(dimse.c_store_rq(1, CT, "1.2.3"))
    assert events(scp, scu.send_message(3, command, b"z" * 3000)) == [
        CommandReceived(3, command),
        DatasetReceived(3, b"z" * 3000),
    ]


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=0, max_size=6),
    st.lists(st.integers(1, 3000), min_size=1, max_size=12),
)
def test_fuzz_batched_and_unbatched_machines_agree(
    flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    scu, _ = streaming(batch=False, scp_max=1000)
    wire = bytearray(_store_stream(scu, size=2200) + scu.send(pdu.ReleaseRQ()))
    for position, value in flips:
        wire[position % len(wire)] = value
    pieces, offset = [], 0
    for cut in cuts:
        pieces.append(bytes(wire[offset : offset + cut]))
        offset += cut
    pieces.append(bytes(wire[offset:]))
    _, plain = streaming(batch=False, scp_max=1000)
    _, batched = streaming(batch=True, scp_max=1000)
    assert trace(batched, pieces, eof=True) == trace(plain, pieces, eof=True)
