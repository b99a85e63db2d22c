"""Ctrl-C in the middle of a retrieval leaves a consistent cache; a re-run resumes."""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom import evt

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.demo.server import handle_get, handle_move

HOLD_AFTER = 40  # sub-operations sent in all before the rest wait for a C-CANCEL


class HeldPACS(DemoPACS):
    """The demo PACS, sending the rest of a C-GET only once it is cancelled (or released).

    So the retrieval is still running when Ctrl-C comes, however busy the machine,
    and nothing the peer would not send after a C-CANCEL arrives late.
    """

    def start(self) -> HeldPACS:
        super().start()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        # C-GET is an intervention event: this handler replaces the plain one.
        self._server.bind(evt.EVT_C_GET, _held_get, [self])
        return self


def _held_get(event: evt.Event, server: HeldPACS):
    for item in handle_get(event, server):
        if not isinstance(item, int):  # the first item is the sub-operation count
            with server._lock:
                server._sent += 1
                held = server._sent > HOLD_AFTER
            deadline = time.monotonic() + 60
            while held and not event.is_cancelled and time.monotonic() < deadline:
                if server.release.wait(0.05):
                    break
        yield item


def test_sigint_mid_get_leaves_a_consistent_cache_and_resumes(tmp_path):
    folder = tmp_path / "served"
    manifest = make_cohort(
        folder,
        patients=1,
        seed=51,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=60,
        matrix=64,
        modalities=("CT",),
    )
    cache = tmp_path / "cache"
    with HeldPACS(folder) as server:
        command = [sys.executable, "-m", "pacsframe.cli", "get", "--peer"]
        command += [f"127.0.0.1:{server.port}", "--aet", server.ae_title, "--cache", str(cache)]
        command += ["--no-progress", "--workers", "2"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                files = list(cache.rglob("*.dcm")) if cache.exists() else []
                if len(files) >= 20:
                    break
                time.sleep(0.02)
            assert process.poll() is None, "the retrieval ended before it could be interrupted"
            process.send_signal(signal.SIGINT)
            code = process.wait(60)
        finally:
            server.release.set()
            if process.poll() is None:
                process.kill()
                process.wait()
        assert code == 130, process.stderr.read().decode()

        held = pf.Cache(cache)
        assert held.verify().empty  # no missing, truncated or stray temporary files
        have = len(held)
        assert 0 < have < len(manifest)
        assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]
        on_disk = {p.stem for p in cache.rglob("*.dcm")}
        assert on_disk == set(held.instances().SOPInstanceUID)

        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=cache)
        rest = pacs.get(pacs.find_studies(), progress=False)
        assert rest.cached == have
        assert rest.completed == len(manifest) - have
    assert os.path.exists(cache / "index.sqlite")


class HeldMovePACS(DemoPACS):
    """The demo PACS, holding a C-MOVE after ``HOLD_AFTER`` sub-operations until cancelled.

    ``holding`` is set once it holds, ``cancelled`` when it sees our C-CANCEL there.
    """

    def start(self) -> HeldMovePACS:
        super().start()
        self.release = threading.Event()
        self.holding = threading.Event()
        self.cancelled = threading.Event()
        self._sent = 0
        self._server.bind(evt.EVT_C_MOVE, _held_move, [self])
        return self


def _held_move(event: evt.Event, server: HeldMovePACS):
    for item in handle_move(event, server):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Dataset):
            server._sent += 1
            deadline = time.monotonic() + 60
            while server._sent > HOLD_AFTER and time.monotonic() < deadline:
                server.holding.set()
                if event.is_cancelled:
                    server.cancelled.set()
                    break
                if server.release.wait(0.05):
                    break
        yield item


def test_interrupt_mid_move_cancels_releases_and_resumes(tmp_path):
    # Ctrl-C in the thread that called move(): the association's own thread sends
    # C-CANCEL and releases; what arrived is cached, and a re-run fetches the rest.
    folder = tmp_path / "served"
    manifest = make_cohort(
        folder,
        patients=1,
        seed=52,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=60,
        matrix=32,
        modalities=("CT",),
    )
    cache = tmp_path / "cache"
    with HeldMovePACS(folder) as server:
        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=cache, calling_ae="HELD")
        server.add_known_ae("HELD", "127.0.0.1", pacs.scp_port)
        studies = pacs.find_studies()

        def interrupt() -> None:
            server.holding.wait(60)
            _thread.interrupt_main()

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            with pytest.raises(KeyboardInterrupt):
                pacs.move(studies, progress=False)
            assert server.cancelled.wait(10), "the peer saw no C-CANCEL"
        finally:
            server.release.set()
        held = pf.Cache(cache)
        assert held.verify().empty
        have = len(held)
        assert 0 < have < len(manifest)
        assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]
        rest = pacs.move(pacs.find_studies(), progress=False)
        assert (rest.cached, rest.completed) == (have, len(manifest) - have)
