"""pacsframe against a peer that misbehaves: every fault ends well within the timeouts.

The peer is :class:`faults.FaultyPACS`, a real DICOM server on loopback. After each
fault the test checks what the standards promise: a typed error that says what to
do (or a RetrieveResult whose counts are true), everything that arrived cached and
indexed, no partial file, nothing written outside the cache root, no thread or
socket left behind, and a re-run against a healthy server that fetches only what is
missing.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from faults import Faults, FaultyPACS, raw, sockets, status, uint32
from pydicom.dataset import Dataset

import pacsframe as pf
from pacsframe import frames
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.frames import MalformedValueWarning

# The hostile objects below make pydicom (on both sides) warn about their UIDs.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

# dimse_timeout of every client here: a healthy peer on a busy 2-core machine has
# answered more than a second late, so only a fault may come near it.
DIMSE = 5.0
# Seconds any faulty call may take, at most: loose enough for a busy machine, well
# below HANG_SECONDS (a hung peer is never waited out) and the slow answer below.
BOUND = DIMSE + 14.0
SETTLE = 30.0  # seconds to wait for threads and sockets to go (only a failure waits it out)
# A slow but live peer: each message comes GAP s after the last, a tenth of the
# dimse_timeout, and the 12 of them take longer than DIMSE in all.
GAP = DIMSE / 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two patients, one study each, two series of three instances: 12 objects."""
    folder = tmp_path_factory.mktemp("served")
    manifest = make_cohort(
        folder,
        patients=2,
        seed=61,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=3,
        matrix=8,
    )
    return folder, manifest


@pytest.fixture
def faulty(served):
    with FaultyPACS(served[0]) as server:
        yield server


def client(server: DemoPACS, root: Path) -> pf.PACS:
    pacs = pf.PACS(
        "127.0.0.1",
        server.port,
        server.ae_title,
        calling_ae="FAULTTEST",
        cache=root,
        dimse_timeout=DIMSE,
        acse_timeout=5,
        network_timeout=DIMSE + 1,
    )
    server.add_known_ae(pacs.calling_ae, "127.0.0.1", pacs.scp_port)
    return pacs


class Watch:
    """What the process holds with the fault peer running, to compare after a fault."""

    def __init__(self, server: FaultyPACS, tmp_path: Path, root: Path) -> None:
        self.server = server
        self.tmp = tmp_path
        self.root = root
        self.threads = set(threading.enumerate())
        self.sockets = sockets()
        self.files = self._outside()

    def _outside(self) -> set[Path]:
        return {p for p in self.tmp.rglob("*") if not p.is_relative_to(self.root)}

    def cache_is_consistent(self) -> set[str]:
        """Check the cache after a fault; return the SOPInstanceUIDs it holds."""
        assert self._outside() == self.files, "something was written outside the cache root"
        assert not [p for p in self.tmp.rglob("*") if p.name.endswith(".part")]
        resolved = self.root.resolve()
        assert all(p.resolve().is_relative_to(resolved) for p in self.root.rglob("*"))
        cache = pf.Cache(self.root)
        try:
            assert cache.verify().empty  # no missing, truncated or stray files
            indexed = set(cache.instances().SOPInstanceUID)
        finally:
            cache.close()
        assert {p.stem for p in self.root.rglob("*.dcm")} == indexed
        return indexed

    def released(self, pacs: pf.PACS, *, moved: bool = False) -> None:
        """Our associations, worker threads and storage SCP are gone; then the peer's."""
        if moved:
            with pytest.raises(ConnectionRefusedError), socket.socket() as probe:
                probe.settimeout(2)
                probe.connect(("127.0.0.1", pacs.scp_port))  # our storage SCP stopped
        # A C-MOVE peer's sub-association to us is a requestor too, on its side.
        ours = ("pacsframe-",) if moved else ("pacsframe-", "RequestorThread")
        self._settle(lambda t: t.name.startswith(ours), check_sockets=False)
        self.server.unblock()  # hung handlers end now; their threads and sockets go
        self._settle(lambda t: True, check_sockets=True)

    def _settle(self, counts, *, check_sockets: bool) -> None:
        deadline = time.monotonic() + SETTLE
        while True:
            extra = [
                t.name
                for t in threading.enumerate()
                if t not in self.threads and t.is_alive() and counts(t)
            ]
            more = sockets() - self.sockets if check_sockets else 0
            if not extra and more <= 0:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind: threads {extra}, {more} socket(s)")
            time.sleep(0.05)


@pytest.fixture
def env(faulty, served, tmp_path):
    """(server, manifest, pacs, watch, root) with the studies found before any fault."""
    root = tmp_path / "a" / "b" / "cache"  # deep, so ../../x escapes would land in tmp_path
    root.parent.mkdir(parents=True)
    pacs = client(faulty, root)
    studies = pacs.find_studies()
    watch = Watch(faulty, tmp_path, root)
    return faulty, served[1], pacs, watch, studies


def retrieve(pacs: pf.PACS, frame: pd.DataFrame, op: str, **kwargs) -> pf.RetrieveResult:
    if op == "get":
        return pacs.get(frame, progress=False, **kwargs)
    return pacs.move(frame, progress=False)


def resumes(served, root: Path, frame: pd.DataFrame, op: str, held: set[str]) -> None:
    """A re-run against a healthy server over the same folder fetches only what is missing."""
    folder, manifest = served
    with DemoPACS(folder) as healthy:
        result = retrieve(client(healthy, root), frame, op)
    wanted = manifest[manifest.StudyInstanceUID.isin(frame.StudyInstanceUID)]
    assert result.failed == 0
    assert result.cached == len(held)
    assert result.completed == len(wanted) - len(held)
    cache = pf.Cache(root)
    assert set(cache.instances().SOPInstanceUID) == set(wanted.SOPInstanceUID)
    cache.close()


def timed(call):
    started = time.monotonic()
    try:
        call()
    except pf.PacsFrameError as exc:
        elapsed = time.monotonic() - started
        assert elapsed < BOUND, f"the call took {elapsed:.1f} s"
        return exc
    pytest.fail("the fault raised no pacsframe error")


# --- C-FIND ---------------------------------------------------------------------------------


def test_find_that_hangs_mid_answer_times_out(env):
    server, _, pacs, watch, studies = env
    server.faults = Faults(hang_after=1)
    exc = timed(lambda: pacs.find_series(studies))
    assert isinstance(exc, pf.AssociationError) and exc.reason == "timeout"
    assert server.hung.wait(SETTLE)
    message = str(exc)
    assert "no SERIES-level C-FIND response" in message and "raise dimse_timeout" in message
    watch.released(pacs)


def test_find_aborted_mid_answer(env):
    server, _, pacs, watch, studies = env
    server.faults = Faults(abort_after=1)
    exc = timed(lambda: pacs.find_series(studies))
    assert isinstance(exc, pf.AssociationError) and exc.reason == "aborted"
    assert "aborted the association during SERIES-level C-FIND" in str(exc)
    watch.released(pacs)


def test_slow_find_answer_is_waited_for_match_by_match(env):
    server, manifest, pacs, watch, studies = env
    series = pacs.find_series(studies)
    server.faults = Faults(delay=GAP)  # 12 instances: 12 GAPs in all, each within DIMSE
    started = time.monotonic()
    instances = pacs.find_instances(series)
    assert time.monotonic() - started > DIMSE
    assert sorted(instances.SOPInstanceUID) == sorted(manifest.SOPInstanceUID)
    watch.released(pacs)


def test_find_answer_slower_than_dimse_timeout_fails_in_time(env):
    server, _, pacs, watch, studies = env
    server.faults = Faults(delay=BOUND + DIMSE)  # cut short when the test ends
    exc = timed(lambda: pacs.find_series(studies))
    assert isinstance(exc, pf.AssociationError) and exc.reason == "timeout"
    watch.released(pacs)


@pytest.mark.parametrize(
    ("code", "comment", "advice"),
    [
        (0xA700, None, "narrow the query"),
        (0xA900, "bad level", "model="),
        (0xC000, "index offline", "the peer's log"),
    ],
)
def test_find_failure_status_mid_answer_is_a_dimse_error(env, code, comment, advice):
    server, _, pacs, watch, studies = env
    server.faults = Faults(status_after=(1, status(code, comment)))
    exc = timed(lambda: pacs.find_series(studies))
    assert type(exc) is pf.DimseError
    assert exc.status == code and exc.comment == comment
    message = str(exc)
    assert f"0x{code:04X}" in message and advice in message
    if comment:
        assert f"The peer says: {comment}" in message
    watch.released(pacs)


def _charset(ds: Dataset, term: bytes) -> Dataset:
    return raw(ds, "SpecificCharacterSet", "CS", term)


def _without(keyword: str):
    def change(ds: Dataset) -> Dataset:
        del ds[frames.attribute(keyword).tag]
        return ds

    return change


# Each rewrites the first match of find_studies; the warning must name the attribute.
MALFORMED = {
    "wrong VR": (lambda ds: raw(ds, "StudyDate", "UL", uint32(7)), "StudyDate"),
    "binary value of a wrong length": (
        lambda ds: raw(ds, "NumberOfStudyRelatedInstances", "US", b"\x01\x02\x03"),
        "NumberOfStudyRelatedInstances",
    ),
    "bytes not valid in the character set": (
        lambda ds: raw(_charset(ds, b"ISO_IR 192"), "PatientName", "PN", b"Ab\xff\xfeCd"),
        "PatientName",
    ),
    "unknown character set": (
        lambda ds: raw(_charset(ds, b"ISO_IR 999"), "PatientName", "PN", "Łukasz^Zoë".encode()),
        "PatientName",
    ),
    "over-long UID": (
        lambda ds: raw(ds, "StudyInstanceUID", "UI", b"1." * 40 + b"12"),
        "StudyInstanceUID",
    ),
    "UID with letters": (
        lambda ds: raw(ds, "StudyInstanceUID", "UI", b"1.2.abc.4\x00"),
        "StudyInstanceUID",
    ),
    "missing UID": (_without("StudyInstanceUID"), "StudyInstanceUID"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_identifier_is_reported_and_the_rest_kept(env, kind):
    server, _, pacs, watch, before = env
    change, keyword = MALFORMED[kind]
    server.faults = Faults(identifier=lambda n, ds: change(ds) if n == 0 else ds)
    with pytest.warns(MalformedValueWarning, match=keyword):
        studies = pacs.find_studies()
    assert len(studies) == 2
    # The healthy row is intact, and so is the malformed row's PatientID.
    assert studies.iloc[1].to_dict() == before.iloc[1].to_dict()
    assert studies.PatientID.tolist() == before.PatientID.tolist()
    watch.released(pacs)


def test_over_long_text_values_are_kept_whole(env):
    server, _, pacs, watch, _ = env
    long_id = b"P" * 4000
    server.faults = Faults(identifier=lambda n, ds: raw(ds, "PatientID", "LO", long_id))
    studies = pacs.find_studies()
    assert studies.PatientID.str.len().tolist() == [4000, 4000]
    watch.released(pacs)


def test_wrong_vr_with_a_readable_value_is_read(env):
    # A 4-byte UL (pydicom's native "L" is 8 bytes: the value must not vanish).
    server, _, pacs, watch, _ = env
    server.faults = Faults(
        identifier=lambda n, ds: raw(ds, "NumberOfStudyRelatedInstances", "UL", uint32(6))
    )
    studies = pacs.find_studies()
    assert studies.NumberOfStudyRelatedInstances.tolist() == [6, 6]
    watch.released(pacs)


def test_duplicate_uids_in_an_answer_are_reported(env):
    server, _, pacs, watch, studies = env
    first = studies.StudyInstanceUID.iloc[0].encode()
    server.faults = Faults(identifier=lambda n, ds: raw(ds, "StudyInstanceUID", "UI", first))
    with pytest.warns(MalformedValueWarning, match="StudyInstanceUID value.*more than one row"):
        again = pacs.find_studies()
    assert len(again) == 2 and set(again.StudyInstanceUID) == {first.decode()}
    watch.released(pacs)


def test_undecodable_identifier_is_reported_and_the_rest_kept(env):
    server, _, pacs, watch, studies = env
    sent = []

    def garble(command: Dataset, data):
        if data is not None and command.Status == 0xFF00 and not sent:
            sent.append(1)
            # The first element claims more bytes than the identifier holds.
            return data.getvalue()[:4] + b"CS\xff\x7f" + data.getvalue()[8:]
        return None

    server.faults = Faults(response=garble)
    with pytest.warns(MalformedValueWarning, match="1 match.*could not be decoded"):
        again = pacs.find_studies()
    assert len(again) == 1 and again.StudyInstanceUID.iloc[0] in set(studies.StudyInstanceUID)
    watch.released(pacs)


def test_rows_without_uids_are_skipped_with_a_warning_and_the_rest_fetched(env, served):
    server, manifest, pacs, watch, studies = env
    server.faults = Faults(identifier=lambda n, ds: _without("StudyInstanceUID")(ds))
    with pytest.warns(MalformedValueWarning, match="StudyInstanceUID"):
        broken = pacs.find_studies()
    frame = pd.concat([broken.iloc[:1], studies.iloc[1:]], ignore_index=True)
    server.faults = Faults()
    with pytest.warns(MalformedValueWarning, match="1 row.*no StudyInstanceUID.*nothing was"):
        result = pacs.get(frame, progress=False)
    wanted = manifest[manifest.StudyInstanceUID == studies.StudyInstanceUID.iloc[1]]
    assert result.completed == len(wanted) and result.failed == 0
    assert watch.cache_is_consistent() == set(wanted.SOPInstanceUID)
    watch.released(pacs)


# --- C-GET and C-MOVE ------------------------------------------------------------------------


OPS = ["get", "move"]


def _after_fault(watch, pacs, exc, op, *, arrived: int | None = None) -> set[str]:
    """Common checks after a retrieval that raised: returns what the cache holds."""
    held = watch.cache_is_consistent()
    result = exc.result
    done = set(result.instances.SOPInstanceUID[result.instances.status == "completed"])
    assert done == held
    if arrived is not None:
        assert len(held) == arrived
    if held:
        assert "fetches only what is missing" in str(exc)
    watch.released(pacs, moved=op == "move")
    return held


@pytest.mark.parametrize(("op", "workers"), [("get", 1), ("get", 2), ("move", 1)])
def test_abort_after_n_sub_operations(env, served, op, workers):
    server, _, pacs, watch, studies = env
    series = pacs.find_series(studies)
    server.faults = Faults(abort_after=2)
    exc = timed(lambda: retrieve(pacs, series, op, workers=workers))
    assert isinstance(exc, pf.AssociationError) and exc.reason == "aborted"
    assert f"during SERIES-level C-{op.upper()}" in str(exc)
    held = _after_fault(watch, pacs, exc, op, arrived=2 if workers == 1 else None)
    assert len(held) >= 2
    resumes(served, watch.root, studies, op, held)


@pytest.mark.parametrize("op", OPS)
def test_hang_mid_retrieval_times_out(env, served, op):
    server, _, pacs, watch, studies = env
    server.faults = Faults(hang_after=2)
    exc = timed(lambda: retrieve(pacs, studies, op, workers=1))
    assert isinstance(exc, pf.AssociationError) and exc.reason == "timeout"
    assert server.hung.wait(SETTLE)
    assert f"no STUDY-level C-{op.upper()} response" in str(exc)
    held = _after_fault(watch, pacs, exc, op, arrived=2)
    resumes(served, watch.root, studies, op, held)


@pytest.mark.parametrize("op", OPS)
def test_slow_retrieval_is_waited_for_object_by_object(env, op):
    server, manifest, pacs, watch, studies = env
    server.faults = Faults(delay=GAP)  # 12 objects: 12 GAPs in all, each within DIMSE
    started = time.monotonic()
    result = retrieve(pacs, studies, op, workers=1)
    assert time.monotonic() - started > DIMSE
    assert (result.completed, result.failed) == (len(manifest), 0)
    assert watch.cache_is_consistent() == set(manifest.SOPInstanceUID)
    watch.released(pacs, moved=op == "move")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    ("code", "comment", "advice"),
    [
        (0xA700, None, "fewer parallel associations"),
        (0xA900, "identifier does not match", "model="),
        (0xC000, "disk on fire", "its log says why"),
    ],
)
def test_failure_status_after_n_is_a_dimse_error_with_true_counts(
    env, served, op, code, comment, advice
):
    server, _, pacs, watch, studies = env
    one = studies.iloc[:1]  # 6 objects in one request
    server.faults = Faults(status_after=(2, status(code, comment)))
    exc = timed(lambda: retrieve(pacs, one, op, workers=1))
    assert type(exc) is pf.DimseError and exc.status == code and exc.comment == comment
    message = str(exc)
    assert f"0x{code:04X}" in message and advice in message
    held = _after_fault(watch, pacs, exc, op, arrived=2)
    # The 4 never sent failed (pynetdicom counts them, or sends no counts at all
    # for a status it does not know, as 0xA700 for C-GET).
    assert (exc.result.completed, exc.result.failed) == (2, 4)
    assert exc.result.failed_instances.error.str.contains("not received").all()
    resumes(served, watch.root, one, op, held)


@pytest.mark.parametrize("op", OPS)
def test_unknown_move_destination_mid_move(env, op):
    server, _, pacs, watch, studies = env
    server.faults = Faults(status_after=(0, status(0xA801, "who is FAULTTEST?")))
    if op == "get":
        # The same status to a C-GET is just a failure.
        exc = timed(lambda: retrieve(pacs, studies.iloc[:1], op, workers=1))
        assert type(exc) is pf.DimseError and exc.status == 0xA801
    else:
        exc = timed(lambda: retrieve(pacs, studies.iloc[:1], op))
        assert isinstance(exc, pf.MoveDestinationUnknown) and exc.status == 0xA801
        assert "register the AE" in str(exc) and "who is FAULTTEST?" in str(exc)
    _after_fault(watch, pacs, exc, op, arrived=0)


@pytest.mark.parametrize("op", OPS)
def test_warning_status_counts_the_peers_failures(env, served, op):
    server, _, pacs, watch, studies = env
    one = studies.iloc[:1]
    lost = {}

    def unsendable(n: int, ds: Dataset) -> Dataset:
        if n != 1:
            return ds
        # No file meta: pynetdicom cannot send it and lists it as failed.
        stand_in = Dataset()
        stand_in.SOPClassUID = ds.SOPClassUID
        stand_in.SOPInstanceUID = lost["uid"] = ds.SOPInstanceUID
        return stand_in

    server.faults = Faults(objects=unsendable, status_after=(4, 0xB000))
    result = retrieve(pacs, one, op, workers=1)
    # 3 arrived; 1 the peer named as failed; 2 never attempted, counted without names.
    assert (result.completed, result.failed) == (3, 3)
    failed = result.failed_instances
    named = failed[failed.SOPInstanceUID.notna()]
    assert named.SOPInstanceUID.tolist() == [lost["uid"]]
    assert "could not send it" in named.error.iloc[0]
    assert failed.SOPInstanceUID.isna().sum() == 2
    held = watch.cache_is_consistent()
    assert len(held) == 3
    watch.released(pacs, moved=op == "move")
    resumes(served, watch.root, one, op, held)


@pytest.mark.parametrize("op", OPS)
def test_hostile_objects_are_refused_and_nothing_escapes(env, served, op):
    server, _, pacs, watch, studies = env
    one = studies.iloc[:1]

    def hostile(n: int, ds: Dataset) -> Dataset:
        if n == 0:
            ds.SOPInstanceUID = "../../../../escape"
        elif n == 1:
            ds.SeriesInstanceUID = "1.2.abc"
        elif n == 2:
            ds.StudyInstanceUID = "1." * 40 + "1"
        elif n == 3:
            del ds.SOPInstanceUID  # the peer cannot even send it
        return ds

    server.faults = Faults(objects=hostile)
    result = retrieve(pacs, one, op, workers=1)
    assert (result.completed, result.failed) == (2, 4)
    failed = result.failed_instances
    refused = failed[failed.error.str.contains("refused to write into the cache")]
    assert len(refused) == 3
    assert refused.error.str.contains("not a valid UID").all()
    assert failed.SOPInstanceUID.isna().sum() == 1  # counted by the peer, unnamed
    assert not [p for p in watch.tmp.rglob("*escape*")]
    held = watch.cache_is_consistent()
    assert len(held) == 2
    watch.released(pacs, moved=op == "move")
    resumes(served, watch.root, one, op, held)


@pytest.mark.parametrize("op", OPS)
def test_only_hostile_objects_is_not_out_of_resources(env, op):
    # Every object refused by us: pynetdicom's peer answers 0xA702 "out of
    # resources", but the rows already say what went wrong.
    server, _, pacs, watch, studies = env
    one = studies.iloc[:1]

    def letters(n: int, ds: Dataset) -> Dataset:
        ds.SeriesInstanceUID = "1.2.abc"
        return ds

    server.faults = Faults(objects=letters)
    result = retrieve(pacs, one, op, workers=1)
    assert (result.completed, result.failed) == (0, 6)
    assert result.failed_instances.error.str.contains("'1.2.abc' is not a valid UID").all()
    assert watch.cache_is_consistent() == set()
    watch.released(pacs, moved=op == "move")


@pytest.mark.parametrize("op", OPS)
def test_inconsistent_sub_operation_counts_do_not_change_the_truth(env, op):
    server, manifest, pacs, watch, studies = env
    one = studies.iloc[:1]

    def lie(command: Dataset, data) -> None:
        if command.Status == 0xFF00:
            command.NumberOfRemainingSuboperations = 5  # never reaches zero
        elif command.Status == 0x0000:
            command.NumberOfCompletedSuboperations = 99  # more than were sent
            command.NumberOfFailedSuboperations = 50  # none failed

    server.faults = Faults(response=lie)
    result = retrieve(pacs, one, op, workers=1)
    wanted = manifest[manifest.StudyInstanceUID == one.StudyInstanceUID.iloc[0]]
    assert (result.completed, result.failed) == (len(wanted), 0)
    assert watch.cache_is_consistent() == set(wanted.SOPInstanceUID)
    watch.released(pacs, moved=op == "move")


@pytest.mark.parametrize("op", OPS)
def test_an_object_sent_twice_counts_once(env, served, op):
    server, _, pacs, watch, studies = env
    one = studies.iloc[:1]
    first = {}

    def twice(n: int, ds: Dataset) -> Dataset:
        if n == 0:
            first["ds"] = ds
            return ds
        return first["ds"] if n == 1 else ds  # the second object never comes

    server.faults = Faults(objects=twice)
    with pytest.warns(pf.CountMismatchWarning, match="announced 6 object.*5 arrived"):
        result = retrieve(pacs, one, op, workers=1)
    # The study's count says 6: the one that never came is a failed row, not silence.
    assert (result.completed, result.failed) == (5, 1)
    assert (result.expected, result.shortfall) == (6, 1)
    assert result.failed_instances.error.str.contains("not received").all()
    assert result.instances.SOPInstanceUID.dropna().is_unique
    held = watch.cache_is_consistent()
    assert len(held) == 5
    watch.released(pacs, moved=op == "move")
    resumes(served, watch.root, one, op, held)


@pytest.mark.parametrize("processes", ["1", "0"], ids=["processes", "threads"])
def test_an_object_sent_in_two_requests_counts_once(env, served, monkeypatch, processes):
    """The same object in two parallel requests (two workers): filed once, counted once,
    whether the workers are processes or threads; the result is short of the one the
    duplicate displaced."""
    monkeypatch.setenv("PACSFRAME_WORKER_PROCESSES", processes)
    server, manifest, pacs, watch, studies = env
    one = studies.iloc[:1]
    study = manifest[manifest.StudyInstanceUID == one.StudyInstanceUID.iloc[0]]
    series = sorted(study.SeriesInstanceUID.unique())
    assert len(series) == 2
    first = study[study.SeriesInstanceUID == series[0]].sort_values("SOPInstanceUID")
    stand_in = pydicom.dcmread(first.path.iloc[0])
    displaced: list[str] = []

    def duplicate(n: int, ds: Dataset) -> Dataset:
        # The second series' first object sent comes as the first series' object.
        if ds.SeriesInstanceUID == series[1] and not displaced:
            displaced.append(ds.SOPInstanceUID)
            return stand_in
        return ds

    server.faults = Faults(objects=duplicate)
    result = pacs.get(one, workers=2, progress=False)
    assert result.instances.SOPInstanceUID.dropna().is_unique
    assert (result.completed, result.failed) == (5, 0)
    assert (result.expected, result.shortfall) == (6, 1)
    held = watch.cache_is_consistent()
    assert len(held) == 5 and displaced[0] not in held
    watch.released(pacs)
