"""Ctrl-C in the middle of a retrieval leaves a consistent cache; a re-run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from pynetdicom import evt

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.demo.server import handle_get

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
