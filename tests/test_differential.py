"""Differential tests: the same frames and the same cached bytes whichever engine works.

Three peers hold the shared cohort (conftest): the demo PACS (pynetdicom), Orthanc and
dcmtk's dcmqrscp (with CI=true a missing Orthanc or dcmtk fails, never skips). Against
each, pacsframe's public API (``PACS.find_*``, ``PACS.get``, ``PACS.move``) is compared
with a reference made here from pynetdicom alone:

* C-FIND: the same identifier sent with ``send_c_find``, each answer added to
  :class:`pacsframe.frames.FrameBuilder` the slow way (``add`` of a decoded data set);
  the frames must be equal column by column, dtypes included. Rows are compared in
  UID order: no peer promises an order.
* C-GET: the data set bytes pynetdicom receives (``event.request.DataSet``, as they
  came off the wire) and their transfer syntax; ``PACS.get``'s cached files must hold
  those bytes after their file meta, and so must what
  :meth:`pacsframe.net.driver.ClientAssociation.get` streams to an in-memory writer.
* C-MOVE to our own SCP: ``PACS.move`` must cache the same bytes.
* The engine alone: :meth:`pacsframe.net.driver.ClientAssociation.find`, its
  identifiers' bytes handed to ``FrameBuilder.add_raw``, must read the same frames,
  and its C-MOVE to its own :class:`pacsframe.net.server.StorageServer` must receive
  the same bytes.

Whatever engine runs under ``PACS`` (pynetdicom today, ``pacsframe.net`` next), these
must hold. The cohort is small (a few studies of 16x16 images), so the file runs in
seconds per peer; nothing here measures time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, dsutils, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from servers import free_port
from test_net_retrieve import STUDY_MOVE, dataset_bytes, study_identifier

import pacsframe as pf
from pacsframe import net
from pacsframe.frames import FrameBuilder
from pacsframe.net.driver import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION
from pacsframe.net.operations import StoreRequest, read_part10, retrieve_negotiation
from pacsframe.net.server import StorageServer
from pacsframe.query import UNIQUE_KEY, build_query
from pacsframe.storage import storage_contexts

pytestmark = [pytest.mark.timeout(180), pytest.mark.orthanc, pytest.mark.dcmtk]

PEERS = ("demo", "orthanc", "dcmqrscp")
CALLING_AE = "PFDIFF"
REFERENCE_AE = "PFREF"
FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
GET_MODEL = StudyRootQueryRetrieveInformationModelGet
# What pacsframe proposes for an uncompressed object (pacsframe.storage): the same
# here, so every engine gets the peer's same choice of transfer syntax.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class DiffPeer:
    """A running peer: where it listens, and pacsframe clients registered there."""

    name: str
    host: str
    port: int
    aet: str
    manifest: pd.DataFrame
    #: Our SCP's port for PACS.move, registered at the peer as CALLING_AE.
    scp_port: int
    #: Reference C-GET answers, made once per peer: SOP Instance UID -> (syntax, bytes).
    _reference: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def pacs(self, cache: Path | None = None) -> pf.PACS:
        return pf.PACS(
            self.host,
            self.port,
            self.aet,
            calling_ae=CALLING_AE,
            scp_port=self.scp_port,
            cache=cache,
            dimse_timeout=30,
        )

    def reference_objects(self) -> dict[str, tuple[str, bytes]]:
        if not self._reference:
            self._reference.update(
                reference_get(self, sorted(self.manifest.StudyInstanceUID.unique()))
            )
        return self._reference


@pytest.fixture(scope="module", params=PEERS)
def peer(request, cohort) -> DiffPeer:
    """Each peer with the cohort; CALLING_AE on a port of ours is a C-MOVE destination."""
    _, manifest = cohort
    scp_port = free_port()
    if request.param == "demo":
        server = request.getfixturevalue("demo_server")
        server.add_known_ae(CALLING_AE, "127.0.0.1", scp_port)
        host, port, aet = "127.0.0.1", server.port, server.ae_title
    elif request.param == "orthanc":
        server = request.getfixturevalue("orthanc")
        # Orthanc answers C-MOVE only from a registered calling AE: ours, at our SCP.
        server.add_modality(CALLING_AE, CALLING_AE, "127.0.0.1", scp_port)
        host, port, aet = server.host, server.dicom_port, server.aet
    else:
        server = request.getfixturevalue("dcmqrscp")
        # The HostTable is read at start-up: this restarts dcmqrscp (the port may change).
        server.add_destination(CALLING_AE, "127.0.0.1", scp_port)
        host, port, aet = server.host, server.port, server.aet
    return DiffPeer(request.param, host, port, aet, manifest, scp_port)


# ------------------------------------------------------------------- references


def _associate(peer: DiffPeer, ae: AE, **kwargs: Any) -> Any:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet, **kwargs)
    assert assoc.is_established, f"pynetdicom could not associate with {peer.name}"
    return assoc


def reference_find(peer: DiffPeer, level: str, model: str = "study", **keys: Any) -> pd.DataFrame:
    """The frame pynetdicom's C-FIND gives, each identifier added the slow way."""
    query = build_query(level, model, keys)
    builder = FrameBuilder(query.columns)
    ae = AE(ae_title=REFERENCE_AE)
    ae.add_requested_context(FIND_MODELS[model])
    assoc = _associate(peer, ae)
    try:
        for status, identifier in assoc.send_c_find(query.dataset(), FIND_MODELS[model]):
            assert "Status" in (status or {}), "C-FIND: association ended early"
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None, "an identifier pynetdicom could not decode"
                builder.add(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND failed: 0x{status.Status:04X}"
    finally:
        assoc.release()
    return builder.frame()


def reference_get(peer: DiffPeer, studies: list[str]) -> dict[str, tuple[str, bytes]]:
    """Every object of ``studies`` by pynetdicom C-GET: UID -> (transfer syntax, data set)."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        uid = event.request.AffectedSOPInstanceUID
        # Without pynetdicom's chunked mode the data set stays the bytes received.
        data = event.request.DataSet
        assert isinstance(data, io.BytesIO)
        received[uid] = (str(event.context.transfer_syntax), data.getvalue())
        return 0x0000

    classes = sorted(peer.manifest.SOPClassUID.unique())
    ae = AE(ae_title=REFERENCE_AE)
    ae.add_requested_context(GET_MODEL)
    for uid in classes:
        ae.add_requested_context(uid, UNCOMPRESSED)
    roles = [build_role(uid, scp_role=True) for uid in classes]
    assoc = _associate(peer, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for study in studies:
            query = build_query("study", keys={"StudyInstanceUID": study}, defaults=False)
            statuses = [s.Status for s, _ in assoc.send_c_get(query.dataset(), GET_MODEL) if s]
            assert statuses and statuses[-1] == 0x0000, (study, statuses)
    finally:
        assoc.release()
    return received


class MemoryObjects:
    """``on_store`` for ClientAssociation.get: each object's fragments joined in memory."""

    def __init__(self) -> None:
        self.committed: dict[str, tuple[str, bytes]] = {}

    def __call__(self, request: StoreRequest) -> MemoryWriter:
        return MemoryWriter(self, request)


class MemoryWriter:
    def __init__(self, owner: MemoryObjects, request: StoreRequest) -> None:
        self.owner = owner
        self.request = request
        self.buffer = bytearray()

    def write(self, data: memoryview) -> None:
        self.buffer += data

    def commit(self) -> None:
        request = self.request
        self.owner.committed[request.sop_instance_uid] = (
            request.transfer_syntax,
            bytes(self.buffer),
        )

    def discard(self) -> None:
        raise AssertionError(f"{self.request.sop_instance_uid} was cut short")


def driver_get(peer: DiffPeer, studies: list[str]) -> dict[str, tuple[str, bytes]]:
    """Every object of ``studies`` streamed by pacsframe.net's C-GET to memory."""
    storage = [(cx.abstract_syntax, cx.transfer_syntax) for cx in storage_contexts()]
    contexts, roles = retrieve_negotiation(GET_MODEL, storage)
    objects = MemoryObjects()
    with net.associate(
        peer.host,
        peer.port,
        called_ae=peer.aet,
        calling_ae=CALLING_AE,
        contexts=contexts,
        roles=roles,
        dimse_timeout=30,
    ) as assoc:
        for study in studies:
            identifier = study_identifier(assoc, GET_MODEL, study)
            final = list(assoc.get(identifier, GET_MODEL, objects))[-1]
            assert (final.status, final.failed) == (0x0000, 0), (study, final)
    return objects.committed


def cached_objects(result: Any) -> dict[str, tuple[str, bytes]]:
    """A RetrieveResult's objects from the cache: UID -> (file meta's syntax, data set)."""
    out = {}
    for uid, path in zip(result.instances.SOPInstanceUID, result.instances.path, strict=True):
        out[uid] = (read_part10(path).transfer_syntax, dataset_bytes(path))
    return out


def assert_same_objects(
    got: dict[str, tuple[str, bytes]], reference: dict[str, tuple[str, bytes]], what: str
) -> None:
    assert sorted(got) == sorted(reference), f"{what}: other objects than the reference"
    for uid, (syntax, data) in reference.items():
        assert got[uid][0] == syntax, f"{what}: {uid} in {got[uid][0]}, reference {syntax}"
        assert got[uid][1] == data, f"{what}: {uid} differs from the reference bytes"


def assert_same_frame(ours: pd.DataFrame, reference: pd.DataFrame, key: str, what: str) -> None:
    """Equal column by column, dtypes included, rows in ``key`` order."""
    assert list(ours.columns) == list(reference.columns), what
    assert len(ours) == len(reference), f"{what}: {len(ours)} rows, reference {len(reference)}"
    ours = ours.sort_values(key, kind="stable").reset_index(drop=True)
    reference = reference.sort_values(key, kind="stable").reset_index(drop=True)
    for column in reference.columns:
        pd.testing.assert_series_equal(
            ours[column], reference[column], check_dtype=True, obj=f"{what}: column {column}"
        )


# ------------------------------------------------------------------- C-FIND


def _study(peer: DiffPeer, n: int) -> str:
    return sorted(peer.manifest.StudyInstanceUID.unique())[
        n % peer.manifest.StudyInstanceUID.nunique()
    ]


def _series(peer: DiffPeer, n: int) -> tuple[str, str]:
    rows = peer.manifest.drop_duplicates("SeriesInstanceUID").sort_values("SeriesInstanceUID")
    row = rows.iloc[n % len(rows)]
    return str(row.StudyInstanceUID), str(row.SeriesInstanceUID)


def test_find_patients_frame_equals_pynetdicom(peer: DiffPeer) -> None:
    ours = peer.pacs().find_patients()
    reference = reference_find(peer, "patient", "patient")
    assert len(reference) == peer.manifest.PatientID.nunique()
    assert_same_frame(ours, reference, "PatientID", f"{peer.name} patients")


@pytest.mark.parametrize(
    "keys",
    [{}, {"PatientID": "*3"}, {"StudyDate": ("2026-03-01", None)}],
    ids=["all", "wildcard", "open-range"],
)
def test_find_studies_frame_equals_pynetdicom(peer: DiffPeer, keys: dict[str, Any]) -> None:
    ours = peer.pacs().find_studies(**keys)
    reference = reference_find(peer, "study", **keys)
    every = peer.manifest.StudyInstanceUID.nunique()
    # The matching cases narrow the answer: something, not everything.
    assert len(reference) == every if not keys else 0 < len(reference) < every
    assert_same_frame(ours, reference, "StudyInstanceUID", f"{peer.name} studies {keys}")


def test_find_series_and_instances_frames_equal_pynetdicom(peer: DiffPeer) -> None:
    pacs = peer.pacs()
    for n in range(2):
        study = _study(peer, n)
        ours = pacs.find_series(StudyInstanceUID=study)
        reference = reference_find(peer, "series", StudyInstanceUID=study)
        assert (
            len(reference)
            == peer.manifest[peer.manifest.StudyInstanceUID == study].SeriesInstanceUID.nunique()
        )
        assert_same_frame(ours, reference, "SeriesInstanceUID", f"{peer.name} series of {study}")
        study, series = _series(peer, n)
        keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        ours = pacs.find_instances(**keys)
        reference = reference_find(peer, "image", **keys)
        assert len(reference) == (peer.manifest.SeriesInstanceUID == series).sum()
        assert_same_frame(
            ours, reference, UNIQUE_KEY["IMAGE"], f"{peer.name} instances of {series}"
        )


def driver_find(peer: DiffPeer, level: str, model: str = "study", **keys: Any) -> pd.DataFrame:
    """The frame pacsframe.net's C-FIND gives, identifiers' bytes straight to the builder.

    ``add_raw`` is the fast path a C-FIND over the new engine takes; an identifier it
    leaves to pydicom is decoded and added the slow way, as ``PACS`` does.
    """
    query = build_query(level, model, keys)
    builder = FrameBuilder(query.columns)
    model_uid = FIND_MODELS[model]
    contexts = [(model_uid, UNCOMPRESSED), (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])]
    with net.associate(
        peer.host,
        peer.port,
        called_ae=peer.aet,
        calling_ae=REFERENCE_AE,
        contexts=contexts,
        dimse_timeout=30,
    ) as assoc:
        assert assoc.echo() == 0x0000
        implicit = assoc.contexts[assoc.context_for(model_uid)][1] == IMPLICIT_VR_LITTLE_ENDIAN
        identifier = dsutils.encode(query.dataset(), implicit, True)
        assert identifier is not None
        for data in assoc.find(model_uid, identifier):
            if not builder.add_raw(data, implicit):
                decoded = dsutils.decode(io.BytesIO(data), implicit, True)
                builder.add(decoded)
    return builder.frame()


@pytest.mark.parametrize(
    ("level", "model", "key"),
    [("patient", "patient", "PatientID"), ("study", "study", "StudyInstanceUID")],
)
def test_driver_find_frames_equal_pynetdicom(peer: DiffPeer, level, model, key) -> None:
    """The engine's own C-FIND (no PACS around it) reads the same frame as pynetdicom."""
    ours = driver_find(peer, level, model)
    reference = reference_find(peer, level, model)
    assert len(reference) > 0
    assert_same_frame(ours, reference, key, f"{peer.name} {level} over pacsframe.net")
    study, series = _series(peer, 0)
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    ours = driver_find(peer, "image", **keys)
    reference = reference_find(peer, "image", **keys)
    assert_same_frame(ours, reference, "SOPInstanceUID", f"{peer.name} images over pacsframe.net")


# ------------------------------------------------------------------- C-GET and C-MOVE


def test_get_caches_the_bytes_pynetdicom_and_the_driver_receive(peer: DiffPeer, tmp_path) -> None:
    studies = sorted(peer.manifest.StudyInstanceUID.unique())
    reference = peer.reference_objects()
    assert sorted(reference) == sorted(peer.manifest.SOPInstanceUID)

    streamed = driver_get(peer, studies)
    assert_same_objects(streamed, reference, f"{peer.name}: pacsframe.net C-GET")

    pacs = peer.pacs(tmp_path / "cache")
    frame = pacs.find_studies()
    result = pacs.get(frame, progress=False)
    assert (result.completed, result.failed) == (len(reference), 0), result
    assert_same_objects(cached_objects(result), reference, f"{peer.name}: PACS.get")


def test_move_to_our_scp_caches_the_reference_bytes(peer: DiffPeer, tmp_path) -> None:
    reference = peer.reference_objects()
    pacs = peer.pacs(tmp_path / "cache")
    frame = pacs.find_studies()
    result = pacs.move(frame, progress=False)
    assert (result.completed, result.failed) == (len(reference), 0), result
    assert_same_objects(cached_objects(result), reference, f"{peer.name}: PACS.move")


def test_series_get_and_instance_move_cache_the_reference_bytes(peer: DiffPeer, tmp_path) -> None:
    """Retrieves below STUDY level: a frame of series (get), of instances (move)."""
    reference = peer.reference_objects()
    pacs = peer.pacs(tmp_path / "cache")
    study, series = _series(peer, 1)
    series_frame = pacs.find_series(StudyInstanceUID=study)
    got = pacs.get(series_frame[series_frame.SeriesInstanceUID == series], progress=False)
    expected = {
        uid: reference[uid]
        for uid in peer.manifest[peer.manifest.SeriesInstanceUID == series].SOPInstanceUID
    }
    assert got.failed == 0
    assert_same_objects(cached_objects(got), expected, f"{peer.name}: PACS.get of a series")

    study, series = _series(peer, 0)
    instances = pacs.find_instances(StudyInstanceUID=study, SeriesInstanceUID=series)
    one = instances.sort_values("SOPInstanceUID").iloc[:1]
    moved = pacs.move(one, progress=False)
    uid = one.SOPInstanceUID.iloc[0]
    assert (moved.completed, moved.failed) == (1, 0), moved
    assert_same_objects(
        cached_objects(moved), {uid: reference[uid]}, f"{peer.name}: PACS.move of an instance"
    )


def test_driver_move_to_the_engines_scp_gives_the_reference_bytes(peer: DiffPeer) -> None:
    """pacsframe.net at both ends of a C-MOVE: ClientAssociation.move and StorageServer."""
    reference = peer.reference_objects()
    objects = MemoryObjects()
    storage = [(cx.abstract_syntax, cx.transfer_syntax) for cx in storage_contexts("acceptor")]
    contexts = [(STUDY_MOVE, UNCOMPRESSED)]
    with (
        StorageServer(
            objects, ae_title=CALLING_AE, storage=storage, port=peer.scp_port, acse_timeout=10
        ),
        net.associate(
            peer.host,
            peer.port,
            called_ae=peer.aet,
            calling_ae=CALLING_AE,
            contexts=contexts,
            dimse_timeout=30,
        ) as assoc,
    ):
        for study in sorted(peer.manifest.StudyInstanceUID.unique()):
            identifier = study_identifier(assoc, STUDY_MOVE, study)
            final = list(assoc.move(identifier, STUDY_MOVE, CALLING_AE))[-1]
            assert (final.status, final.failed) == (0x0000, 0), (study, final)
    # Each object was committed before its C-STORE-RSP, so before the final C-MOVE-RSP.
    assert_same_objects(objects.committed, reference, f"{peer.name}: pacsframe.net C-MOVE")


def test_drill_down_frames_equal_pynetdicom_per_parent(peer: DiffPeer) -> None:
    """A drill-down (``find_series(studies)``, ``find_instances(series)``) gives, for its
    own level's columns, the rows pynetdicom reads one parent at a time; the parent's
    columns it carries are the parent frame's values."""
    pacs = peer.pacs()
    studies = pacs.find_studies().sort_values("StudyInstanceUID").iloc[:2]
    checks = [
        ("series", studies, "StudyInstanceUID", "SeriesInstanceUID", pacs.find_series),
    ]
    series = pacs.find_series(studies).sort_values("SeriesInstanceUID").iloc[:2]
    checks.append(("image", series, "SeriesInstanceUID", "SOPInstanceUID", pacs.find_instances))
    for level, parents, parent_key, key, drill in checks:
        ours = drill(parents)
        pieces = []
        for _, parent in parents.iterrows():
            keys = {parent_key: parent[parent_key]}
            if level == "image":
                keys["StudyInstanceUID"] = parent["StudyInstanceUID"]
            pieces.append(reference_find(peer, level, **keys))
        reference = pd.concat(pieces, ignore_index=True)
        assert len(reference) > 0
        own = [c for c in reference.columns if c in ours.columns]
        assert own == list(reference.columns), f"{peer.name} {level}: columns missing"
        assert_same_frame(ours[own], reference, key, f"{peer.name} {level} drill-down")
        carried = [c for c in parents.columns if c in ours.columns and c not in reference.columns]
        assert carried, f"{peer.name} {level}: no parent column carried"
        by_parent = parents.set_index(parent_key)
        for _, row in ours.iterrows():
            parent = by_parent.loc[row[parent_key]]
            for column in carried:
                assert _cell(row[column]) == _cell(parent[column]), (
                    f"{peer.name} {level}: {column} is not the parent's"
                )


def _cell(value: Any) -> Any:
    """A frame cell comparable with ``==``: lists as tuples, every missing value None."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return None if pd.isna(value) else value
