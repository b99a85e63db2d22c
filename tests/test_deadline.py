"""An overall ``timeout=`` on every call, against peers that answer slowly for ever.

A peer that sends each C-FIND match or C-GET/C-MOVE sub-operation just inside
``dimse_timeout`` never trips it; ``timeout=`` bounds the whole call. When it runs
out the call cancels (or aborts), keeps what it obtained, raises
``AssociationError(reason="timeout")`` with the partial result attached, and leaves
no thread, socket or storage SCP behind. Peers are real DICOM servers on loopback:
:class:`faults.FaultyPACS` and, for C-ECHO and C-STORE, :class:`HungPeer`.

Timing is never asserted tightly (the machine may be loaded): a call must end well
within ``timeout`` plus a generous margin, and the outcome is what is checked.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from faults import Faults, FaultyPACS
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from servers import free_port
from test_faults import Watch, client, resumes
from test_network_errors import silent_peer  # noqa: F401 (a fixture)

import pacsframe as pf
from pacsframe.cli import main
from pacsframe.demo import make_cohort

# The overall limit of every limited call here. Long enough that the FAST part of an
# answer (and the association, planning and storage SCP before it) arrives within it
# on a loaded 2-core machine; the slow rest of each answer takes well over it.
TIMEOUT = 5.0
MARGIN = 20.0  # a limited call ends within TIMEOUT + MARGIN, however loaded the machine
# Seconds per match or sub-operation: far inside dimse_timeout, and slow enough that a
# 12-row answer or 12-object series (10 s) takes twice TIMEOUT. At 0.5 s one took
# exactly TIMEOUT, and pacsframe's own engine sometimes finished it in time.
SLOW = 1.0
FAST = 2  # matches or objects per answer sent at once, before the slow ones


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One patient, one study, two series of 12 instances: answers long enough to be slow."""
    folder = tmp_path_factory.mktemp("served")
    manifest = make_cohort(
        folder,
        patients=1,
        seed=71,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=12,
        matrix=8,
    )
    return folder, manifest


@pytest.fixture
def env(served, tmp_path):
    """server, manifest, pacs (dimse_timeout far above SLOW), watch, studies, series."""
    server = FaultyPACS(served[0]).start()
    root = tmp_path / "cache"
    pacs = client(server, root)
    pacs.dimse_timeout = 5.0
    studies = pacs.find_studies()
    series = pacs.find_series(studies)
    watch = Watch(server, tmp_path, root)
    yield SimpleNamespace(
        server=server, manifest=served[1], pacs=pacs, watch=watch, studies=studies, series=series
    )
    server.unblock()
    server.stop()


def _slow_after_fast(n: int, ds):
    """The first FAST of each answer at once, then one every SLOW seconds."""
    if n >= FAST:
        time.sleep(SLOW)
    return ds


def limited(call):
    """Run ``call``; it must raise the deadline's AssociationError, in reasonable time."""
    started = time.monotonic()
    with pytest.raises(pf.AssociationError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + MARGIN, f"the call took {elapsed:.1f} s"
    exc = info.value
    assert exc.reason == "timeout", exc
    assert f"timeout={TIMEOUT:g} s" in str(exc)
    return exc


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, "5", True, float("nan"), float("inf")])
@pytest.mark.parametrize("call", ["echo", "find_studies", "find", "get", "move", "store"])
def test_a_bad_timeout_fails_before_anything_is_sent(call, bad, tmp_path):
    # Nothing listens on this port: a QueryError proves nothing was attempted.
    pacs = pf.PACS("127.0.0.1", free_port(), "NOBODY", cache=tmp_path)
    calls = {
        "echo": lambda: pacs.echo(timeout=bad),
        "find_studies": lambda: pacs.find_studies(timeout=bad),
        "find": lambda: pacs.find("series", ["1.2.3"], timeout=bad),
        "get": lambda: pacs.get(["1.2.3"], progress=False, timeout=bad),
        "move": lambda: pacs.move(["1.2.3"], progress=False, timeout=bad),
        "store": lambda: pacs.store([], timeout=bad),
    }
    with pytest.raises(pf.QueryError, match="must be a positive number of seconds"):
        calls[call]()


def test_a_call_that_finishes_in_time_is_unchanged(env):
    pacs, watch = env.pacs, env.watch
    found = pacs.find_instances(env.series, timeout=60)
    assert sorted(found.SOPInstanceUID) == sorted(env.manifest.SOPInstanceUID)
    assert found.equals(pacs.find_instances(env.series))
    assert pacs.echo(timeout=60) >= 0
    result = pacs.get(env.studies, progress=False, timeout=60)
    assert result.completed == len(env.manifest)
    watch.released(pacs)


# --- C-FIND ----------------------------------------------------------------------------------


def test_find_answered_slowly_for_ever_stops_with_the_rows_so_far(env):
    server, pacs, watch = env.server, env.pacs, env.watch
    whole = pacs.find_instances(env.series)
    server.faults = Faults(identifier=_slow_after_fast)
    exc = limited(lambda: pacs.find_instances(env.series, timeout=TIMEOUT))
    message = str(exc)
    assert "pacs.find_instances() did not finish" in message
    assert "cancelled the IMAGE-level C-FIND in progress (C-CANCEL)" in message
    assert ".partial" in message and "raise timeout=" in message
    partial = exc.partial
    # Typed as the whole answer, parents' columns carried, rows as sent, no duplicate.
    assert partial.dtypes.equals(whole.dtypes)
    assert FAST <= len(partial) < len(whole)
    assert partial.SOPInstanceUID.is_unique
    rows = whole.set_index("SOPInstanceUID").loc[partial.SOPInstanceUID].reset_index()
    assert partial[whole.columns].equals(rows[whole.columns])
    assert partial.attrs["pacsframe"]["partial"] is True
    watch.released(pacs)


def test_a_find_cancelled_in_a_block_leaves_the_association_usable(env, monkeypatch):
    """The peer ended the C-FIND after our C-CANCEL: the held association goes on."""
    server, pacs, watch = env.server, env.pacs, env.watch
    whole = pacs.find_instances(env.series)
    opened = []
    original = pacs.connect

    def counting(*args, **kwargs):
        opened.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pacs, "connect", counting)
    with pacs:
        server.faults = Faults(identifier=_slow_after_fast)
        exc = limited(lambda: pacs.find_instances(env.series, timeout=TIMEOUT))
        assert "cancelled the IMAGE-level C-FIND in progress (C-CANCEL)" in str(exc)
        server.faults = Faults()
        again = pacs.find_instances(env.series)
    assert len(opened) == 1
    assert sorted(again.SOPInstanceUID) == sorted(whole.SOPInstanceUID)
    watch.released(pacs)


def test_find_drill_down_over_many_parents_shares_one_deadline(env):
    # One series' answer takes about 3 s, within the limit; the call (the series
    # of the study, then the instances of each series) takes about 6.5 s.
    server, pacs, watch = env.server, env.pacs, env.watch
    server.faults = Faults(delay=SLOW / 4)
    exc = limited(lambda: pacs.find_instances(env.studies, timeout=TIMEOUT))
    assert "pacs.find_instances() did not finish" in str(exc)
    # Instances only (none when the time ran out among the series).
    assert "SOPInstanceUID" in exc.partial.columns
    assert exc.partial.SOPInstanceUID.is_unique
    watch.released(pacs)


def test_find_from_a_peer_that_hangs_is_aborted(env):
    # The peer stops answering (and so ignores our C-CANCEL) long before dimse_timeout.
    server, pacs, watch = env.server, env.pacs, env.watch
    pacs.dimse_timeout = 60.0
    server.faults = Faults(hang_after=FAST)
    exc = limited(lambda: pacs.find_instances(env.series, timeout=TIMEOUT))
    assert server.hung.is_set()
    assert "aborted the association during the IMAGE-level C-FIND" in str(exc)
    assert len(exc.partial) == FAST
    watch.released(pacs)


def test_association_setup_is_capped_by_the_deadline(silent_peer):  # noqa: F811
    pacs = pf.PACS("127.0.0.1", silent_peer, "SILENT", acse_timeout=120)
    exc = limited(lambda: pacs.find_studies(PatientID="1", timeout=TIMEOUT))
    assert "during the association request to SILENT" in str(exc)
    assert "pacs.echo()" in str(exc)
    assert exc.partial.empty and "StudyInstanceUID" in exc.partial.columns


# --- C-GET and C-MOVE ------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "workers"), [("get", 1), ("get", 2), ("move", 1)])
def test_retrieval_answered_slowly_for_ever_keeps_what_arrived(env, served, op, workers):
    server, pacs, watch = env.server, env.pacs, env.watch
    server.faults = Faults(objects=_slow_after_fast)
    if op == "get":
        exc = limited(
            lambda: pacs.get(env.studies, progress=False, workers=workers, timeout=TIMEOUT)
        )
    else:
        exc = limited(lambda: pacs.move(env.studies, progress=False, timeout=TIMEOUT))
    message = str(exc)
    assert f"pacs.{op}() did not finish" in message
    assert f"cancelled the C-{op.upper()} in progress (C-CANCEL)" in message
    result = exc.result
    assert isinstance(result, pf.RetrieveResult)
    held = watch.cache_is_consistent()  # atomic writes only, all indexed
    done = set(result.instances.SOPInstanceUID[result.instances.status == "completed"])
    assert done == held
    assert FAST <= len(held) < len(env.manifest)
    assert result.failed == 0  # stopped, not failed: the rest was never asked for
    assert "fetches only what is missing" in message
    watch.released(pacs, moved=op == "move")
    resumes(served, watch.root, env.studies, op, held)


def test_retrieval_planning_shares_the_deadline(env):
    # Planning may list series or instances (C-FIND) to spread the work; whether the
    # time runs out there or in the C-GETs, the call ends the same way.
    server, pacs, watch = env.server, env.pacs, env.watch
    server.faults = Faults(delay=SLOW / 2)
    exc = limited(lambda: pacs.get(env.studies, progress=False, workers=4, timeout=TIMEOUT))
    assert "pacs.get() did not finish" in str(exc)
    assert isinstance(exc.result, pf.RetrieveResult)
    done = exc.result.instances.status == "completed"
    assert set(exc.result.instances.SOPInstanceUID[done]) == watch.cache_is_consistent()
    watch.released(pacs)


@pytest.mark.parametrize("op", ["get", "move"])
def test_retrieval_from_a_peer_that_hangs_is_aborted(env, op):
    server, pacs, watch = env.server, env.pacs, env.watch
    pacs.dimse_timeout = 60.0
    server.faults = Faults(hang_after=FAST)
    if op == "get":
        exc = limited(lambda: pacs.get(env.series, progress=False, workers=1, timeout=TIMEOUT))
    else:
        exc = limited(lambda: pacs.move(env.series, progress=False, timeout=TIMEOUT))
    assert server.hung.is_set()
    assert f"aborted the association during the C-{op.upper()}" in str(exc)
    held = watch.cache_is_consistent()
    assert len(held) == FAST
    assert exc.result.completed == FAST
    watch.released(pacs, moved=op == "move")  # (resuming is shown above)


# --- C-ECHO and C-STORE: a peer that never answers -----------------------------------------------


class HungPeer:
    """A DICOM peer that answers C-ECHO never, and C-STORE ``stores`` times, then never.

    Hung handlers wait for :meth:`unblock` (at most 60 s), so no thread outlives a test.
    """

    def __init__(self, stores: int = 0) -> None:
        self.stores = stores
        self.received = 0
        self.release = threading.Event()
        self.hung = threading.Event()
        ae = AE(ae_title="HUNG")
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        handlers = [(evt.EVT_C_ECHO, self._hang), (evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]
        self.ae_title = "HUNG"

    def _hang(self, event: evt.Event) -> int:
        self.hung.set()
        self.release.wait(60)
        return 0x0000

    def _store(self, event: evt.Event) -> int:
        self.received += 1
        if self.received > self.stores:
            return self._hang(event)
        return 0x0000

    def unblock(self) -> None:
        self.release.set()

    def stop(self) -> None:
        self.unblock()
        self.server.shutdown()


@pytest.fixture
def hung(tmp_path):
    peer = HungPeer(stores=FAST)
    yield peer
    peer.stop()


def test_echo_to_a_peer_that_never_answers(hung, tmp_path):
    pacs = pf.PACS("127.0.0.1", hung.port, hung.ae_title, dimse_timeout=60)
    watch = Watch(hung, tmp_path, tmp_path / "cache")
    exc = limited(lambda: pacs.echo(timeout=TIMEOUT))
    assert hung.hung.is_set()
    assert "pacs.echo() did not finish" in str(exc)
    assert "aborted the association during the C-ECHO" in str(exc)
    watch.released(pacs)


def test_store_to_a_peer_that_stops_answering(hung, served, tmp_path):
    _, manifest = served
    paths = manifest.path.iloc[:6].tolist()
    pacs = pf.PACS("127.0.0.1", hung.port, hung.ae_title, dimse_timeout=60)
    watch = Watch(hung, tmp_path, tmp_path / "cache")
    exc = limited(lambda: pacs.store(paths, timeout=TIMEOUT))
    assert hung.hung.is_set()
    assert "pacs.store() did not finish" in str(exc) and ".result" in str(exc)
    result = exc.result
    assert isinstance(result, pf.StoreResult)
    assert result.instances.path.tolist() == paths
    assert (result.completed, result.failed) == (FAST, len(paths) - FAST)
    errors = result.failed_instances.error.tolist()
    assert "no response before the call's timeout=" in errors[0]
    assert all("not sent: the call's timeout= ran out first" in e for e in errors[1:])
    watch.released(pacs)


# --- command line ------------------------------------------------------------------------------


def test_cli_deadline_is_checked_and_applied(silent_peer, capsys):  # noqa: F811
    peer = ["--peer", f"127.0.0.1:{silent_peer}", "--aet", "SILENT"]
    assert main(["echo", *peer, "--deadline", "0"]) == 2
    assert "must be a positive number of seconds" in capsys.readouterr().err
    started = time.monotonic()
    assert main(["find", *peer, "--deadline", str(TIMEOUT), "PatientID=1"]) == 2
    assert time.monotonic() - started < TIMEOUT + MARGIN
    assert "did not finish within timeout=" in capsys.readouterr().err
