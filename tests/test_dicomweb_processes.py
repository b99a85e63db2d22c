"""WADO-RS get over worker processes (pacsframe.workers), against the same get in threads.

Over real HTTP to the demo PACS: the units of a parallel get run in worker
processes, which file into the one cache themselves; the caller keeps the rows,
progress and ``on_received``. The same frame retrieved with
``PACSFRAME_WORKER_PROCESSES=0`` (threads) must leave the same bytes, index rows
and result rows; a fault the demo's ``wado_fault`` hook injects mid-part in a
child must surface in the caller as the same error, with nothing partial left;
an archive with a caller's ``session=`` cannot cross to a child and uses threads.
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
from pathlib import Path

import pandas as pd
import pytest
import requests

import pacsframe as pf
from pacsframe import workers
from pacsframe.cache import Cache
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.errors import AssociationError, MultipartError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("proc-cohort")
    manifest = make_cohort(
        folder,
        patients=2,
        seed=23,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=(4, 6),
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


@pytest.fixture(autouse=True)
def _processes_here(monkeypatch):
    # The tests say which they want; a CI environment's setting must not decide it.
    monkeypatch.delenv(workers.ENV_VAR, raising=False)
    if not workers.available():
        pytest.fail("worker processes are not available here (Linux with fork expected)")


class Count:
    """A pass-through ``wado_fault`` counting the WADO-RS answers; ``then`` alters them."""

    def __init__(self, then=None) -> None:
        self.then = then
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, ctype: str, body: bytes):
        with self._lock:
            self.count += 1
            first = self.count == 1
        if self.then is not None and first:
            return self.then(ctype, body)
        return ctype, body, len(body)


def cached_bytes(cache: Cache) -> dict[str, bytes]:
    return {r.SOPInstanceUID: Path(r.path).read_bytes() for r in cache.instances().itertuples()}


def index_rows(cache: Cache) -> pd.DataFrame:
    rows = cache.instances().drop(columns=["path", "stored_at"])
    return rows.sort_values("SOPInstanceUID").reset_index(drop=True)


def result_rows(result) -> pd.DataFrame:
    rows = result.instances.drop(columns=["path"])
    return rows.sort_values("SOPInstanceUID").reset_index(drop=True)


def run_kind(caplog) -> str:
    """'process' or 'thread': how the last WADO-RS get ran its units, from its log."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WADO-RS from")]
    assert lines, "the get logged no 'WADO-RS from' line"
    return "process" if "process(es)" in lines[-1] else "thread"


def test_processes_leave_the_same_bytes_rows_and_result_as_threads(
    demo, tmp_path, monkeypatch, caplog, cohort
):
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
        counter = Count()
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


def _drop(ctype, body):
    return ctype, body[: len(body) * 2 // 3], len(body)


def _truncate(ctype, body):
    cut = body[: body.rindex(b"\r\n--")]  # no closing boundary; a complete HTTP body
    return ctype, cut, len(cut)


@pytest.mark.parametrize("fault", [_drop, _truncate], ids=["dropped", "truncated"])
def test_fault_mid_part_in_a_child_surfaces_and_leaves_nothing_partial(
    demo, tmp_path, monkeypatch, caplog, cohort, fault
):
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
        demo.wado_fault = Count(fault)  # the first answer only: cut mid-part
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
    # the cut answer, and what the other filed before it stopped, are a race).
    a, b = errors["thread"], errors["process"]
    assert type(a) is type(b) and a.reason == b.reason

    def said(error: BaseException) -> str:
        return re.sub(r"\d+(\.\d+)+", "UID", str(error).partition(". The ")[0])

    assert said(a) == said(b) and said(b).startswith("the ")
    if fault is _truncate:
        assert isinstance(b, MultipartError)


def test_on_received_error_in_the_caller_stops_the_children(demo, tmp_path, caplog):
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


def test_a_callers_session_uses_threads(demo, tmp_path, caplog, cohort):
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
