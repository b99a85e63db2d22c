"""Worker processes (pacsframe.workers) and C-GET over them against the demo PACS."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pacsframe as pf
from pacsframe import workers
from pacsframe.errors import AssociationError, DimseError
from pacsframe.net.driver import LimitReached

pytestmark = pytest.mark.skipif(not workers.available(), reason="worker processes: Linux only")


def _run(target, args=(), on_message=None, *, timeout: float = 60.0):
    got: list[tuple] = []

    def parent(message):
        got.append(message)
        return on_message(message) if on_message else None

    worker = workers.ProcessWorker("test-worker", target, args, parent)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the worker did not end in time"
    return worker, got


def test_errors_cross_with_their_attributes() -> None:
    back = workers.restore(workers.portable(AssociationError("lost", reason="timeout")))
    assert isinstance(back, AssociationError) and back.reason == "timeout"
    assert str(back) == "lost"
    limit = workers.restore(workers.portable(LimitReached("ran out", "aborted")))
    assert isinstance(limit, LimitReached) and limit.action == "aborted"
    failure = DimseError("refused", status=0xC001)
    failure.unpicklable = threading.Lock()  # left out, not fatal
    back = workers.restore(workers.portable(failure))
    assert isinstance(back, DimseError) and back.status == 0xC001
    assert not hasattr(back, "unpicklable")


# Targets run in the worker server's children: module level, so they pickle by name.


def squares(link):
    for i in range(3):
        link.send("n", i, link.ask("square", i))


def crashes(link):
    raise AssociationError("the peer went away", reason="aborted")


def killed(link):
    link.send("started")
    os.kill(os.getpid(), signal.SIGKILL)


def waits_for_signals(link):
    seen = []
    link.on_cancel = lambda: seen.append("cancel")
    link.on_abort = lambda: seen.append("abort")
    link.send("ready-for-signals", os.getpid())
    end = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    link.send("seen", seen)


def logs(link):
    logging.getLogger("pacsframe").warning("from the child %s", "process")
    logging.getLogger("pacsframe").debug("below the caller's level")


def sleeps(link, pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def test_messages_answers_and_the_end_arrive_in_order() -> None:
    def answer(message):
        return message[2] ** 2 if message[0] == "?" else None

    _, got = _run(squares, (), answer)
    assert [m for m in got if m[0] == "n"] == [("n", 0, 0), ("n", 1, 1), ("n", 2, 4)]
    assert got[-1] == ("ended",)


def test_a_crash_in_the_child_is_reported_with_its_class() -> None:
    _, got = _run(crashes)
    crashed = [m for m in got if m[0] == "crashed"]
    assert len(crashed) == 1
    exc = workers.restore(crashed[0][1])
    assert isinstance(exc, AssociationError) and exc.reason == "aborted"
    assert got[-1] == ("ended",)


def test_a_child_killed_outright_still_ends_the_worker() -> None:
    _, got = _run(killed)
    assert got == [("started",), ("ended",)]


def test_cancel_and_abort_reach_the_child_as_flags_and_sigint_is_ignored() -> None:
    got: list[tuple] = []

    def parent(message):
        got.append(message)
        if message[0] == "ready-for-signals":
            os.kill(message[1], signal.SIGINT)  # Ctrl-C in a terminal reaches children too
            worker.cancel()
            time.sleep(0.2)
            worker.abort()

    worker = workers.ProcessWorker("test-worker", waits_for_signals, (), parent)
    worker.cancel()  # before the child could take it: held until it is ready
    worker.start()
    worker.join(60)
    assert ("seen", ["cancel", "cancel", "abort"]) in got or ("seen", ["cancel", "abort"]) in got
    assert got[-1] == ("ended",)


def test_log_records_of_the_child_reach_the_parents_handlers(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pacsframe"):
        _run(logs)
    records = [r for r in caplog.records if r.name == "pacsframe"]
    assert [r.getMessage() for r in records] == ["from the child process"]
    assert records[0].process != os.getpid()


def test_children_die_with_their_caller(tmp_path: Path) -> None:
    """A caller killed outright must not leave its workers running behind its back."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pacsframe import workers
        from test_workers import sleeps

        worker = workers.ProcessWorker("orphan", sleeps, ({str(pid_file)!r},), print)
        worker.start()
        for _ in range(3000):
            if os.path.exists({str(pid_file)!r}):
                break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], timeout=120, check=False)
    assert process.returncode == -signal.SIGKILL
    child = int(pid_file.read_text())
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its killed caller")


def test_a_script_without_a_main_guard_still_gets_in_parallel(demo_server, tmp_path):
    """The worker server never re-runs the caller's script (multiprocessing's spawn
    and forkserver would, and a script without a __main__ guard would recurse)."""
    script = tmp_path / "fetch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import pacsframe as pf

            pacs = pf.PACS("127.0.0.1", {demo_server.port}, {demo_server.ae_title!r},
                           cache={str(tmp_path / "cache")!r})
            series = pacs.find_series(pacs.find_studies().iloc[:1])
            result = pacs.get(series, workers=2, progress=False)
            print("RESULT", result.completed, result.failed, len(series))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 1, done.stdout
    _, completed, failed, n_series = lines[0].split()
    assert int(completed) > 0 and int(failed) == 0 and int(n_series) >= 2


# --- C-GET over worker processes ------------------------------------------------------


@pytest.fixture
def two_series(demo_server, tmp_path):
    """A client with its own cache and a frame of two series of the demo cohort."""
    client = pf.PACS(
        "127.0.0.1",
        demo_server.port,
        demo_server.ae_title,
        calling_ae="PF-WORKERS",
        cache=tmp_path / "cache",
    )
    series = client.find_series(client.find_studies().iloc[:1])
    assert len(series) >= 2
    return client, series


def test_get_over_processes_files_everything_and_reports_in_the_parent(two_series, caplog):
    client, series = two_series
    expected = int(series.NumberOfSeriesRelatedInstances.sum())
    calls: list[tuple[int, str]] = []

    def on_received(path, meta):
        calls.append((os.getpid(), threading.current_thread().name))
        assert Path(path).is_file()

    with caplog.at_level(logging.DEBUG, logger="pacsframe"):
        result = client.get(series, workers=2, progress=False, on_received=on_received)
    assert result.completed == expected and result.failed == 0
    assert len(calls) == expected
    assert {pid for pid, _ in calls} == {os.getpid()}  # the caller's process
    # The associations ran in other processes, whose log records reached us.
    assert any(r.process != os.getpid() for r in caplog.records)
    assert len(client.cache) == expected
    assert client.cache.verify().empty
    again = client.get(series, workers=2, progress=False)
    assert again.cached == expected and again.requests == 0


def test_threads_instead_of_processes_when_asked(two_series, monkeypatch, caplog):
    monkeypatch.setenv(workers.ENV_VAR, "0")
    assert not workers.available()
    client, series = two_series
    with caplog.at_level(logging.DEBUG, logger="pacsframe"):
        result = client.get(series, workers=2, progress=False)
    assert result.failed == 0 and result.completed > 0
    assert all(r.process == os.getpid() for r in caplog.records)


def test_on_received_raising_in_the_parent_stops_every_process(two_series):
    client, series = two_series

    class Stop(Exception):
        pass

    seen = []

    def on_received(path, meta):
        seen.append(path)
        raise Stop("enough")

    with pytest.raises(Stop):
        client.get(series, workers=2, progress=False, on_received=on_received)
    assert len(seen) == 1  # called once, then the retrieval stopped
    # What arrived is whole and indexed; a re-run fetches the rest.
    assert client.cache.verify().empty
    rest = client.get(series, workers=2, progress=False)
    assert rest.failed == 0
    assert rest.cached + rest.completed == int(series.NumberOfSeriesRelatedInstances.sum())


def test_a_worker_server_that_cannot_start_means_threads(two_series, monkeypatch, caplog):
    """When no worker process can start, each association runs in a thread instead."""

    def refuse(*args, **kwargs):
        raise OSError("the pacsframe worker server is gone (test)")

    monkeypatch.setattr(workers._Server, "launch", refuse)
    client, series = two_series
    with caplog.at_level(logging.WARNING, logger="pacsframe"):
        result = client.get(series, workers=2, progress=False)
    assert result.failed == 0
    assert result.completed == int(series.NumberOfSeriesRelatedInstances.sum())
    assert any("runs in a thread" in r.getMessage() for r in caplog.records)
