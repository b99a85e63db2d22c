"""Many retrievals at once: threads sharing one PACS and cache, or with their own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pynetdicom import evt

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    manifest = make_cohort(
        folder,
        patients=5,
        seed=81,
        studies_per_patient=2,
        series_per_study=2,
        instances_per_series=3,
        matrix=8,
    )
    with DemoPACS(folder) as server:
        yield server, manifest


def test_twenty_concurrent_gets_into_one_cache(served, tmp_path):
    server, manifest = served
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=tmp_path / "cache")
    series = pacs.find_series(pacs.find_studies())
    before = threading.active_count()
    # Twenty overlapping requests: each thread asks for a window of series, so most
    # objects are requested by several threads at once.
    windows = [series.iloc[i % len(series) : i % len(series) + 4] for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda w: pacs.get(w, workers=2, progress=False), windows))
    assert all(r.failed == 0 for r in results)
    for window, result in zip(windows, results, strict=True):
        wanted = manifest[manifest.SeriesInstanceUID.isin(window.SeriesInstanceUID)]
        got = result.instances[result.instances.status.isin(["completed", "cached"])]
        assert sorted(set(got.SOPInstanceUID)) == sorted(wanted.SOPInstanceUID)
    held = pacs.cache.instances()
    assert held.SOPInstanceUID.is_unique
    assert pacs.cache.verify().empty
    # No association threads left behind (given a moment to finish closing).
    deadline = time.monotonic() + 30
    while threading.active_count() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before + 1


def test_threads_with_their_own_clients(served, tmp_path):
    server, manifest = served

    def one(i: int) -> int:
        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=tmp_path / f"c{i}")
        studies = pacs.find_studies(PatientID=manifest.PatientID.unique()[i % 5])
        return pacs.get(studies, progress=False).completed

    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(one, range(8)))
    per_patient = manifest.groupby("PatientID").size()
    assert counts == [per_patient.iloc[i % 5] for i in range(8)]


@pytest.fixture
def one_at_a_time(tmp_path):
    """A demo PACS that serves a single association at a time (a busy PACS)."""
    with DemoPACS(tmp_path / "busy", max_associations=1) as server:
        yield server


def test_transient_rejection_is_retried_until_the_peer_has_room(one_at_a_time):
    server = one_at_a_time
    holder = pf.PACS("127.0.0.1", server.port, server.ae_title, calling_ae="HOLDER")
    other = pf.PACS("127.0.0.1", server.port, server.ae_title, calling_ae="OTHER")
    rejected = threading.Event()
    server._server.bind(evt.EVT_REJECTED, lambda event: rejected.set())
    holder.__enter__()
    holder.echo()  # the association stays open: the server is now full

    def release_once_rejected() -> None:
        rejected.wait(30)
        holder.close()

    release = threading.Thread(target=release_once_rejected)
    release.start()
    try:
        assert other.echo() >= 0  # rejected at first, then served after the release
        assert rejected.is_set()
    finally:
        release.join(35)
        holder.__exit__(None, None, None)


def test_transient_rejection_that_persists_says_so(one_at_a_time):
    server = one_at_a_time
    with pf.PACS("127.0.0.1", server.port, server.ae_title, calling_ae="HOLDER") as holder:
        holder.echo()
        other = pf.PACS("127.0.0.1", server.port, server.ae_title, calling_ae="OTHER")
        with pytest.raises(pf.AssociationError, match="busy and said to try later") as info:
            other.echo()
    assert info.value.reason == "rejected"
    assert "transient" in str(info.value).lower()
