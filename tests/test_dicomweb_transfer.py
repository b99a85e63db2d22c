"""WADO-RS get and STOW-RS store (pacsframe.webtransfer) over real HTTP to the demo PACS.

The same frames are retrieved over C-GET and over WADO-RS and must leave the same
bytes and index rows in their caches; faults are injected by the demo's
``wado_fault`` hook (``fault(content_type, body) -> (content_type, body,
announced_length)``), which also counts the WADO-RS requests the server answered.
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pandas as pd
import pytest
import requests
from pydicom import dcmread
from pydicom.uid import generate_uid
from servers import OrthancServer, require_tool

import pacsframe as pf
from pacsframe import webtransfer, workers
from pacsframe.cache import Cache
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.errors import AssociationError, CountMismatchWarning, MultipartError


class Counter:
    """A pass-through ``wado_fault``: counts the requests; ``then`` alters the body."""

    def __init__(self, then=None) -> None:
        self.then = then
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, ctype: str, body: bytes):
        with self._lock:
            self.count += 1
        if self.then is not None:
            return self.then(ctype, body)
        return ctype, body, len(body)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("xfer-cohort")
    manifest = make_cohort(
        folder,
        patients=2,
        seed=11,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=(3, 4),
        matrix=32,
    )
    return folder, manifest


@pytest.fixture(scope="module")
def server(cohort):
    with DemoPACS(cohort[0], http_port=0) as pacs:
        yield pacs


@pytest.fixture
def demo(server):
    server.wado_fault = None
    yield server
    server.wado_fault = None


def dimse(server, cache) -> pf.PACS:
    return pf.PACS("127.0.0.1", server.port, server.ae_title, dimse_timeout=30, cache=cache)


def web(server, cache: Cache) -> pf.DICOMweb:
    return pf.DICOMweb(server.url, cache=cache)


def studies(server, cache) -> pd.DataFrame:
    return dimse(server, cache).find_studies()


def cached_bytes(cache: Cache) -> dict[str, bytes]:
    rows = cache.instances()
    return {r.SOPInstanceUID: Path(r.path).read_bytes() for r in rows.itertuples()}


def index_rows(cache: Cache) -> pd.DataFrame:
    rows = cache.instances().drop(columns=["path", "stored_at"])
    return rows.sort_values("SOPInstanceUID").reset_index(drop=True)


def no_leftovers(root: Path) -> None:
    """Nothing partial: no temporary file, and verify() finds nothing to report."""
    assert not [p for p in root.rglob("*") if p.name.endswith(".part")]


def test_same_bytes_and_rows_as_cget(demo, tmp_path):
    a, b = Cache(tmp_path / "cget"), Cache(tmp_path / "wado")
    frame = studies(demo, a)
    got = dimse(demo, a).get(frame, progress=False, workers=1)
    counter = Counter()
    demo.wado_fault = counter
    over = webtransfer.get(web(demo, b), frame, progress=False, workers=2)
    assert got.completed == over.completed == int(frame.NumberOfStudyRelatedInstances.sum())
    assert over.failed == 0 and over.requests == counter.count >= len(frame)
    assert cached_bytes(a) == cached_bytes(b)
    pd.testing.assert_frame_equal(index_rows(a), index_rows(b))
    assert b.verify().empty


def _cget(server, cache, frame, **kwargs):
    return dimse(server, cache).get(frame, **kwargs)


def _wado(server, cache, frame, **kwargs):
    return web(server, cache).get(frame, **kwargs)


@pytest.mark.parametrize("get", [_cget, _wado], ids=["cget", "wado"])
def test_resumable_and_fully_cached(demo, tmp_path, cohort, get):
    cache = Cache(tmp_path / "c")
    frame = studies(demo, cache)
    manifest = cohort[1]
    first = manifest.iloc[:2][["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]]
    assert get(demo, cache, first, progress=False).completed == 2
    counter = Counter()
    demo.wado_fault = counter
    seen: list[tuple[str, dict]] = []
    result = get(demo, cache, frame, progress=True, on_received=lambda p, m: seen.append((p, m)))
    total = len(manifest)
    assert result.cached == 2 and result.completed == total - 2 and result.failed == 0
    assert result.notes == [] and result.shortfall == 0
    if get is _wado:
        assert result.requests == counter.count
    assert len(seen) == total - 2 and all(Path(p).is_file() for p, _ in seen)
    assert {m["SOPInstanceUID"] for _, m in seen} == set(manifest.SOPInstanceUID) - set(
        first.SOPInstanceUID
    )
    before = counter.count
    again = get(demo, cache, frame, progress=False)
    assert again.requests == 0 and again.cached == total and counter.count == before
    assert cache.verify().empty


def test_on_received_error_stops_and_leaves_cache_consistent(demo, tmp_path):
    cache = Cache(tmp_path / "c")
    frame = studies(demo, cache)

    def boom(path, meta):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        webtransfer.get(web(demo, cache), frame, progress=False, on_received=boom, workers=1)
    assert len(cache) >= 1
    no_leftovers(tmp_path / "c")
    assert cache.verify().empty


@pytest.mark.parametrize("workers", [1, 2])
def test_each_object_is_indexed_before_on_received_sees_it(demo, tmp_path, workers):
    # Without on_received a response's rows are committed in batches; with it, each
    # row is in the index before the callback runs (the callback may look there).
    cache, other = Cache(tmp_path / "c"), Cache(tmp_path / "c")
    frame = studies(demo, cache)
    indexed: list[bool] = []

    def on_received(path, meta):
        sop = meta["SOPInstanceUID"]
        indexed.append(other.cached([sop]) == {sop})

    result = webtransfer.get(
        web(demo, cache), frame, progress=False, on_received=on_received, workers=workers
    )
    assert len(indexed) == result.completed == int(frame.NumberOfStudyRelatedInstances.sum())
    assert all(indexed)
    other.close()


def test_batches_of_rows_smaller_than_a_response_index_every_object(demo, tmp_path, monkeypatch):
    from pacsframe import cache as cache_module

    monkeypatch.setattr(cache_module, "_BATCH_ROWS", 2)  # commits in mid-response
    cache = Cache(tmp_path / "c")
    frame = studies(demo, cache)
    result = webtransfer.get(web(demo, cache), frame, progress=False, workers=1)
    assert result.completed == len(cache) == int(frame.NumberOfStudyRelatedInstances.sum())
    assert set(cache.instances().SOPInstanceUID) == set(result.instances.SOPInstanceUID)
    assert cache.verify().empty


def _drop(ctype, body):
    return ctype, body[: len(body) * 2 // 3], len(body)


def _truncate(ctype, body):
    cut = body[: body.rindex(b"\r\n--")]  # no closing boundary; a complete HTTP body
    return ctype, cut, len(cut)


def _other_boundary(ctype, body):
    return ctype.rsplit("boundary=", 1)[0] + "boundary=not-the-one", body, len(body)


@pytest.mark.parametrize("fault", [_drop, _truncate, _other_boundary])
def test_faults_leave_nothing_partial_and_rerun_completes(demo, tmp_path, fault, cohort):
    root = tmp_path / "c"
    cache = Cache(root)
    frame = studies(demo, cache)
    client = web(demo, cache)
    demo.wado_fault = Counter(fault)
    with pytest.raises(AssociationError) as info:
        webtransfer.get(client, frame, progress=False, workers=1)
    if fault is not _drop:
        assert isinstance(info.value, MultipartError)
    result = info.value.result
    assert result.completed == len(cache) < len(cohort[1])
    no_leftovers(root)
    assert cache.verify().empty
    demo.wado_fault = None
    again = webtransfer.get(client, frame, progress=False)
    assert again.completed + again.cached == len(cohort[1]) and again.failed == 0
    assert again.cached == result.completed
    assert cache.verify().empty


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_like_uid_is_refused(demo, tmp_path, cohort):
    manifest = cohort[1]
    row = manifest.iloc[0]
    ds = dcmread(row.path)
    evil = tmp_path / "evil.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR UI"
        ds.SOPInstanceUID = "../../../evil"
        ds.file_meta.MediaStorageSOPInstanceUID = "../../../evil"
        ds.save_as(evil, enforce_file_format=True)
    evil_bytes = evil.read_bytes()

    def swap(ctype, body):
        boundary = ctype.rsplit("boundary=", 1)[1].encode()
        head = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
        body = head + evil_bytes + b"\r\n" + body
        return ctype, body, len(body)

    root = tmp_path / "sub" / "cache"
    cache = Cache(root)
    demo.wado_fault = Counter(swap)
    frame = manifest.iloc[:1][["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]]
    result = webtransfer.get(web(demo, cache), frame, progress=False)
    assert result.completed == 1 and result.failed == 1
    assert "not a valid UID" in result.failed_instances.error.iloc[0]
    assert not [p for p in tmp_path.rglob("*evil*") if p != evil]
    no_leftovers(root)
    assert cache.verify().empty and len(cache) == 1


def test_memory_stays_bounded(tmp_path):
    folder = tmp_path / "big"
    manifest = make_cohort(
        folder,
        patients=1,
        seed=5,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=16,
        matrix=512,
    )
    body = sum(Path(p).stat().st_size for p in manifest.path)
    assert body > 8_000_000
    cache = Cache(tmp_path / "c")
    with DemoPACS(folder, http_port=0) as server:
        client = web(server, cache)
        frame = manifest[["StudyInstanceUID"]].drop_duplicates()
        tracemalloc.start()
        try:
            result = webtransfer.get(client, frame, progress=False, workers=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.completed == 16
    # A few 256 KiB chunks in flight, not the body (and not one whole part).
    assert peak < 2_500_000, (peak, body)


def test_stow_round_trip(tmp_path, cohort):
    manifest = cohort[1]
    with DemoPACS(tmp_path / "empty", http_port=0) as server:
        cache = Cache(tmp_path / "c")
        client = web(server, cache)
        stored = client.store(manifest, batch=3)
        assert stored.completed == len(manifest) and stored.failed == 0
        assert list(stored.instances.SOPInstanceUID) == list(manifest.SOPInstanceUID)
        found = dimse(server, cache).find_studies()
        assert set(found.StudyInstanceUID) == set(manifest.StudyInstanceUID)
        got = webtransfer.get(client, found, progress=False)
        assert got.completed == len(manifest)
        for row in manifest.itertuples():
            original = Path(row.path).read_bytes()
            (hit,) = cache.instances(SOPInstanceUID=row.SOPInstanceUID).path
            assert Path(server.folder / row.StudyInstanceUID / row.SeriesInstanceUID).is_dir()
            # Same data set after the file meta (the cache writes its own meta).
            ours = Path(hit).read_bytes()
            assert ours[-1000:] == original[-1000:]


def _bad_copy(path: str, folder: Path) -> Path:
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = folder / f"{ds.SOPInstanceUID}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR UI"
        ds.SeriesInstanceUID = "1.2.bad"
        ds.save_as(out, enforce_file_format=True)
    return out


def test_stow_partial_failure_per_object(tmp_path, cohort):
    manifest = cohort[1]
    bad = _bad_copy(manifest.path.iloc[0], tmp_path)
    with DemoPACS(tmp_path / "empty", http_port=0) as server:
        client = web(server, Cache(tmp_path / "c"))
        sources = [manifest.path.iloc[1], str(bad), manifest.path.iloc[2]]
        result = webtransfer.store(client, sources)  # 202: some stored
        assert list(result.instances.status) == ["completed", "failed", "completed"]
        assert result.instances.code.iloc[1] == 0xC000
        alone = webtransfer.store(client, [str(bad)])  # 409: all failed
        assert list(alone.instances.status) == ["failed"]
        assert alone.instances.code.iloc[0] == 0xC000
        assert "0xC000" in alone.instances.error.iloc[0]


def test_stow_datasets(tmp_path, cohort):
    manifest = cohort[1]
    datasets = [dcmread(p) for p in manifest.path.iloc[:2]]
    with DemoPACS(tmp_path / "empty", http_port=0) as server:
        client = web(server, Cache(tmp_path / "c"))
        result = webtransfer.store(client, datasets)
        assert result.completed == 2
        assert len(list(Path(server.folder).rglob("*.dcm"))) == 2


def test_slow_server_against_timeout(demo, tmp_path):
    cache = Cache(tmp_path / "c")
    frame = studies(demo, cache)

    def slow(ctype, body):
        time.sleep(3)
        return ctype, body, len(body)

    demo.wado_fault = Counter(slow)
    began = time.monotonic()
    with pytest.raises(AssociationError) as info:
        webtransfer.get(web(demo, cache), frame, progress=False, workers=1, timeout=1)
    assert info.value.reason == "timeout" and time.monotonic() - began < 2.9
    assert info.value.result.completed == 0
    assert cache.verify().empty


def test_instance_the_peer_lacks_is_a_failed_row_and_a_note(demo, tmp_path, cohort):
    row = cohort[1].iloc[0]
    keys = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    real = {k: row[k] for k in keys}
    frame = pd.DataFrame([real, {**real, "SOPInstanceUID": generate_uid()}])
    cache = Cache(tmp_path / "c")
    with pytest.warns(CountMismatchWarning):
        result = webtransfer.get(web(demo, cache), frame, progress=False)
    assert result.completed == 1 and result.failed == 1 and result.requests == 2
    assert "404" in result.failed_instances.error.iloc[0] and len(result.notes) == 1
    assert result.shortfall == 1


def test_orthanc_stow_then_wado_same_bytes_as_cget(tmp_path, cohort):
    """A real peer: Orthanc's DICOMweb plugin takes our STOW-RS body and its WADO-RS
    answer leaves the same cached bytes as its C-GET."""
    require_tool("Orthanc")
    plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    if not Path(plugin).exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed")
    manifest = cohort[1]
    config = {"Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with OrthancServer(tmp_path / "orthanc", extra_config=config) as server:
        a, b = Cache(tmp_path / "wado"), Cache(tmp_path / "cget")
        pacs = pf.PACS(server.host, server.dicom_port, server.aet, cache=b)
        client = pf.DICOMweb(server.url + "/dicom-web", cache=a)
        stored = client.store(manifest, batch=4)
        assert stored.completed == len(manifest), stored.failed_instances
        frame = client.find_studies()
        got = client.get(frame, progress=False)
        assert got.completed == len(manifest) and got.notes == []
        assert pacs.get(frame, progress=False).completed == len(manifest)
        assert cached_bytes(a) == cached_bytes(b)
        pd.testing.assert_frame_equal(index_rows(a), index_rows(b))


def test_fewer_parts_than_announced_is_a_note(demo, tmp_path):
    def skip_first(ctype, body):
        delimiter = b"--" + ctype.rsplit("boundary=", 1)[1].encode()
        body = body[body.index(delimiter, len(delimiter)) :]
        return ctype, body, len(body)

    cache = Cache(tmp_path / "c")
    frame = studies(demo, cache).iloc[:1]
    demo.wado_fault = Counter(skip_first)
    with pytest.warns(CountMismatchWarning, match="announced"):
        result = web(demo, cache).get(frame, progress=False, workers=1)
    expected = int(frame.NumberOfStudyRelatedInstances.iloc[0])
    assert result.completed == expected - 1 and result.shortfall == 1
    assert len(result.notes) == 1 and "arrived" in result.notes[0]


# --- over worker processes ----------------------------------------------------------------
# A parallel get runs its units in worker processes (pacsframe.workers), which file into
# the one cache themselves; the caller keeps the rows, progress and on_received. The same
# get with PACSFRAME_WORKER_PROCESSES=0 (threads) is the reference.


@pytest.fixture
def processes_here(monkeypatch):
    # Each test says which it wants; a CI environment's setting must not decide it.
    monkeypatch.delenv(workers.ENV_VAR, raising=False)
    if not workers.available():
        pytest.fail("worker processes are not available here (Linux with fork expected)")
    return monkeypatch


def _first_only(fault):
    """A fault for the first WADO-RS answer only (the other units are answered whole)."""
    seen = []
    lock = threading.Lock()

    def once(ctype, body):
        with lock:
            seen.append(1)
            first = len(seen) == 1
        return fault(ctype, body) if first else (ctype, body, len(body))

    return once


def result_rows(result) -> pd.DataFrame:
    rows = result.instances.drop(columns=["path"])
    return rows.sort_values("SOPInstanceUID").reset_index(drop=True)


def run_kind(caplog) -> str:
    """'process' or 'thread': how the last WADO-RS get ran its units, from its log."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WADO-RS from")]
    assert lines, "the get logged no 'WADO-RS from' line"
    return "process" if "process(es)" in lines[-1] else "thread"


def test_processes_leave_the_same_bytes_rows_and_result_as_threads(
    demo, tmp_path, processes_here, caplog, cohort
):
    monkeypatch = processes_here
    caplog.set_level(logging.INFO, logger="pacsframe")
    frame = pf.DICOMweb(demo.url, cache=tmp_path / "q").find_studies(progress=False)
    total = len(cohort[1])
    got: dict[str, tuple[Cache, object, list]] = {}
    for kind in ("thread", "process"):
        if kind == "thread":
            monkeypatch.setenv(workers.ENV_VAR, "0")
        else:
            monkeypatch.delenv(workers.ENV_VAR)
        cache = Cache(tmp_path / kind)
        seen: list[tuple[str, dict]] = []
        counter = Counter()
        demo.wado_fault = counter
        result = pf.DICOMweb(demo.url, cache=cache).get(
            frame,
            workers=4,
            progress=True,
            on_received=lambda p, m, seen=seen: seen.append((p, m)),
        )
        assert run_kind(caplog) == kind
        assert result.completed == total and result.failed == 0 and result.notes == []
        assert result.requests == counter.count >= 2
        # on_received ran in the caller once per object, with a file that is there.
        assert len(seen) == total and all(Path(p).is_file() for p, _ in seen)
        got[kind] = (cache, result, seen)
    (a, ra, sa), (b, rb, sb) = got["thread"], got["process"]
    assert cached_bytes(a) == cached_bytes(b)
    pd.testing.assert_frame_equal(index_rows(a), index_rows(b))
    pd.testing.assert_frame_equal(result_rows(ra), result_rows(rb))
    assert sorted(m["SOPInstanceUID"] for _, m in sa) == sorted(m["SOPInstanceUID"] for _, m in sb)
    assert b.verify().empty
    # Resumable: a second get over processes finds everything cached, asks for nothing.
    again = pf.DICOMweb(demo.url, cache=b).get(frame, workers=4, progress=False)
    assert again.cached == total and again.requests == 0


@pytest.mark.parametrize("fault", [_drop, _truncate], ids=["dropped", "truncated"])
def test_fault_mid_part_in_a_child_surfaces_and_leaves_nothing_partial(
    demo, tmp_path, processes_here, caplog, cohort, fault
):
    monkeypatch = processes_here
    caplog.set_level(logging.INFO, logger="pacsframe")
    errors = {}
    for kind in ("thread", "process"):
        if kind == "thread":
            monkeypatch.setenv(workers.ENV_VAR, "0")
        else:
            monkeypatch.delenv(workers.ENV_VAR)
        root = tmp_path / kind
        cache = Cache(root)
        client = pf.DICOMweb(demo.url, cache=cache)
        frame = client.find_studies(progress=False)
        demo.wado_fault = Counter(_first_only(fault))  # the first answer only: cut mid-part
        with pytest.raises(AssociationError) as info:
            client.get(frame, workers=2, progress=False)
        assert run_kind(caplog) == kind
        error = errors[kind] = info.value
        result = error.result
        assert result.completed == len(cache) < len(cohort[1])
        assert not [p for p in root.rglob("*") if p.name.endswith(".part")]
        assert cache.verify().empty
        demo.wado_fault = None
        again = client.get(frame, workers=2, progress=False)
        assert again.cached == result.completed and again.failed == 0
        assert again.completed + again.cached == len(cohort[1])
    # The child's error crossed whole: its class, reason and message (which unit got
    # the cut answer, with its UIDs and sizes, and what the other filed before it
    # stopped, are a race).
    a, b = errors["thread"], errors["process"]
    assert type(a) is type(b) and a.reason == b.reason

    def said(error: BaseException) -> str:
        # Without what arrived: "... is cached." or "... is cached. The 10 object(s) ...".
        first = str(error).partition(". The ")[0].rstrip(".")
        return re.sub(r"\d+(\.\d+)*", "N", first)  # UIDs, part numbers, sizes

    assert said(a) == said(b) and said(b).startswith("the ")
    if fault is _truncate:
        assert isinstance(b, MultipartError)


def test_on_received_error_in_the_caller_stops_the_children(
    demo, tmp_path, caplog, processes_here
):
    caplog.set_level(logging.INFO, logger="pacsframe")
    cache = Cache(tmp_path / "c")
    client = pf.DICOMweb(demo.url, cache=cache)
    frame = client.find_studies(progress=False)

    def boom(path, meta):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        client.get(frame, workers=2, progress=False, on_received=boom)
    assert run_kind(caplog) == "process"
    assert len(cache) >= 1
    assert not [p for p in (tmp_path / "c").rglob("*") if p.name.endswith(".part")]
    assert cache.verify().empty


def test_a_callers_session_uses_threads(demo, tmp_path, caplog, cohort, processes_here):
    caplog.set_level(logging.INFO, logger="pacsframe")
    session = requests.Session()
    client = pf.DICOMweb(demo.url, session=session, cache=Cache(tmp_path / "c"))
    with pytest.raises(TypeError, match="session"):
        pickle.dumps(client)
    frame = client.find_studies(progress=False)
    result = client.get(frame, workers=4, progress=False)
    assert run_kind(caplog) == "thread"
    assert result.completed == len(cohort[1]) and result.failed == 0
    session.close()


def test_settings_cross_without_the_connections(tmp_path):
    client = pf.DICOMweb(
        "http://user:s3cret-pw@127.0.0.1:9/dicom-web",
        headers={"X-Site": "a"},
        verify=False,
        timeout=7,
        cache=Cache(tmp_path / "c"),
    )
    client.cache  # noqa: B018 - opened: the copy gets its root, not the open index
    copy = pickle.loads(pickle.dumps(client))
    t, c = client.transport, copy.transport
    assert (c.base, c.auth, c.headers, c.verify, c.timeout) == (
        t.base,
        t.auth,
        t.headers,
        t.verify,
        t.timeout,
    )
    assert c.session is not t.session and copy.cache.root == client.cache.root
    assert "s3cret" not in repr(copy) and "s3cret" not in copy.url
