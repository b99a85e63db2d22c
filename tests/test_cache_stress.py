"""The cache under stress: several processes, damage behind its back, SIGKILL, verify().

Retrievals run in child processes (``subprocess.Popen`` of a small script) that
import this checkout (``PYTHONPATH``), against a demo PACS in the test process that
sleeps before each C-GET sub-operation, and holds or pairs its answers (see
:class:`SlowPACS`), so that the children overlap and are killed half-way however busy
the machine. Children start together on a "go" file; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pynetdicom import evt

import pacsframe as pf
from pacsframe.cache import Cache
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.demo.server import handle_get

REPO = Path(__file__).resolve().parents[1]
SERIES = 6
PER_SERIES = 8


class SlowPACS(DemoPACS):
    """The demo PACS, sleeping ``delay`` seconds before each C-GET sub-operation.

    So that a test acts mid-retrieval by waiting for events, never by racing a sleep:

    - ``hold_after``: after that many sub-operations in all, the rest wait (bounded)
      until :meth:`reset`, so a retrieval cannot end before the test has acted;
    - ``pair``: a C-GET for one of these SeriesInstanceUIDs sends nothing until a
      second C-GET for the same series has come (bounded), so two clients receive
      the same objects at the same time.
    """

    delay = 0.0
    hold_after: int | None = None
    pair: frozenset[str] = frozenset()

    def start(self) -> SlowPACS:
        super().start()
        self._lock = threading.Lock()
        self._meetings: dict[str, threading.Barrier] = {}
        self._sent = 0
        self.release = threading.Event()
        # C-GET is an intervention event: this handler replaces the plain one.
        self._server.bind(evt.EVT_C_GET, _slow_get, [self])
        return self

    def reset(self) -> None:
        """Back to plain answers; lets every held sub-operation go."""
        self.delay, self.hold_after, self.pair = 0.0, None, frozenset()
        self.release.set()
        with self._lock:
            for barrier in self._meetings.values():
                barrier.abort()
            self._meetings.clear()
            self._sent = 0
        self.release = threading.Event()

    def _meet(self, identifier) -> None:
        if str(identifier.get("SeriesInstanceUID", "")) not in self.pair:
            return
        # The same request from the other client: the same series, the same instances.
        key = repr([identifier.get(k) for k in ("SeriesInstanceUID", "SOPInstanceUID")])
        with self._lock:
            barrier = self._meetings.setdefault(key, threading.Barrier(2))
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=60)  # no partner: the test's own checks say so

    def _may_send(self) -> None:
        release = self.release
        with self._lock:
            self._sent += 1
            held = self.hold_after is not None and self._sent > self.hold_after
        if held:
            release.wait(60)


def _slow_get(event: evt.Event, server: SlowPACS):
    first = True
    for item in handle_get(event, server):
        if not isinstance(item, int):  # the first item is the sub-operation count
            if first:
                server._meet(event.identifier)
                first = False
            server._may_send()
            time.sleep(server.delay)
        yield item


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stress-served")
    manifest = make_cohort(
        folder,
        patients=2,
        seed=91,
        studies_per_patient=1,
        series_per_study=SERIES // 2,
        instances_per_series=PER_SERIES,
        matrix=32,
        modalities=("CT",),
    )
    assert len(manifest) == SERIES * PER_SERIES
    with SlowPACS(folder) as server:
        yield server, manifest


@pytest.fixture
def slow(served):
    server, manifest = served
    server.reset()  # counts sub-operations from here
    server.delay = 0.05
    yield server, manifest
    server.reset()


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def spawn(tmp_path: Path, name: str, body: str, **args) -> tuple[subprocess.Popen, Path]:
    """Start ``body`` in a child; it writes ``ready`` then waits for the ``go`` file."""
    ready = tmp_path / f"{name}.ready"
    script = tmp_path / f"{name}.py"
    script.write_text(PRELUDE + body)
    args = {**args, "ready": str(ready), "go": str(tmp_path / "go")}
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, ready


PRELUDE = """
import json, pathlib, sys, time
import pacsframe as pf

args = json.loads(sys.argv[1])


def ready_then_wait_for_go():
    pathlib.Path(args["ready"]).write_text("ready")
    deadline = time.monotonic() + 60
    while not pathlib.Path(args["go"]).exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal within 60 s")
        time.sleep(0.002)
"""

GET = """
pacs = pf.PACS("127.0.0.1", args["port"], args["aet"], cache=args["cache"], dimse_timeout=60)
series = pacs.find_series(pacs.find_studies())
series = series.set_index("SeriesInstanceUID").loc[args["series"]].reset_index()
ready_then_wait_for_go()
result = pacs.get(series, workers=2, progress=False)
rows = result.instances
print(json.dumps({
    "module": pf.__file__,
    "statuses": dict(zip(rows.SOPInstanceUID, rows.status)),
    "errors": [e for e in rows.error.dropna()],
}))
"""


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.005)


def reap(*processes: subprocess.Popen) -> None:
    """Kill whichever still runs and wait for it: no child outlives its test."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen, seconds: float = 120) -> dict:
    try:
        out, err = process.communicate(timeout=seconds)
    finally:
        reap(process)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def dataset_bytes(path: str | os.PathLike[str]) -> bytes:
    """A Part-10 file's data set, without the file meta (which a C-GET receiver rebuilds)."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM"
    meta_length = int.from_bytes(data[140:144], "little")  # FileMetaInformationGroupLength
    return data[144 + meta_length :]


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


def assert_consistent(root: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """One complete file per indexed instance, identical to the served one; no leftovers."""
    cache = Cache(root)
    try:
        assert cache.verify().empty
        frame = cache.instances()
    finally:
        cache.close()
    assert frame.SOPInstanceUID.is_unique
    files = sorted(root.rglob("*.dcm"))
    assert len({p.stem for p in files}) == len(files) == len(frame)
    assert sorted(str(p) for p in files) == sorted(frame.path)
    source = manifest.set_index("SOPInstanceUID").path
    for row in frame.itertuples():
        assert dataset_bytes(row.path) == dataset_bytes(source[row.SOPInstanceUID])
        assert row.size == Path(row.path).stat().st_size
    assert temporary_files(root) == []
    return frame


# --- two processes, one cache ------------------------------------------------------------------


def test_two_processes_retrieving_overlapping_series_file_each_object_once(slow, tmp_path):
    server, manifest = slow
    root = tmp_path / "cache"
    uids = list(dict.fromkeys(manifest.SeriesInstanceUID))
    # Both start with the two shared series, which the server sends to both at once.
    wanted = {"a": uids[2:4] + uids[:2], "b": uids[2:4] + uids[4:]}
    server.pair = frozenset(uids[2:4])
    children = {
        name: spawn(
            tmp_path,
            name,
            GET,
            port=server.port,
            aet=server.ae_title,
            cache=str(root),
            series=series,
        )
        for name, series in wanted.items()
    }
    for process, ready in children.values():
        wait_for(lambda r=ready, p=process: r.exists() or p.poll() is not None, 60, "ready")
        assert process.poll() is None, process.communicate()[1]
    # verify() runs over and over while both write: it must neither break their
    # writes nor report problems other than files it catches between rename and index.
    reports: list[pd.DataFrame] = []
    stop = threading.Event()

    def verify_loop() -> None:
        watcher = Cache(root)
        try:
            while not stop.is_set():
                reports.append(watcher.verify())
        finally:
            watcher.close()

    (tmp_path / "go").touch()
    started = time.monotonic()
    verifier = threading.Thread(target=verify_loop)
    verifier.start()
    try:
        results = {name: finish(process) for name, (process, _) in children.items()}
    finally:
        stop.set()
        verifier.join(60)
    elapsed = time.monotonic() - started

    for name, result in results.items():
        assert Path(result["module"]).parent.parent == REPO
        assert result["errors"] == []
        expected = manifest[manifest.SeriesInstanceUID.isin(wanted[name])].SOPInstanceUID
        assert sorted(result["statuses"]) == sorted(expected)
        assert set(result["statuses"].values()) <= {"completed", "cached"}
    both = [
        sop
        for sop, status in results["a"]["statuses"].items()
        if status == "completed" and results["b"]["statuses"].get(sop) == "completed"
    ]
    assert both, "the two processes never received the same object: no overlap was tested"
    problems = pd.concat(reports)
    assert set(problems.problem) <= {"not indexed"}, problems
    frame = assert_consistent(root, manifest)
    assert sorted(frame.SOPInstanceUID) == sorted(manifest.SOPInstanceUID)
    print(
        f"\n{len(both)} objects received by both processes; {len(reports)} verify() runs "
        f"in {elapsed:.1f} s, {len(problems)} unindexed file(s) caught and indexed"
    )


ADD = """
cache = pf.Cache(args["cache"])
payloads = [pathlib.Path(p).read_bytes() for p in args["paths"]]
ready_then_wait_for_go()
for round in range(args["rounds"]):
    for data in payloads:
        cache.add(data, overwrite=True)
print(json.dumps({"module": pf.__file__}))
"""


def test_two_processes_adding_the_same_objects_at_once_keep_one_row_and_file(served, tmp_path):
    _, manifest = served
    root = tmp_path / "fresh"  # both processes also create the index at the same time
    paths = list(manifest.path)
    children = [
        spawn(tmp_path, f"add{i}", ADD, cache=str(root), paths=paths[::step], rounds=3)
        for i, step in enumerate((1, -1))
    ]
    for process, ready in children:
        wait_for(lambda r=ready, p=process: r.exists() or p.poll() is not None, 60, "ready")
        assert process.poll() is None, process.communicate()[1]
    (tmp_path / "go").touch()
    for process, _ in children:
        assert Path(finish(process)["module"]).parent.parent == REPO
    frame = assert_consistent(root, manifest)
    assert len(frame) == len(manifest)


OPEN = """
results = []
for trial, root in enumerate(args["roots"]):
    pathlib.Path(f"{args['ready']}.{trial}").write_text("ready")
    go = pathlib.Path(f"{args['go']}.{trial}")
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal within 60 s")
        time.sleep(0.0005)
    try:
        results.append(len(pf.Cache(root)))
    except Exception as exc:
        results.append(repr(exc))
print(json.dumps({"results": results}))
"""


def test_processes_opening_a_new_index_at_once_all_succeed(tmp_path):
    # Switching a new index to WAL does not wait for a busy database; before the
    # retry, 20 to 30% of trials with six processes failed with "locked".
    trials, count = 12, 4
    roots = [str(tmp_path / f"root{t}") for t in range(trials)]
    children = [spawn(tmp_path, f"open{i}", OPEN, roots=roots) for i in range(count)]
    try:
        for trial in range(trials):
            for process, ready in children:
                marker = Path(f"{ready}.{trial}")
                wait_for(
                    lambda m=marker, p=process: m.exists() or p.poll() is not None, 60, "ready"
                )
                assert process.poll() is None, process.communicate()[1]
            (tmp_path / f"go.{trial}").touch()
        results = [finish(process)["results"] for process, _ in children]
    finally:
        reap(*(process for process, _ in children))
    assert results == [[0] * trials] * count


# --- damage behind the index's back ------------------------------------------------------------


def test_deleted_and_truncated_files_are_found_and_fetched_again(served, tmp_path):
    server, manifest = served
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=tmp_path / "cache")
    series = pacs.find_series(pacs.find_studies())
    assert pacs.get(series, progress=False).completed == len(manifest)
    held = pacs.cache.instances().set_index("SOPInstanceUID")
    gone, cut = held.index[[3, 17]]
    Path(held.path[gone]).unlink()
    data = Path(held.path[cut]).read_bytes()
    Path(held.path[cut]).write_bytes(data[:300])

    report = pacs.cache.verify().set_index("SOPInstanceUID")
    assert sorted(report.index) == sorted([gone, cut])
    assert report.problem[gone] == "missing"
    assert report.problem[cut] == "truncated"
    assert report.detail[cut] == (
        f"300 bytes on disk but {len(data)} in the index; file and row removed"
    )
    assert report.path[gone] == held.path[gone] and report.path[cut] == held.path[cut]
    assert not Path(held.path[cut]).exists()
    assert len(pacs.cache) == len(manifest) - 2

    again = pacs.get(series, progress=False)
    statuses = dict(zip(again.instances.SOPInstanceUID, again.instances.status, strict=True))
    assert sorted(s for s, v in statuses.items() if v == "completed") == sorted([gone, cut])
    assert again.cached == len(manifest) - 2 and again.failed == 0
    assert_consistent(pacs.cache.root, manifest)
    pacs.cache.close()


# --- SIGKILL ----------------------------------------------------------------------------------


def test_sigkill_mid_get_leaves_complete_files_and_a_rerun_fetches_the_rest(slow, tmp_path):
    server, manifest = slow
    server.hold_after = 20  # the retrieval cannot end before it is killed
    root = tmp_path / "cache"
    process, ready = spawn(
        tmp_path,
        "killed",
        GET,
        port=server.port,
        aet=server.ae_title,
        cache=str(root),
        series=list(dict.fromkeys(manifest.SeriesInstanceUID)),
    )
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 60, "ready")
        (tmp_path / "go").touch()

        def some_received() -> bool:
            assert process.poll() is None, "the retrieval ended before it could be killed"
            return len(list(root.rglob("*.dcm"))) >= 10

        wait_for(some_received, 60, "ten objects on disk")
        process.send_signal(signal.SIGKILL)
        # Reaped before verify(): a zombie's PID still answers os.kill(pid, 0).
        process.wait(30)
    finally:
        reap(process)
    assert process.returncode == -signal.SIGKILL

    files = sorted(root.rglob("*.dcm"))
    assert 10 <= len(files) < len(manifest)
    source = manifest.set_index("SOPInstanceUID").path
    for path in files:  # every renamed file is complete, valid DICOM
        assert dataset_bytes(path) == dataset_bytes(source[path.stem])
        assert pydicom.dcmread(path).pixel_array.shape == (32, 32)
    cache = Cache(root)
    indexed = set(cache.instances().SOPInstanceUID)
    assert indexed <= {p.stem for p in files}  # a row only ever points at a whole file

    report = cache.verify()
    # Only a write cut short (a temporary file) or a file renamed but not yet indexed.
    assert set(report.problem) <= {"stray temporary file", "not indexed"}, report
    assert cache.verify().empty
    have = len(cache)
    assert have == len(files)
    cache.close()

    server.reset()
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=root)
    rest = pacs.get(pacs.find_series(pacs.find_studies()), progress=False)
    assert rest.cached == have and rest.completed == len(manifest) - have
    assert rest.failed == 0
    assert_consistent(root, manifest)
    pacs.cache.close()


# --- verify() while another process writes ----------------------------------------------------

WRITE_HALF = """
cache = pf.Cache(args["cache"])
data = pathlib.Path(args["path"]).read_bytes()
with cache.open_writer(*args["uids"], overwrite=True) as out:
    out.write(data[:1000])
    out.flush()
    ready_then_wait_for_go()
    out.write(data[1000:])
print(json.dumps({"module": pf.__file__}))
"""


@pytest.mark.skipif(os.name != "posix", reason="writers are asked with os.kill(pid, 0)")
def test_verify_leaves_a_live_writers_temporary_file_and_removes_a_killed_ones(served, tmp_path):
    _, manifest = served
    root = tmp_path / "cache"
    row = manifest.iloc[5]
    uids = [row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID]
    cache = Cache(root)
    cache.add(Path(manifest.path.iloc[0]).read_bytes())  # the index exists

    # A live writer, half-way through: verify() must leave its file alone.
    process, ready = spawn(tmp_path, "live", WRITE_HALF, cache=str(root), path=row.path, uids=uids)
    wait_for(lambda: ready.exists() or process.poll() is not None, 60, "ready")
    assert process.poll() is None, process.communicate()[1]
    (part,) = temporary_files(root)
    assert f"-{process.pid}-" in part.name
    assert cache.verify().empty
    assert part.exists()
    (tmp_path / "go").touch()
    finish(process)
    assert cache.cached([row.SOPInstanceUID]) == {row.SOPInstanceUID}
    (tmp_path / "go").unlink()

    # The same write, killed half-way: its temporary file is stray.
    row = manifest.iloc[6]
    uids = [row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID]
    process, ready = spawn(tmp_path, "dead", WRITE_HALF, cache=str(root), path=row.path, uids=uids)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 60, "ready")
        assert process.poll() is None, process.communicate()[1]
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        reap(process)
    (part,) = temporary_files(root)
    report = cache.verify()
    assert report.problem.tolist() == ["stray temporary file"]
    assert report.path.tolist() == [str(part)]
    assert report.detail[0] == f"its writer, process {process.pid}, is gone; removed"
    assert not part.exists() and cache.cached([row.SOPInstanceUID]) == set()
    assert cache.verify().empty
    cache.close()
    assert_consistent(root, manifest)
