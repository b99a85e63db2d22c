"""pacsframe.net over real sockets: C-STORE, C-GET, C-MOVE and C-CANCEL.

Peers: the embedded demo PACS (pynetdicom), Orthanc and dcmtk's storescp (with
CI=true a missing Orthanc or dcmtk fails, never skips), plus scripted peers on
loopback that cut an object short. Objects received by C-GET go to temporary
files that are renamed into place on commit, as the cache will do.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BufferedWriter
from pathlib import Path

import pandas as pd
import pytest
from pydicom.dataset import Dataset
from pynetdicom import dsutils
from servers import DcmtkStoreSCP, OrthancServer, require_tool
from test_net_echo import ScriptedPeer, _read_pdu

import pacsframe as pf
from pacsframe import net
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.errors import AssociationError, DimseError, ProtocolError
from pacsframe.net import dimse, pdu
from pacsframe.net.driver import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION, ClientAssociation
from pacsframe.net.operations import (
    RetrieveResponse,
    StoreRequest,
    read_part10,
    retrieve_negotiation,
)
from pacsframe.storage import storage_contexts

pytestmark = pytest.mark.timeout(180)

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
EXPLICIT = "1.2.840.10008.1.2.1"
UID = re.compile(r"[0-9]+(\.[0-9]+)*")


# ------------------------------------------------------------------- helpers


@dataclass
class Received:
    """Objects a C-GET handed over, by SOP Instance UID, written under ``folder``."""

    folder: Path
    committed: dict[str, Path] = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)
    syntaxes: dict[str, str] = field(default_factory=dict)
    fragments: dict[str, int] = field(default_factory=dict)

    def __call__(self, request: StoreRequest) -> TempFileWriter:
        # The peer names the file: only a well-formed UID becomes a path part.
        assert UID.fullmatch(request.sop_instance_uid), request.sop_instance_uid
        self.syntaxes[request.sop_instance_uid] = request.transfer_syntax
        return TempFileWriter(self, request.sop_instance_uid)

    def partial_files(self) -> list[Path]:
        return sorted(self.folder.glob("*.part"))


class TempFileWriter:
    """Fragments into ``<uid>.part``; ``os.replace`` to ``<uid>.dataset`` on commit."""

    def __init__(self, owner: Received, uid: str) -> None:
        self.owner = owner
        self.uid = uid
        self.temp = owner.folder / f"{uid}.part"
        self.file: BufferedWriter = open(self.temp, "wb")  # noqa: SIM115 - closed below

    def write(self, data: memoryview) -> None:
        self.file.write(data)
        self.owner.fragments[self.uid] = self.owner.fragments.get(self.uid, 0) + 1

    def commit(self) -> None:
        self.file.close()
        final = self.owner.folder / f"{self.uid}.dataset"
        os.replace(self.temp, final)
        self.owner.committed[self.uid] = final

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)
        self.owner.discarded.append(self.uid)


def dataset_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a Part-10 file after its file meta."""
    meta = read_part10(path)
    return Path(path).read_bytes()[meta.dataset_offset :]


def study_identifier(assoc: ClientAssociation, model: str, study_uid: str) -> bytes:
    """A STUDY-level retrieve identifier in the model context's transfer syntax."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    syntax = assoc.contexts[assoc.context_for(model)][1]
    encoded = dsutils.encode(ds, syntax == IMPLICIT_VR_LITTLE_ENDIAN, True)
    assert encoded is not None
    return encoded


def get_associate(
    port: int,
    called_ae: str,
    storage: list[tuple[str, list[str]]] | None = None,
    *,
    echo: bool = False,
    **options,
) -> ClientAssociation:
    """An association for C-GET: the study-root model and storage contexts in SCP role.

    With ``echo``, a Verification context too (there is room for it only with a
    short ``storage`` list: 128 contexts at most).
    """
    if storage is None:
        storage = [(cx.abstract_syntax, cx.transfer_syntax) for cx in storage_contexts()]
    contexts, roles = retrieve_negotiation(STUDY_GET, storage)
    if echo:
        contexts.append((VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]))
    return net.associate(
        "127.0.0.1",
        port,
        called_ae=called_ae,
        contexts=contexts,
        roles=roles,
        dimse_timeout=30,
        **options,
    )


def get_study(port: int, called_ae: str, study: str, received: Received) -> list[RetrieveResponse]:
    """Every C-GET-RSP of one whole study, over all storage contexts."""
    with get_associate(port, called_ae) as assoc:
        # The peer answered our role selection: it may act as SCU, we as SCP.
        storage = {abstract for abstract, _ in assoc.contexts.values()} - {STUDY_GET}
        answered = {r.sop_class_uid: r.scp_role for r in assoc.accept.user_information.roles}
        assert storage and all(answered.get(uid) for uid in storage)
        return list(assoc.get(study_identifier(assoc, STUDY_GET, study), STUDY_GET, received))


def largest_study(manifest: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    sizes = manifest.groupby("StudyInstanceUID").size()
    uid = str(sizes.idxmax())
    return uid, manifest[manifest.StudyInstanceUID == uid]


def cohort_storage(manifest: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Just the cohort's storage classes, so a Verification context still fits."""
    return [(uid, [EXPLICIT, IMPLICIT_VR_LITTLE_ENDIAN]) for uid in manifest.SOPClassUID.unique()]


# ------------------------------------------------------------------- C-GET


def test_get_from_demo_pacs_gives_the_files_dataset_bytes(demo_server, cohort, tmp_path) -> None:
    _, manifest = cohort
    study, rows = largest_study(manifest)
    received = Received(tmp_path)
    responses = get_study(demo_server.port, demo_server.ae_title, study, received)
    final = responses[-1]
    assert not final.pending and final.status == 0x0000
    assert (final.completed, final.failed) == (len(rows), 0)
    assert all(r.pending for r in responses[:-1])
    assert set(received.committed) == set(rows.SOPInstanceUID)
    assert received.discarded == [] and received.partial_files() == []
    for uid, path in zip(rows.SOPInstanceUID, rows.path, strict=True):
        assert received.syntaxes[uid] == read_part10(path).transfer_syntax
        assert received.committed[uid].read_bytes() == dataset_bytes(path), uid


def test_get_from_orthanc_matches_pacs_get(orthanc, cohort, tmp_path) -> None:
    """The new driver and pacsframe's pynetdicom-based PACS.get cache the same bytes."""
    _, manifest = cohort
    study, rows = largest_study(manifest)
    received = Received(tmp_path)
    responses = get_study(orthanc.dicom_port, orthanc.aet, study, received)
    assert responses[-1].status == 0x0000
    assert responses[-1].completed == len(rows)
    assert received.discarded == [] and received.partial_files() == []

    pacs = pf.PACS(orthanc.host, orthanc.dicom_port, orthanc.aet, cache=tmp_path / "cache")
    result = pacs.get(pd.DataFrame({"StudyInstanceUID": [study]}), progress=False)
    assert result.failed == 0 and result.completed == len(rows)
    cached = dict(zip(result.instances.SOPInstanceUID, result.instances.path, strict=True))
    assert set(received.committed) == set(cached) == set(rows.SOPInstanceUID)
    for uid, path in cached.items():
        assert received.committed[uid].read_bytes() == dataset_bytes(path), uid


def test_get_closed_early_cancels_and_association_goes_on(demo_server, cohort, tmp_path) -> None:
    _, manifest = cohort
    study, rows = largest_study(manifest)
    storage = cohort_storage(manifest)
    received = Received(tmp_path)
    with get_associate(demo_server.port, demo_server.ae_title, storage) as assoc:
        identifier = study_identifier(assoc, STUDY_GET, study)
        responses = assoc.get(identifier, STUDY_GET, received)
        first = next(responses)
        assert first.pending
        responses.close()  # sends C-CANCEL and reads up to the final response
        # Whatever arrived before the peer saw the cancel is whole; nothing else.
        assert 1 <= len(received.committed) <= len(rows)
        assert received.discarded == [] and received.partial_files() == []
        paths = dict(zip(rows.SOPInstanceUID, rows.path, strict=True))
        for uid, path in received.committed.items():
            assert path.read_bytes() == dataset_bytes(paths[uid])
        # The association is still usable: the whole study again.
        again = Received(tmp_path / "again")
        again.folder.mkdir()
        final = list(assoc.get(identifier, STUDY_GET, again))[-1]
        assert final.status == 0x0000 and len(again.committed) == len(rows)


@pytest.fixture(scope="module")
def long_study(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DemoPACS, pd.DataFrame]]:
    """A demo PACS holding one study of 40 small instances: room to cancel in."""
    folder = tmp_path_factory.mktemp("long-study")
    manifest = make_cohort(
        folder,
        patients=1,
        seed=12,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=40,
        matrix=16,
    )
    with DemoPACS(folder) as server:
        yield server, manifest


def test_cancel_stops_the_demo_pacs_mid_study(long_study, tmp_path) -> None:
    server, manifest = long_study
    study, rows = largest_study(manifest)
    received = Received(tmp_path)
    with get_associate(server.port, server.ae_title, cohort_storage(manifest), echo=True) as assoc:
        identifier = study_identifier(assoc, STUDY_GET, study)
        responses = assoc.get(identifier, STUDY_GET, received)
        assert next(responses).pending
        responses.close()
        # pynetdicom checks for a cancel between sub-operations: it stopped early.
        assert 1 <= len(received.committed) < len(rows)
        assert received.discarded == [] and received.partial_files() == []
        paths = dict(zip(rows.SOPInstanceUID, rows.path, strict=True))
        for uid, path in received.committed.items():
            assert path.read_bytes() == dataset_bytes(paths[uid])
        assert assoc.echo() == 0x0000


def test_cancel_on_orthanc_drains_and_releases(orthanc, cohort, tmp_path) -> None:
    """Orthanc may finish the C-GET regardless; every object it sends is whole."""
    _, manifest = cohort
    study, rows = largest_study(manifest)
    received = Received(tmp_path)
    with get_associate(
        orthanc.dicom_port, orthanc.aet, cohort_storage(manifest), echo=True
    ) as assoc:
        responses = assoc.get(study_identifier(assoc, STUDY_GET, study), STUDY_GET, received)
        assert next(responses).pending
        responses.close()
        assert assoc.echo() == 0x0000
    assert set(received.committed) <= set(rows.SOPInstanceUID)
    assert received.discarded == [] and received.partial_files() == []


class Refusing(Received):
    """Fails to open a file for one object (a full disk), or raises a bug."""

    def __init__(self, folder: Path, refuse: str, error: Exception) -> None:
        super().__init__(folder)
        self.refuse = refuse
        self.error = error

    def __call__(self, request: StoreRequest) -> TempFileWriter:
        if request.sop_instance_uid == self.refuse:
            raise self.error
        return super().__call__(request)


def test_writer_os_error_answers_out_of_resources(demo_server, cohort, tmp_path) -> None:
    _, manifest = cohort
    study, rows = largest_study(manifest)
    refused = rows.SOPInstanceUID.iloc[1]
    received = Refusing(tmp_path, refused, OSError(28, "No space left on device"))
    with get_associate(demo_server.port, demo_server.ae_title, cohort_storage(manifest)) as assoc:
        identifier = study_identifier(assoc, STUDY_GET, study)
        final = list(assoc.get(identifier, STUDY_GET, received))[-1]
    # The peer counted the 0xA700 answer as a failed sub-operation; the rest arrived.
    assert (final.status, final.completed, final.failed) == (0xB000, len(rows) - 1, 1)
    assert set(received.committed) == set(rows.SOPInstanceUID) - {refused}


def test_writer_bug_aborts(demo_server, cohort, tmp_path) -> None:
    _, manifest = cohort
    study, rows = largest_study(manifest)
    received = Refusing(tmp_path, rows.SOPInstanceUID.iloc[0], RuntimeError("a bug"))
    with get_associate(demo_server.port, demo_server.ae_title, cohort_storage(manifest)) as assoc:
        identifier = study_identifier(assoc, STUDY_GET, study)
        with pytest.raises(RuntimeError, match="a bug"):
            list(assoc.get(identifier, STUDY_GET, received))
        assert assoc._machine.state.name == "CLOSED"
    assert received.partial_files() == []


def test_get_of_nothing_and_without_context(demo_server, cohort, tmp_path) -> None:
    _, manifest = cohort
    received = Received(tmp_path)
    with get_associate(demo_server.port, demo_server.ae_title, cohort_storage(manifest)) as assoc:
        identifier = study_identifier(assoc, STUDY_GET, "1.2.3.4.5.6.7.8.9")
        [final] = list(assoc.get(identifier, STUDY_GET, received))
        assert final.status == 0x0000 and not received.committed
        with pytest.raises(pf.NotSupported, match="accepted no presentation context"):
            next(assoc.get(identifier, STUDY_MOVE, received))
        # A retrieve never iterated sent nothing: the association goes on.
        assoc.get(identifier, STUDY_GET, received)
        [final] = list(assoc.get(identifier, STUDY_GET, received))
        assert final.status == 0x0000


# ------------------------------------------------------------------- C-STORE


@pytest.fixture(scope="module")
def empty_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    require_tool("Orthanc")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-store"))
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


def store_contexts(paths: list[str]) -> list[tuple[str, list[str]]]:
    pairs = {}
    for path in paths:
        meta = read_part10(path)
        pairs.setdefault(meta.sop_class_uid, []).append(meta.transfer_syntax)
    return [(uid, list(dict.fromkeys(syntaxes))) for uid, syntaxes in pairs.items()]


def store_all(port: int, called_ae: str, paths: list[str]) -> list[int]:
    with net.associate(
        "127.0.0.1", port, called_ae=called_ae, contexts=store_contexts(paths), dimse_timeout=30
    ) as assoc:
        return [assoc.store(path) for path in paths]


def test_store_cohort_to_orthanc(empty_orthanc, cohort) -> None:
    _, manifest = cohort
    statuses = store_all(empty_orthanc.dicom_port, empty_orthanc.aet, list(manifest.path))
    assert statuses == [0x0000] * len(manifest)
    assert empty_orthanc.count_instances() == len(manifest)


def test_store_cohort_to_dcmtk_storescp(cohort, tmp_path) -> None:
    require_tool("storescp")
    _, manifest = cohort
    with DcmtkStoreSCP(tmp_path / "storescp") as server:
        statuses = store_all(server.dicom_port, server.aet, list(manifest.path))
        # Bytes with explicit UIDs go the same way as a file.
        path = manifest.path.iloc[0]
        meta = read_part10(path)
        with net.associate(
            "127.0.0.1",
            server.dicom_port,
            called_ae=server.aet,
            contexts=store_contexts([path]),
        ) as assoc:
            again = assoc.store(
                dataset_bytes(path), meta.sop_class_uid, meta.sop_instance_uid, EXPLICIT
            )
        files = server.received_files()
    assert statuses == [0x0000] * len(manifest) and again == 0x0000
    assert len(files) >= len(manifest)
    by_uid = {read_part10(f).sop_instance_uid: f for f in files}
    for uid, path in zip(manifest.SOPInstanceUID, manifest.path, strict=True):
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(path), uid


def test_store_refuses_what_was_not_negotiated(demo_server, cohort) -> None:
    _, manifest = cohort
    path = manifest.path.iloc[0]
    with net.associate(
        "127.0.0.1",
        demo_server.port,
        called_ae=demo_server.ae_title,
        contexts=[(read_part10(path).sop_class_uid, [IMPLICIT_VR_LITTLE_ENDIAN])],
    ) as assoc:
        with pytest.raises(pf.NotSupported, match="never transcoded"):
            assoc.store(path)
        with pytest.raises(ValueError, match="needs sop_class_uid"):
            assoc.store(b"\x08\x00")
    with pytest.raises(ValueError, match="not a DICOM Part-10 file"):
        read_part10(Path(__file__))


def test_large_objects_fragment_both_ways(tmp_path) -> None:
    """Objects many PDUs long: sent within storescp's maximum, received in pieces."""
    require_tool("storescp")
    manifest = make_cohort(
        tmp_path / "large",
        patients=1,
        seed=13,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=3,
        matrix=128,
    )
    paths = list(manifest.path)
    with DcmtkStoreSCP(tmp_path / "storescp", extra_args=["--max-pdu", "8192"]) as server:
        assert store_all(server.dicom_port, server.aet, paths) == [0x0000] * len(paths)
        by_uid = {read_part10(f).sop_instance_uid: f for f in server.received_files()}
    received = Received(tmp_path)
    study = manifest.StudyInstanceUID.iloc[0]
    with (
        DemoPACS(tmp_path / "large") as demo,
        get_associate(demo.port, demo.ae_title, cohort_storage(manifest), max_pdu=4096) as a,
    ):
        final = list(a.get(study_identifier(a, STUDY_GET, study), STUDY_GET, received))[-1]
    assert final.completed == len(paths)
    for uid, path in zip(manifest.SOPInstanceUID, paths, strict=True):
        expected = dataset_bytes(path)
        assert len(expected) > 30_000
        assert dataset_bytes(by_uid[uid]) == expected
        assert received.committed[uid].read_bytes() == expected
        # At most 4090 data bytes per PDU: the object reached the writer in pieces.
        assert received.fragments[uid] >= len(expected) // 4090


# ------------------------------------------------------------------- C-MOVE


def test_move_from_orthanc_to_storescp(orthanc, cohort, tmp_path) -> None:
    require_tool("storescp")
    _, manifest = cohort
    study, rows = largest_study(manifest)
    with DcmtkStoreSCP(tmp_path / "storescp", aet="NETDEST") as server:
        orthanc.add_modality("NETDEST", "NETDEST", "127.0.0.1", server.dicom_port)
        # Orthanc answers C-MOVE only to a registered calling AE.
        orthanc.add_modality("NETMOVER", "NETMOVER", "127.0.0.1", server.dicom_port)
        with net.associate(
            "127.0.0.1",
            orthanc.dicom_port,
            called_ae=orthanc.aet,
            calling_ae="NETMOVER",
            contexts=[(STUDY_MOVE, [EXPLICIT, IMPLICIT_VR_LITTLE_ENDIAN])],
            dimse_timeout=30,
        ) as assoc:
            identifier = study_identifier(assoc, STUDY_MOVE, study)
            responses = list(assoc.move(identifier, STUDY_MOVE, "NETDEST"))
            # Orthanc 1.10 answers an unknown destination 0xC000, not 0xA801.
            with pytest.raises(DimseError, match="status 0xC000") as info:
                list(assoc.move(identifier, STUDY_MOVE, "NOBODY"))
            assert info.value.status == 0xC000
        files = server.received_files()
    final = responses[-1]
    assert final.status == 0x0000 and final.completed == len(rows) and not final.failed
    assert {read_part10(f).sop_instance_uid for f in files} == set(rows.SOPInstanceUID)


def test_move_from_demo_pacs_counts_and_cancel(demo_server, cohort, tmp_path) -> None:
    require_tool("storescp")
    _, manifest = cohort
    study, rows = largest_study(manifest)
    with DcmtkStoreSCP(tmp_path / "storescp", aet="NETDEST2") as server:
        demo_server.add_known_ae("NETDEST2", "127.0.0.1", server.dicom_port)
        with net.associate(
            "127.0.0.1",
            demo_server.port,
            called_ae=demo_server.ae_title,
            contexts=[
                (STUDY_MOVE, [EXPLICIT, IMPLICIT_VR_LITTLE_ENDIAN]),
                (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
            ],
            dimse_timeout=30,
        ) as assoc:
            identifier = study_identifier(assoc, STUDY_MOVE, study)
            responses: list[RetrieveResponse] = list(
                assoc.move(identifier, STUDY_MOVE, "NETDEST2")
            )
            pending = [r for r in responses if r.pending]
            # Each pending response counts one more sub-operation done.
            assert [r.completed for r in pending] == list(range(1, len(pending) + 1))
            assert all(r.remaining == len(rows) - r.completed for r in pending)
            moving = assoc.move(identifier, STUDY_MOVE, "NETDEST2")
            assert next(moving).pending
            moving.close()  # C-CANCEL, then the final response
            with pytest.raises(pf.MoveDestinationUnknown, match="Move destination unknown"):
                list(assoc.move(identifier, STUDY_MOVE, "NOBODY"))
            assert assoc.echo() == 0x0000
        files = server.received_files()
    final = responses[-1]
    assert (final.status, final.completed, final.failed) == (0x0000, len(rows), 0)
    assert {read_part10(f).sop_instance_uid for f in files} == set(rows.SOPInstanceUID)


# ------------------------------------------------------- scripted faulty peers

_STORAGE_CX = 3
_CT = "1.2.840.10008.5.1.4.1.1.2"


def _accept_for_get() -> bytes:
    return pdu.encode(
        pdu.AssociateAC(
            "SCP",
            "PACSFRAME",
            (
                pdu.PresentationContextAC(1, 0, IMPLICIT_VR_LITTLE_ENDIAN),
                pdu.PresentationContextAC(_STORAGE_CX, 0, EXPLICIT),
            ),
            pdu.UserInformation(16384, "1.2.3", roles=(pdu.RoleSelection(_CT, False, True),)),
        )
    )


def _pdv(context_id: int, is_command: bool, is_last: bool, data: bytes) -> bytes:
    return pdu.encode(pdu.PDataTF((pdu.PDV(context_id, is_command, is_last, data),)))


_STORE_RQ = _pdv(
    _STORAGE_CX, True, True, dimse.encode_command(dimse.c_store_rq(9, _CT, "1.2.3.4"))
)
_HALF_DATASET = _pdv(_STORAGE_CX, False, False, b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 100)

_GET_RSP = _pdv(1, True, True, dimse.encode_command(dimse.c_get_rsp(1, STUDY_GET, 0)))

# What the peer sends after the C-STORE-RQ, whether it then closes the
# connection, and the error that gives.
_AFTER_STORE_RQ = {
    "abort": (
        _HALF_DATASET + pdu.encode(pdu.Abort(0, 0)),
        False,
        AssociationError,
        "aborted the association",
    ),
    "close": (_HALF_DATASET, True, ProtocolError, "closed the connection"),
    "command mid-way": (
        _HALF_DATASET + _GET_RSP,
        False,
        ProtocolError,
        "interleaved a command fragment on context 1 into an unfinished data set",
    ),
    "command instead": (
        _GET_RSP,
        False,
        ProtocolError,
        "new command before the data set its C-STORE-RQ announced",
    ),
    "silence": (
        _HALF_DATASET,
        False,
        AssociationError,
        "timed out waiting for the data set of a C-STORE-RQ",
    ),
    "other context": (
        _HALF_DATASET + _pdv(1, False, True, b"rest"),
        False,
        ProtocolError,
        "interleaved a data set fragment on context 1",
    ),
    # Whole data PDUs come in one batch; a bad PDU after them still fails alone.
    "unaccepted context after a batch": (
        _HALF_DATASET * 3 + _pdv(7, False, True, b"rest"),
        False,
        ProtocolError,
        "presentation context 7, which was not accepted",
    ),
    "PDV longer than its PDU after a batch": (
        _HALF_DATASET * 2
        + b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x63"
        + bytes([_STORAGE_CX, 0])
        + b"xy",
        False,
        ProtocolError,
        "a PDV of 99 bytes",
    ),
    "unknown PDU type after a batch": (
        _HALF_DATASET * 2 + b"\x0a\x00\x00\x00\x00\x04\x00\x00\x00\x00",
        False,
        ProtocolError,
        "unknown PDU type 0x0A",
    ),
}


def _answer_request(conn: socket.socket) -> None:
    """Accept the association and read the retrieve request (command, identifier)."""
    _read_pdu(conn)
    conn.sendall(_accept_for_get())
    _read_pdu(conn)
    _read_pdu(conn)


@contextmanager
def _scripted(
    script: Callable[[socket.socket], None], model: str, dimse_timeout: float = 20
) -> Iterator[tuple[ScriptedPeer, ClientAssociation]]:
    """A scripted peer and our association to it: ``model`` and CT in SCP role."""
    with (
        ScriptedPeer(script) as peer,
        net.associate(
            "127.0.0.1",
            peer.port,
            called_ae="SCP",
            contexts=[(model, [IMPLICIT_VR_LITTLE_ENDIAN]), (_CT, [EXPLICIT])],
            roles=[pdu.RoleSelection(_CT, False, True)],
            dimse_timeout=dimse_timeout,
        ) as assoc,
    ):
        yield peer, assoc


@pytest.mark.parametrize("case", sorted(_AFTER_STORE_RQ))
def test_object_cut_short_is_discarded(case: str, tmp_path: Path) -> None:
    after, close, error, match = _AFTER_STORE_RQ[case]

    def script(conn: socket.socket) -> None:
        _answer_request(conn)
        conn.sendall(_STORE_RQ + after)
        if close:
            conn.shutdown(socket.SHUT_WR)

    received = Received(tmp_path)
    with (
        _scripted(script, STUDY_GET, 1 if case == "silence" else 20) as (_, assoc),
        pytest.raises(error, match=match),
    ):
        list(assoc.get(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", STUDY_GET, received))
    assert received.discarded == ["1.2.3.4"]
    assert received.committed == {} and received.partial_files() == []


def test_store_sub_operation_in_a_move_is_a_protocol_error() -> None:
    def script(conn: socket.socket) -> None:
        _answer_request(conn)
        conn.sendall(_STORE_RQ)

    with (
        _scripted(script, STUDY_MOVE) as (peer, assoc),
        pytest.raises(ProtocolError, match="C-STORE-RQ while we waited for C-MOVE-RSP"),
    ):
        list(assoc.move(b"", STUDY_MOVE, "ANY"))
    assert pdu.decode(peer.received).source == 2


def test_failure_status_raises_with_counts() -> None:
    final = dimse.c_get_rsp(1, STUDY_GET, 0xA702, (0, 0, 2, 0))

    def script(conn: socket.socket) -> None:
        _answer_request(conn)
        conn.sendall(_pdv(1, True, True, dimse.encode_command(final)))
        _read_pdu(conn)  # A-RELEASE-RQ
        conn.sendall(pdu.encode(pdu.ReleaseRP()))

    with (
        _scripted(script, STUDY_GET) as (_, assoc),
        pytest.raises(DimseError, match=r"0xA702 \(0 completed, 2 failed") as info,
    ):
        list(assoc.get(b"", STUDY_GET, Received(Path("/nonexistent"))))
    assert info.value.status == 0xA702


_WRONG_ANSWERS = {
    "another message": (
        dimse.c_get_rsp(7, STUDY_GET, 0xFF00, (1, 0, 0, 0)),
        "answered message 1 with C-GET-RSP for message 7",
    ),
    "another service": (
        dimse.c_find_rsp(1, STUDY_GET, 0x0000),
        "C-FIND-RSP while we waited for C-GET-RSP or C-STORE-RQ",
    ),
}


@pytest.mark.parametrize("case", sorted(_WRONG_ANSWERS))
def test_wrong_answer_to_a_get_aborts(case: str) -> None:
    answer, match = _WRONG_ANSWERS[case]

    def script(conn: socket.socket) -> None:
        _answer_request(conn)
        conn.sendall(_pdv(1, True, True, dimse.encode_command(answer)))

    with (
        _scripted(script, STUDY_GET) as (peer, assoc),
        pytest.raises(ProtocolError, match=match),
    ):
        list(assoc.get(b"", STUDY_GET, Received(Path("/nonexistent"))))
    assert pdu.decode(peer.received).source == 2
