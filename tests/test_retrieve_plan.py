"""Retrievals never shrink: a peer's listings made only to plan are checked, not trusted.

The peer is :class:`faults.FaultyPACS` (the demo PACS on loopback) answering the
SERIES- or IMAGE-level C-FIND that planning sends with nothing, a refusal, rows
shaped like the level above, rows of another parent, or too few rows for the
counts it gave itself. Whatever it answers, every object of the study ends up in
the cache exactly once, ``completed + cached`` is what the peer holds, the result
says which listing was not used and why, and a retrieval that comes up short says
so with failed rows, ``expected``/``shortfall``, a note and a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from faults import Faults, FaultyPACS
from pydicom.dataset import Dataset

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort

SERIES, PER_SERIES = 3, 4
OBJECTS = SERIES * PER_SERIES


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One patient, one study of three series of four instances: 12 objects."""
    folder = tmp_path_factory.mktemp("served")
    manifest = make_cohort(
        folder,
        patients=1,
        seed=73,
        studies_per_patient=1,
        series_per_study=SERIES,
        instances_per_series=PER_SERIES,
        matrix=8,
    )
    return folder, manifest.sort_values(["SeriesInstanceUID", "SOPInstanceUID"])


@pytest.fixture(scope="module")
def faulty(served):
    peer = FaultyPACS(served[0]).start()
    yield peer
    peer.unblock()
    peer.stop()


@pytest.fixture
def server(faulty):
    """The fault peer, behaving until the test says otherwise."""
    faulty.faults = Faults()
    faulty.release.clear()
    yield faulty
    faulty.faults = Faults()
    faulty.unblock()  # a handler still hanging ends now


@pytest.fixture
def pacs(server, tmp_path):
    client = pf.PACS(
        "127.0.0.1",
        server.port,
        server.ae_title,
        calling_ae="PLANTEST",
        cache=tmp_path / "cache",
        dimse_timeout=10,
        acse_timeout=5,
        network_timeout=10,
    )
    server.add_known_ae(client.calling_ae, "127.0.0.1", client.scp_port)
    yield client
    client.cache.close()


def retrieve(pacs: pf.PACS, frame: pd.DataFrame, op: str) -> pf.RetrieveResult:
    if op == "move":
        return pacs.move(frame, progress=False)
    return pacs.get(frame, progress=False, workers=int(op[-1]))


def precache(pacs: pf.PACS, manifest: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Cache part of the study: series 0 but one instance, none of series 1, all of 2.

    Returns (inode, mtime_ns) per cached file, to show they are not rewritten.
    """
    series = manifest.SeriesInstanceUID.unique()
    first = manifest[manifest.SeriesInstanceUID == series[0]].iloc[1:]
    third = manifest[manifest.SeriesInstanceUID == series[2]]
    for path in pd.concat([first, third]).path:
        pacs.cache.add(Path(path).read_bytes())
    held = pacs.cache.instances()
    assert len(held) == OBJECTS - PER_SERIES - 1
    return {sop: _stamp(path) for sop, path in zip(held.SOPInstanceUID, held.path, strict=True)}


def _stamp(path: str) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_ino, stat.st_mtime_ns


def everything_once(pacs: pf.PACS, result: pf.RetrieveResult, manifest: pd.DataFrame) -> None:
    """Every object of the study is cached once and has exactly one row."""
    wanted = set(manifest.SOPInstanceUID)
    rows = result.instances
    assert rows.SOPInstanceUID.notna().all() and rows.SOPInstanceUID.is_unique
    assert set(rows.SOPInstanceUID) == wanted
    assert result.failed == 0 and result.completed + result.cached == len(wanted)
    assert (result.expected, result.shortfall) == (len(wanted), 0)
    cache = pacs.cache
    assert cache.verify().empty
    indexed = cache.instances().SOPInstanceUID
    assert indexed.is_unique and set(indexed) == wanted
    files = [p.stem for p in cache.root.rglob("*.dcm")]
    assert sorted(files) == sorted(wanted)
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".part")]


def untouched(stamps: dict[str, tuple[int, int]], result: pf.RetrieveResult) -> None:
    """What was cached before is reported cached and was not written again."""
    cached = result.instances[result.instances.status == "cached"]
    assert set(cached.SOPInstanceUID) == set(stamps)
    for sop, path in zip(cached.SOPInstanceUID, cached.path, strict=True):
        assert _stamp(path) == stamps[sop], f"{sop} was rewritten"


def said_so(result: pf.RetrieveResult, caught, unit: str, manifest, why: str) -> None:
    """The result and one UnusableListingWarning name the unit and why, and nothing else."""
    listing = [w for w in caught if issubclass(w.category, pf.UnusableListingWarning)]
    assert len(listing) == 1, [str(w.message) for w in caught]
    assert unit in str(listing[0].message)
    mine = [n for n in result.notes if unit in n]
    assert len(mine) == 1 and "requested whole" in mine[0] and why in mine[0]
    json.dumps(result.notes)
    text = " ".join(result.notes) + str(listing[0].message)
    for identifier in (*manifest.PatientID.unique(), *manifest.PatientName.dropna().unique()):
        assert str(identifier) not in text
    assert "notes=" in repr(result) and "requested whole" in result._repr_html_()


def run(pacs, frame, op):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = retrieve(pacs, frame, op)
    assert not [w for w in caught if issubclass(w.category, pf.CountMismatchWarning)]
    return result, caught


# --- what a peer answers to a listing -------------------------------------------------------


def _failure(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment
    return status


def _keyless(matches: list[Dataset]) -> list[Dataset]:
    # Shaped like the level above: the level's own unique key is missing.
    for ds in matches:
        for keyword in ("SOPInstanceUID",) if "SOPInstanceUID" in ds else ("SeriesInstanceUID",):
            delattr(ds, keyword)
        ds.QueryRetrieveLevel = "STUDY" if "SeriesInstanceUID" not in ds else "SERIES"
    return matches


def _other_parent(matches: list[Dataset]) -> list[Dataset]:
    for ds in matches:
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.9.9.9"
    return matches


def _miscounted(matches: list[Dataset]) -> list[Dataset]:
    matches[0].NumberOfSeriesRelatedInstances = 1
    return matches


# Why each listing is not used, as the note says it.
WHY = {
    "empty": "answered no match",
    "refused": "the peer says: queries at this level are off",
    "keyless": "have no ",
    "short": "says 12",
    "other-parent": "name another StudyInstanceUID",
    "miscounted": "says 12",
}
LISTINGS = {
    "empty": lambda matches: [],
    "refused": lambda matches: _failure(0xC000, "queries at this level are off"),
    "keyless": _keyless,
    "short": lambda matches: matches[:-1],
    "other-parent": _other_parent,
}
OPS = ["get1", "get4", "move"]


def cases(faults: list[str], wide: list[str]) -> list[tuple[str, str]]:
    """Every fault with one worker; the ``wide`` ones with four workers and C-MOVE too."""
    return [(f, "get1") for f in faults] + [(f, op) for f in wide for op in OPS[1:]]


# --- the series listing ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", [*LISTINGS, "miscounted"])
def test_cold_study_is_requested_whole_when_its_series_listing_is_unusable(
    server, pacs, served, fault
):
    manifest = served[1]
    studies = pacs.find_studies()
    server.faults = Faults(find_levels={"SERIES": LISTINGS.get(fault, _miscounted)})
    result, caught = run(pacs, studies, "get4")
    assert result.requests == 1  # the study, not a subset of its series
    assert (result.completed, result.cached) == (OBJECTS, 0)
    everything_once(pacs, result, manifest)
    said_so(result, caught, f"STUDY {studies.StudyInstanceUID.iloc[0]}", manifest, WHY[fault])


@pytest.mark.parametrize("op", ["get1", "move"])
def test_cold_study_with_one_worker_needs_no_listing(server, pacs, served, op):
    refused = LISTINGS["refused"]
    server.faults = Faults(find_levels={"SERIES": refused, "IMAGE": refused})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = retrieve(pacs, pacs.find_studies(), op)
    assert result.requests == 1 and result.completed == OBJECTS and not result.notes
    everything_once(pacs, result, served[1])


def test_a_listing_that_times_out_ends_the_call(server, pacs, served):
    # A peer that stops answering is not worked around with a larger request.
    stamps = precache(pacs, served[1])
    studies = pacs.find_studies()
    hasty = pf.PACS(
        "127.0.0.1", server.port, server.ae_title, cache=pacs.cache.root, dimse_timeout=1
    )
    server.faults = Faults(hang_after=0)  # the first match of the series listing
    with pytest.raises(pf.AssociationError) as info:
        hasty.get(studies, progress=False, workers=1)
    assert info.value.reason == "timeout" and "SERIES-level C-FIND" in str(info.value)
    assert server.hung.is_set()
    held = pacs.cache.instances()
    assert dict(zip(held.SOPInstanceUID, map(_stamp, held.path), strict=True)) == stamps
    hasty.cache.close()


def refetched(pacs, result, stamps, manifest, requests: int) -> None:
    """A partly cached study came whole: what was cached stayed as it was."""
    assert result.requests == requests
    assert (result.completed, result.cached) == (OBJECTS - len(stamps), len(stamps))
    everything_once(pacs, result, manifest)
    untouched(stamps, result)


PARTLY = [
    *[("SERIES", *case) for case in cases(list(LISTINGS), ["refused", "keyless", "short"])],
    *[("IMAGE", *case) for case in cases(["empty", "refused", "keyless", "short"], ["empty"])],
]


@pytest.mark.parametrize(("level", "fault", "op"), PARTLY)
def test_partly_cached_unit_is_requested_whole_when_its_listing_is_unusable(
    server, pacs, served, level, fault, op
):
    manifest = served[1]
    studies = pacs.find_studies()
    stamps = precache(pacs, manifest)
    server.faults = Faults(find_levels={level: LISTINGS[fault]})
    result, caught = run(pacs, studies, op)
    if level == "SERIES":  # the study's listing: the study whole
        unit, requests, why = f"STUDY {studies.StudyInstanceUID.iloc[0]}", 1, WHY[fault]
    else:  # the partly cached series whole, the cold one whole, the cached one not at all
        unit, requests = f"SERIES {manifest.SeriesInstanceUID.iloc[0]}", 2
        why = "says 4" if fault == "short" else WHY[fault]
    refetched(pacs, result, stamps, manifest, requests)
    said_so(result, caught, unit, manifest, why)


def test_a_trusted_instance_listing_requests_only_what_is_missing(server, pacs, served):
    manifest = served[1]
    stamps = precache(pacs, manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pacs.get(pacs.find_studies(), progress=False, workers=1)
    assert not result.notes and repr(result).endswith("requests=2)")
    refetched(pacs, result, stamps, manifest, 2)  # one instance, one series


# --- parents without a count ----------------------------------------------------------------


def _no_counts(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c.startswith("NumberOf")])


@pytest.mark.parametrize("op", OPS)
def test_partly_cached_study_without_a_count_is_requested_whole_unlisted(server, pacs, served, op):
    manifest = served[1]
    studies = _no_counts(pacs.find_studies())
    stamps = precache(pacs, manifest)
    asked: list[int] = []

    def counting(matches: list[Dataset]) -> list[Dataset]:
        asked.append(len(matches))
        return matches

    server.faults = Faults(find_levels={"SERIES": counting, "IMAGE": counting})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = retrieve(pacs, studies, op)
    assert asked == [] and not result.notes
    refetched(pacs, result, stamps, manifest, 1)


def test_cold_study_without_a_count_is_split_by_a_keyed_listing(server, pacs, served):
    manifest = served[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pacs.get(_no_counts(pacs.find_studies()), progress=False, workers=4)
    assert result.requests == SERIES and not result.notes
    everything_once(pacs, result, manifest)


def test_cold_study_without_a_count_is_not_split_by_a_keyless_listing(server, pacs, served):
    manifest = served[1]
    studies = _no_counts(pacs.find_studies())
    server.faults = Faults(find_levels={"SERIES": _keyless})
    result, caught = run(pacs, studies, "get4")
    assert result.requests == 1
    everything_once(pacs, result, manifest)
    unit = f"STUDY {studies.StudyInstanceUID.iloc[0]}"
    said_so(result, caught, unit, manifest, WHY["keyless"])


# --- what arrives against what was announced ------------------------------------------------


@pytest.mark.parametrize("op", ["get1", "move"])
@pytest.mark.parametrize(("counts", "sent"), [("frame", 0), ("frame", 5), ("pending", 5)])
def test_a_retrieval_that_comes_up_short_says_so(server, pacs, op, counts, sent):
    studies = pacs.find_studies()
    if counts == "pending":
        studies = _no_counts(studies)  # only the C-GET/C-MOVE counts announce 12
    server.faults = Faults(status_after=(sent, 0x0000))  # "success" after `sent` objects
    with pytest.warns(pf.CountMismatchWarning, match=f"{sent} arrived") as caught:
        result = retrieve(pacs, studies, op)
    assert (result.completed, result.failed) == (sent, OBJECTS - sent)
    assert (result.expected, result.shortfall) == (OBJECTS, OBJECTS - sent)
    failed = result.failed_instances
    assert failed.error.str.contains(f"announced {OBJECTS} object").all()
    assert len(result.notes) == 1 and f"announced {OBJECTS} object(s)" in result.notes[0]
    assert f"shortfall={OBJECTS - sent}" in repr(result)
    assert f"{OBJECTS - sent} of them are not in the cache" in str(caught[0].message)
    held = set(pacs.cache.instances().SOPInstanceUID)
    assert held == set(result.instances.SOPInstanceUID.dropna())
    assert len(held) == sent


@pytest.mark.parametrize("op", ["get1", "move"])
def test_a_whole_unit_that_comes_up_short_counts_each_object_once(server, pacs, served, op):
    manifest = served[1]
    studies = pacs.find_studies()
    stamps = precache(pacs, manifest)
    refused = LISTINGS["refused"]
    # The study is requested whole, and the peer stops after half of it.
    server.faults = Faults(find_levels={"SERIES": refused}, status_after=(OBJECTS // 2, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = retrieve(pacs, studies, op)
    kinds = {w.category for w in caught}
    assert {pf.UnusableListingWarning, pf.CountMismatchWarning} <= kinds
    assert result.cached == len(stamps)
    assert result.completed + result.cached + result.failed == OBJECTS
    assert result.failed == result.shortfall == OBJECTS - len(pacs.cache.instances())
    assert result.failed_instances.error.str.contains("not received").all()
    untouched(stamps, result)
    named = result.instances.SOPInstanceUID.dropna()
    assert named.is_unique and set(named) <= set(manifest.SOPInstanceUID)


@pytest.mark.parametrize("op", ["get1", "move"])
def test_nothing_sent_and_no_count_at_all_is_still_a_failure(server, pacs, op):
    # No count in the frame and no pending response: the peer still lists the study,
    # so it holds at least one object of it.
    studies = _no_counts(pacs.find_studies())
    server.faults = Faults(status_after=(0, 0x0000))
    with pytest.warns(pf.CountMismatchWarning, match="sent nothing.*gave no count"):
        result = retrieve(pacs, studies, op)
    assert (result.completed, result.failed) == (0, 1)
    assert (result.expected, result.shortfall) == (None, None)
    assert "sent nothing" in result.failed_instances.error.iloc[0]
    assert len(result.notes) == 1 and "notes=1" in repr(result)
    assert pacs.cache.instances().empty


@pytest.mark.parametrize("counts", ["frame", "none"])
def test_a_move_to_another_ae_that_comes_up_short_says_so(server, pacs, served, tmp_path, counts):
    studies = pacs.find_studies()
    if counts == "none":
        studies = _no_counts(studies)
    with DemoPACS(tmp_path / "archive", ae_title="ARCHIVE") as archive:
        server.add_known_ae("ARCHIVE", "127.0.0.1", archive.port)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sent = pacs.move(studies, "ARCHIVE", progress=False)  # healthy: all of it
        assert (sent.completed, sent.failed, sent.notes) == (OBJECTS, 0, [])
        server.faults = Faults(status_after=(0, 0x0000))  # "success", having sent nothing
        with pytest.warns(pf.CountMismatchWarning, match="reports delivered to 'ARCHIVE'"):
            short = pacs.move(studies, "ARCHIVE", progress=False)
    missing = OBJECTS if counts == "frame" else 1  # without a count: at least one
    assert (short.completed, short.failed, len(short.notes)) == (0, missing, 1)
    assert short.shortfall == (OBJECTS if counts == "frame" else None)
    assert pacs.cache.instances().empty


@pytest.mark.parametrize("op", ["get1", "move"])
def test_instances_not_sent_are_named(server, pacs, served, op):
    manifest = served[1]
    instances = pacs.find_instances(pacs.find_series(pacs.find_studies()).iloc[:1])
    server.faults = Faults(status_after=(1, 0x0000))
    with pytest.warns(pf.CountMismatchWarning, match="1 arrived"):
        result = retrieve(pacs, instances, op)
    assert (result.completed, result.failed) == (1, PER_SERIES - 1)
    failed = result.failed_instances
    arrived = result.instances.SOPInstanceUID[result.instances.status == "completed"]
    assert set(failed.SOPInstanceUID) | set(arrived) == set(instances.SOPInstanceUID)
    assert failed.error.str.contains("without sending it").all()
    assert len(manifest) == OBJECTS


@pytest.mark.parametrize("op", ["get1", "move"])
def test_more_than_announced_is_noted_and_kept(server, pacs, served, op):
    manifest = served[1]
    studies = pacs.find_studies()
    studies["NumberOfStudyRelatedInstances"] = OBJECTS - 2
    with pytest.warns(pf.CountMismatchWarning, match=f"announced {OBJECTS - 2}.*{OBJECTS} arr"):
        result = retrieve(pacs, studies, op)
    assert (result.completed, result.failed, result.shortfall) == (OBJECTS, 0, 0)
    assert result.expected == OBJECTS - 2 and len(result.notes) == 1
    assert set(pacs.cache.instances().SOPInstanceUID) == set(manifest.SOPInstanceUID)


# --- Orthanc: an instance listing capped by LimitFindInstances ----------------------------------


@pytest.fixture(scope="module")
def capped_orthanc(served, tmp_path_factory):
    """Orthanc holding the study, answering IMAGE-level C-FIND with 2 matches at most."""
    from servers import OrthancServer, require_tool

    require_tool("Orthanc")
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc"), extra_config={"LimitFindInstances": 2}
    )
    server.start()
    try:
        stored = pf.PACS(server.host, server.dicom_port, server.aet).store(served[1])
        assert stored.failed == 0, stored.failed_instances
        yield server
    finally:
        server.stop()


@pytest.mark.orthanc
@pytest.mark.parametrize("op", OPS)
def test_orthanc_capped_instance_listing_requests_the_series_whole(
    capped_orthanc, served, tmp_path, op
):
    manifest = served[1]
    server = capped_orthanc
    pacs = pf.PACS(
        server.host,
        server.dicom_port,
        server.aet,
        calling_ae=f"PLAN{op.upper()}",
        cache=tmp_path / "cache",
        dimse_timeout=30,
    )
    server.add_modality(pacs.calling_ae, pacs.calling_ae, "127.0.0.1", pacs.scp_port)
    studies = pacs.find_studies()
    assert studies.NumberOfStudyRelatedInstances.tolist() == [OBJECTS]
    stamps = precache(pacs, manifest)
    result, caught = run(pacs, studies, op)
    # The capped listing of the partly cached series is not used: it is requested
    # whole, next to the cold series; the fully cached one is not requested.
    refetched(pacs, result, stamps, manifest, 2)
    if result.notes or caught:
        # Orthanc ends the capped answer with 0xFE00, or a result cap is reported.
        unit = f"SERIES {manifest.SeriesInstanceUID.iloc[0]}"
        said_so(result, caught, unit, manifest, "its IMAGE-level C-FIND")
    # Otherwise query splitting got the whole listing past the cap: as good as uncapped.
    pacs.cache.close()
