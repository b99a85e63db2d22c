"""pacsframe.net.dimse: command sets against pydicom/pynetdicom encoding, and fuzzing."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import replace
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import dimse_primitives as prims
from pynetdicom import dsutils
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RSP, C_MOVE_RQ, C_STORE_RSP

from pacsframe.errors import ProtocolError
from pacsframe.net import dimse

pytestmark = pytest.mark.timeout(120)

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.12345678901234567"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Command attribute -> DICOM keyword, to build the same command with pydicom.
KEYWORDS = {
    "affected_sop_class_uid": "AffectedSOPClassUID",
    "requested_sop_class_uid": "RequestedSOPClassUID",
    "command_field": "CommandField",
    "message_id": "MessageID",
    "message_id_being_responded_to": "MessageIDBeingRespondedTo",
    "move_destination": "MoveDestination",
    "priority": "Priority",
    "command_data_set_type": "CommandDataSetType",
    "status": "Status",
    "offending_element": "OffendingElement",
    "error_comment": "ErrorComment",
    "error_id": "ErrorID",
    "affected_sop_instance_uid": "AffectedSOPInstanceUID",
    "requested_sop_instance_uid": "RequestedSOPInstanceUID",
    "remaining": "NumberOfRemainingSuboperations",
    "completed": "NumberOfCompletedSuboperations",
    "failed": "NumberOfFailedSuboperations",
    "warning": "NumberOfWarningSuboperations",
    "move_originator_ae": "MoveOriginatorApplicationEntityTitle",
    "move_originator_message_id": "MoveOriginatorMessageID",
}


def commands() -> list[dimse.Command]:
    return [
        dimse.c_echo_rq(1),
        dimse.c_echo_rsp(1),
        dimse.c_find_rq(2, FIND, priority=1),
        dimse.c_find_rsp(2, FIND, 0xFF00, has_dataset=True),
        dimse.c_find_rsp(2, FIND, 0x0000),
        dimse.c_cancel_rq(2),
        dimse.c_get_rq(3, GET),
        dimse.c_get_rsp(3, GET, 0xFF00, (10, 5, 1, 0)),
        dimse.c_move_rq(4, MOVE, "PFCLIENT", priority=2),
        dimse.c_move_rsp(4, MOVE, 0xA801),
        dimse.c_store_rq(
            5, CT, INSTANCE, move_originator_ae="MOVER", move_originator_message_id=4
        ),
        dimse.c_store_rsp(5, CT, INSTANCE),
        dimse.c_store_rsp(6, CT, INSTANCE, 0xA700, error_comment="out of resources"),
    ]


def pydicom_encode(command: dimse.Command) -> bytes:
    """The command set as pydicom (through pynetdicom's dsutils) encodes it."""
    ds = Dataset()
    for name, keyword in KEYWORDS.items():
        value = getattr(command, name)
        if value is not None:
            setattr(ds, keyword, list(value) if isinstance(value, tuple) else value)
    body = dsutils.encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.name)
def test_bytes_equal_pydicom_encoding(command: dimse.Command) -> None:
    ours = dimse.encode_command(command)
    assert ours == pydicom_encode(command)
    assert dimse.decode_command(ours) == command


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.name)
def test_our_bytes_decode_in_pydicom(command: dimse.Command) -> None:
    ds = dsutils.decode(BytesIO(dimse.encode_command(command)[12:]), True, True)
    for name, keyword in KEYWORDS.items():
        value = getattr(command, name)
        if value is None:
            assert keyword not in ds
        elif isinstance(value, tuple):
            got = ds[keyword].value
            assert list(got if isinstance(got, list | tuple) else [got]) == list(value)
        else:
            assert str(ds[keyword].value).rstrip() == str(value)


def _pynetdicom_command_set(message: object) -> bytes:
    """The command set bytes of a pynetdicom DIMSE message, from its own encoder."""
    fragments = list(message.encode_msg(1, 16384))  # type: ignore[attr-defined]
    data = b""
    for primitive in fragments:
        for _, value in primitive.presentation_data_value_list:
            if value[0] & 1:
                data += value[1:]
    return data


def test_pynetdicom_messages_decode_here() -> None:
    echo = prims.C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    assert dimse.decode_command(_pynetdicom_command_set(msg)) == dimse.c_echo_rq(9)

    find = prims.C_FIND()
    find.MessageIDBeingRespondedTo = 3
    find.AffectedSOPClassUID = FIND
    find.Status = 0xFF00
    find.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = C_FIND_RSP()
    msg.primitive_to_message(find)
    decoded = dimse.decode_command(_pynetdicom_command_set(msg))
    assert (decoded.command_field, decoded.status, decoded.message_id_being_responded_to) == (
        dimse.C_FIND_RSP,
        0xFF00,
        3,
    )
    assert decoded.has_dataset

    move = prims.C_MOVE()
    move.MessageID = 4
    move.AffectedSOPClassUID = MOVE
    move.MoveDestination = "PFCLIENT"
    move.Priority = 0
    move.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = C_MOVE_RQ()
    msg.primitive_to_message(move)
    decoded = dimse.decode_command(_pynetdicom_command_set(msg))
    # pynetdicom marks "data set present" with 0x0001, we with 0x0000: any value but
    # 0x0101 means present (PS3.7 E.1).
    assert decoded.has_dataset
    assert replace(decoded, command_data_set_type=0) == dimse.c_move_rq(4, MOVE, "PFCLIENT")

    store = prims.C_STORE()
    store.MessageIDBeingRespondedTo = 5
    store.AffectedSOPClassUID = CT
    store.AffectedSOPInstanceUID = INSTANCE
    store.Status = 0x0000
    msg = C_STORE_RSP()
    msg.primitive_to_message(store)
    assert dimse.decode_command(_pynetdicom_command_set(msg)) == dimse.c_store_rsp(5, CT, INSTANCE)


def test_store_response_template_matches_encoder() -> None:
    template = dimse.StoreResponseTemplate()
    for status in (0x0000, 0xB000, 0xA700):
        for uid in (INSTANCE, INSTANCE + "1"):  # odd and even lengths
            assert template.encode(65535, CT, uid, status) == dimse.encode_command(
                dimse.c_store_rsp(65535, CT, uid, status)
            )


def test_unknown_group_0000_elements_are_skipped() -> None:
    data = bytearray(dimse.encode_command(dimse.c_echo_rq(1)))
    extra = struct.pack("<HHL", 0, 0x5010, 2) + b"\x01\x00"  # retired Message Set ID
    data += extra
    struct.pack_into("<L", data, 8, len(data) - 12)
    assert dimse.decode_command(bytes(data)) == dimse.c_echo_rq(1)


def _relength(data: bytes) -> bytes:
    """Make the Command Group Length agree with the bytes that follow it."""
    return data[:8] + struct.pack("<L", len(data) - 12) + data[12:]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: _relength(d[:-1]), "says 2 bytes, but only 1 remain"),
        (lambda d: d[:-3], "Command Group Length says .* but .* follow it"),
        (lambda d: d[:10], "says 4 bytes, but only 2 remain"),
        (lambda d: _relength(d[:14]), "ends 2 bytes into an element header"),
        (
            lambda d: _relength(d + struct.pack("<HHL", 8, 0x18, 0)),
            r"\(0008,0018\); a command set is group 0000",
        ),
        (lambda d: d[:-20] + d[-10:] + d[-20:-10], "must ascend"),
    ],
)
def test_malformed_command_sets(mutate, match: str) -> None:
    data = dimse.encode_command(dimse.c_find_rsp(2, FIND, 0xFF00, has_dataset=True))
    with pytest.raises(ProtocolError, match=match):
        dimse.decode_command(mutate(data))


def test_missing_required_and_wrong_sizes() -> None:
    no_type = struct.pack("<HHLH", 0, 0x0100, 2, dimse.C_ECHO_RQ)
    with pytest.raises(ProtocolError, match="no \\(0000,0800\\) Command Data Set Type"):
        dimse.decode_command(no_type)
    bad_us = struct.pack("<HHL", 0, 0x0100, 4) + b"\x30\x00\x00\x00"
    with pytest.raises(ProtocolError, match="US \\(2 bytes\\) but has 4"):
        dimse.decode_command(bad_us)
    out_of_order = struct.pack("<HHLHHHLH", 0, 0x0800, 2, 0x0101, 0, 0x0100, 2, 0x30)
    with pytest.raises(ProtocolError, match="must ascend"):
        dimse.decode_command(out_of_order)
    long_uid = struct.pack("<HHL", 0, 0x0002, 2000) + b"1" * 2000
    with pytest.raises(ProtocolError, match="2000 bytes"):
        dimse.decode_command(long_uid)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_command_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        dimse.decode_command(data)


@FUZZ
@given(
    st.sampled_from([dimse.encode_command(c) for c in commands()]),
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=6),
    st.integers(0, 1000),
)
def test_fuzz_mutated_command_sets(data: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    with contextlib.suppress(ProtocolError):
        dimse.decode_command(bytes(mutated[:cut]))
