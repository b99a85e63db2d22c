"""pacsframe.net.pdu: round trips, differential tests against pynetdicom, fuzzing.

pynetdicom's PDU classes are an independent implementation of PS3.8: what we
encode must decode there to the same fields, and what they encode must decode
here to the same fields.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import pdu as pnd_pdu
from pynetdicom import pdu_primitives as pnd_prim
from pynetdicom.presentation import PresentationContext

from pacsframe.errors import AssociationError, ProtocolError
from pacsframe.net import pdu

pytestmark = pytest.mark.timeout(120)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample_rq() -> pdu.AssociateRQ:
    return pdu.AssociateRQ(
        "ORTHANC",
        "PACSFRAME",
        (
            pdu.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
            pdu.PresentationContextRQ(3, FIND, (EXPLICIT, IMPLICIT)),
            pdu.PresentationContextRQ(5, CT, (EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.4.50")),
        ),
        pdu.UserInformation(
            262144, "1.2.826.0.1.3680043.9.1", "PF_01", (pdu.RoleSelection(CT, False, True),)
        ),
    )


def sample_ac() -> pdu.AssociateAC:
    return pdu.AssociateAC(
        "ORTHANC",
        "PACSFRAME",
        (
            pdu.PresentationContextAC(1, 0, IMPLICIT),
            pdu.PresentationContextAC(3, 3, IMPLICIT),
            pdu.PresentationContextAC(5, 0, EXPLICIT),
        ),
        pdu.UserInformation(16384, "1.2.3.4", "OTHER", (pdu.RoleSelection(CT, False, True),)),
    )


def valid_pdus() -> list[pdu.PDU]:
    return [
        sample_rq(),
        sample_ac(),
        pdu.AssociateRJ(1, 1, 7),
        pdu.PDataTF((pdu.PDV(1, True, True, b"\x00" * 10), pdu.PDV(3, False, False, b"dataset"))),
        pdu.ReleaseRQ(),
        pdu.ReleaseRP(),
        pdu.Abort(2, 6),
    ]


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("message", valid_pdus(), ids=lambda m: type(m).__name__)
def test_round_trip(message: pdu.PDU) -> None:
    decoded = pdu.decode(pdu.encode(message))
    if isinstance(message, pdu.PDataTF):
        assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in decoded.pdvs] == [
            (p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in message.pdvs
        ]
    else:
        assert decoded == message


def test_header_reports_type_and_length() -> None:
    data = pdu.encode(sample_rq())
    assert pdu.pdu_header(data) == (0x01, len(data) - 6)


def test_unknown_items_and_sub_items_are_skipped() -> None:
    """A reserved item type and an unknown user sub-item (e.g. user identity) are ignored."""
    data = bytearray(pdu.encode(sample_rq()))
    extra_item = struct.pack(">BxH", 0x60, 3) + b"abc"
    # Append an unknown sub-item (0x58 user identity) inside the user information item.
    ui_at = data.index(bytes([0x50, 0x00]), 6 + 68)
    (ui_len,) = struct.unpack_from(">H", data, ui_at + 2)
    sub = struct.pack(">BxH", 0x58, 4) + b"\x01\x00\x00\x00"
    data[ui_at + 4 + ui_len : ui_at + 4 + ui_len] = sub
    struct.pack_into(">H", data, ui_at + 2, ui_len + len(sub))
    data += extra_item
    struct.pack_into(">L", data, 2, len(data) - 6)
    assert pdu.decode(bytes(data)) == sample_rq()


# --------------------------------------------------------- differential: ours -> theirs


def test_our_associate_rq_decodes_in_pynetdicom() -> None:
    ours = sample_rq()
    theirs = pnd_pdu.A_ASSOCIATE_RQ()
    theirs.decode(pdu.encode(ours))
    prim = theirs.to_primitive()
    assert prim.called_ae_title == "ORTHANC"
    assert prim.calling_ae_title == "PACSFRAME"
    assert prim.application_context_name == pdu.APPLICATION_CONTEXT
    assert prim.maximum_length_received == 262144
    assert prim.implementation_class_uid == "1.2.826.0.1.3680043.9.1"
    assert [
        (cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax))
        for cx in prim.presentation_context_definition_list
    ] == [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntaxes)) for cx in ours.contexts]
    items = {type(item).__name__: item for item in prim.user_information}
    assert items["ImplementationVersionNameNotification"].implementation_version_name == "PF_01"
    role = items["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, False, True)
    # pynetdicom re-encodes our PDU to the very same bytes.
    assert theirs.encode() == pdu.encode(ours)


def test_our_associate_ac_decodes_in_pynetdicom() -> None:
    ours = sample_ac()
    theirs = pnd_pdu.A_ASSOCIATE_AC()
    theirs.decode(pdu.encode(ours))
    prim = theirs.to_primitive()
    assert prim.maximum_length_received == 16384
    assert prim.implementation_class_uid == "1.2.3.4"
    results = [
        (cx.context_id, cx.result, cx.transfer_syntax[0] if cx.transfer_syntax else None)
        for cx in prim.presentation_context_definition_results_list
    ]
    assert results == [(1, 0, IMPLICIT), (3, 3, IMPLICIT), (5, 0, EXPLICIT)]
    assert theirs.encode() == pdu.encode(ours)


def test_our_small_pdus_decode_in_pynetdicom() -> None:
    rj = pnd_pdu.A_ASSOCIATE_RJ()
    rj.decode(pdu.encode(pdu.AssociateRJ(2, 3, 1)))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (2, 3, 1)
    ab = pnd_pdu.A_ABORT_RQ()
    ab.decode(pdu.encode(pdu.Abort(2, 6)))
    assert (ab.source, ab.reason_diagnostic) == (2, 6)
    for ours, cls in (
        (pdu.ReleaseRQ(), pnd_pdu.A_RELEASE_RQ),
        (pdu.ReleaseRP(), pnd_pdu.A_RELEASE_RP),
    ):
        theirs = cls()
        theirs.decode(pdu.encode(ours))
        assert theirs.encode() == pdu.encode(ours)
    data = pnd_pdu.P_DATA_TF()
    data.decode(
        pdu.encode(pdu.PDataTF((pdu.PDV(1, True, True, b"cmd"), pdu.PDV(1, False, False, b"ds"))))
    )
    assert [
        (i.presentation_context_id, i.presentation_data_value)
        for i in data.presentation_data_value_items
    ] == [
        (1, b"\x03cmd"),
        (1, b"\x00ds"),
    ]


# --------------------------------------------------------- differential: theirs -> ours


def _their_associate(ac: bool) -> bytes:
    prim = pnd_prim.A_ASSOCIATE()
    prim.application_context_name = pdu.APPLICATION_CONTEXT
    prim.calling_ae_title = "STORESCU"
    prim.called_ae_title = "ANY-SCP"
    max_length = pnd_prim.MaximumLengthNotification()
    max_length.maximum_length_received = 28672
    klass = pnd_prim.ImplementationClassUIDNotification()
    klass.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.1.0"
    version = pnd_prim.ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_210"
    role = pnd_prim.SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role = True
    role.scp_role = True
    async_ops = pnd_prim.AsynchronousOperationsWindowNegotiation()
    async_ops.maximum_number_operations_invoked = 1
    async_ops.maximum_number_operations_performed = 1
    prim.user_information = [max_length, klass, version, role, async_ops]
    contexts = []
    for cid, abstract, syntaxes in ((1, VERIFICATION, [IMPLICIT]), (3, CT, [EXPLICIT, IMPLICIT])):
        cx = PresentationContext()
        cx.context_id = cid
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        if ac:
            cx.result = 0 if cid == 1 else 4
            cx.transfer_syntax = syntaxes[:1]
        contexts.append(cx)
    if ac:
        prim.result = 0
        prim.presentation_context_definition_results_list = contexts
        theirs = pnd_pdu.A_ASSOCIATE_AC()
    else:
        prim.presentation_context_definition_list = contexts
        theirs = pnd_pdu.A_ASSOCIATE_RQ()
    theirs.from_primitive(prim)
    return theirs.encode()


def test_pynetdicom_associate_rq_decodes_here() -> None:
    rq = pdu.decode(_their_associate(ac=False))
    assert isinstance(rq, pdu.AssociateRQ)
    assert (rq.called_ae, rq.calling_ae) == ("ANY-SCP", "STORESCU")
    assert rq.application_context == pdu.APPLICATION_CONTEXT
    assert rq.contexts == (
        pdu.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
        pdu.PresentationContextRQ(3, CT, (EXPLICIT, IMPLICIT)),
    )
    # The asynchronous operations sub-item is skipped; the rest is read.
    assert rq.user_information == pdu.UserInformation(
        28672,
        "1.2.826.0.1.3680043.9.3811.2.1.0",
        "PYNETDICOM_210",
        (pdu.RoleSelection(CT, True, True),),
    )


def test_pynetdicom_associate_ac_decodes_here() -> None:
    ac = pdu.decode(_their_associate(ac=True))
    assert isinstance(ac, pdu.AssociateAC)
    assert [(cx.context_id, cx.result, cx.accepted) for cx in ac.contexts] == [
        (1, 0, True),
        (3, 4, False),
    ]
    assert ac.contexts[0].transfer_syntax == IMPLICIT
    assert ac.user_information.max_length == 28672


def test_pynetdicom_small_pdus_decode_here() -> None:
    rj = pnd_pdu.A_ASSOCIATE_RJ()
    prim = pnd_prim.A_ASSOCIATE()
    prim.result, prim.result_source, prim.diagnostic = 1, 1, 7
    rj.from_primitive(prim)
    assert pdu.decode(rj.encode()) == pdu.AssociateRJ(1, 1, 7)
    abort_prim = pnd_prim.A_ABORT()
    abort_prim.abort_source = 0
    ab = pnd_pdu.A_ABORT_RQ()
    ab.from_primitive(abort_prim)
    assert pdu.decode(ab.encode()) == pdu.Abort(0, 0)
    assert pdu.decode(pnd_pdu.A_RELEASE_RQ().encode()) == pdu.ReleaseRQ()
    assert pdu.decode(pnd_pdu.A_RELEASE_RP().encode()) == pdu.ReleaseRP()
    data_prim = pnd_prim.P_DATA()
    data_prim.presentation_data_value_list = [[5, b"\x02last dataset"], [7, b"\x01cm"]]
    tf = pnd_pdu.P_DATA_TF()
    tf.from_primitive(data_prim)
    decoded = pdu.decode(tf.encode())
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in decoded.pdvs] == [
        (5, False, True, b"last dataset"),
        (7, True, False, b"cm"),
    ]


# ------------------------------------------------------- specific malformations


def _expect(data: bytes, match: str, max_pdata: int = 0) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        pdu.decode(data, max_pdata)
    error = info.value
    assert isinstance(error, AssociationError) and error.reason == "aborted"
    assert str(error)[:1].islower() and len(str(error)) > 20
    return error


def test_truncated_pdus() -> None:
    for message in valid_pdus():
        data = pdu.encode(message)
        for cut in range(len(data)):
            with pytest.raises(ProtocolError):
                pdu.decode(data[:cut])


def test_length_larger_than_data() -> None:
    data = bytearray(pdu.encode(sample_rq()))
    struct.pack_into(">L", data, 2, len(data))
    _expect(bytes(data), "says it has .* bytes after its header")


def test_unknown_pdu_type() -> None:
    error = _expect(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00", "unknown PDU type 0x09")
    assert error.abort_reason == pdu.UNRECOGNIZED_PDU


def test_item_overruns_its_parent() -> None:
    data = bytearray(pdu.encode(sample_rq()))
    # The first presentation context item: make its length overrun the PDU.
    at = data.index(bytes([0x20, 0x00]), 6 + 68)
    struct.pack_into(">H", data, at + 2, 0xFFF0)
    _expect(bytes(data), "item 0x20 .* says 65520 bytes")


def test_sub_item_overruns_its_item() -> None:
    data = bytearray(pdu.encode(sample_rq()))
    at = data.index(bytes([0x30, 0x00]), 6 + 68)  # abstract syntax inside context 1
    struct.pack_into(">H", data, at + 2, 200)
    _expect(bytes(data), "presentation context 1")


def test_pdv_longer_than_its_pdu() -> None:
    data = bytearray(pdu.encode(pdu.PDataTF((pdu.PDV(1, True, True, b"abcdef"),))))
    struct.pack_into(">L", data, 6, 100)
    _expect(bytes(data), "PDV of 100 bytes in a P-DATA-TF with only 8 left")


def test_pdu_over_our_max_length() -> None:
    data = pdu.encode(pdu.PDataTF((pdu.PDV(1, False, True, b"x" * 100),)))
    _expect(data, "over the maximum PDU length of 64", max_pdata=64)


def test_fixed_size_pdu_with_wrong_length() -> None:
    _expect(b"\x05\x00\x00\x00\x00\x05" + bytes(5), "A-RELEASE-RQ with length 5")


def test_huge_associate_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="at most"):
        pdu.pdu_header(struct.pack(">BxL", 1, 1 << 30))


def test_missing_max_length_and_bad_role_item() -> None:
    data = bytearray(pdu.encode(sample_rq()))
    at = data.index(bytes([0x51, 0x00, 0x00, 0x04]))
    data[at] = 0x5F  # unknown sub-item now; no maximum length remains
    _expect(bytes(data), "no maximum length sub-item")
    data = bytearray(pdu.encode(sample_rq()))
    at = data.index(bytes([0x54, 0x00]))
    struct.pack_into(">H", data, at + 4, 3)  # UID length inconsistent with the item
    _expect(bytes(data), "role selection sub-item")


def test_non_ascii_uid() -> None:
    data = bytearray(pdu.encode(sample_rq()))
    at = data.index(VERIFICATION.encode())
    data[at] = 0xFF
    _expect(bytes(data), "not ASCII")


def test_encoder_refuses_bad_titles() -> None:
    with pytest.raises(ValueError, match="AE title"):
        pdu.encode(pdu.AssociateRQ("X" * 17, "PF", ()))


# --------------------------------------------------------------------- fuzzing


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        pdu.decode(data)


@FUZZ
@given(
    st.sampled_from([pdu.encode(m) for m in valid_pdus()]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
def test_fuzz_mutated_pdus(data: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    mutated = mutated[: max(cut, 6)] if cut < len(mutated) else mutated
    with contextlib.suppress(ProtocolError):
        pdu.decode(bytes(mutated), max_pdata=1 << 16)


@FUZZ
@given(
    st.sampled_from([pdu.encode(m) for m in valid_pdus()]),
    st.integers(0, 5000),
    st.binary(max_size=16),
)
def test_fuzz_length_fields_with_inserted_bytes(data: bytes, at: int, insert: bytes) -> None:
    mutated = bytearray(data)
    at = at % (len(mutated) + 1)
    mutated[at:at] = insert
    # Keep the PDU length consistent so the decoder has to look inside.
    struct.pack_into(">L", mutated, 2, len(mutated) - 6)
    with contextlib.suppress(ProtocolError):
        pdu.decode(bytes(mutated))
