"""storage.StorageSCP on pacsframe's own engine: objects stream into the cache."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

import pacsframe as pf
from pacsframe import net
from pacsframe.demo import make_cohort
from pacsframe.errors import AssociationError
from pacsframe.net.operations import read_part10
from pacsframe.retrieve import _Receiver
from pacsframe.storage import StorageSCP


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    manifest = make_cohort(
        tmp_path_factory.mktemp("src"),
        patients=1,
        matrix=16,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=3,
    )
    return list(manifest.path)


def _scp(tmp_path):
    pacs = pf.PACS(
        "127.0.0.1", 1, "PEER", calling_ae="PFSCPTEST", cache=pf.Cache(tmp_path / "cache")
    )
    receiver = _Receiver(pacs.cache, overwrite=False, on_received=None, bar=None)
    return pacs, receiver, StorageSCP(pacs, receiver.writer)


def _contexts(paths):
    pairs = {}
    for path in paths:
        part10 = read_part10(path)
        pairs.setdefault(part10.sop_class_uid, set()).add(part10.transfer_syntax)
    verification = ("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
    return [verification, *((cls, sorted(syntaxes)) for cls, syntaxes in pairs.items())]


def test_objects_stored_to_our_scp_are_filed_by_the_receiver(tmp_path, files):
    pacs, receiver, scp = _scp(tmp_path)
    scp.start()
    try:
        assert scp.address == ("127.0.0.1", pacs.scp_port)
        with net.associate(
            "127.0.0.1",
            pacs.scp_port,
            called_ae="PFSCPTEST",
            calling_ae="PEER",
            contexts=_contexts(files),
        ) as assoc:
            assert [assoc.store(path) for path in files] == [0, 0, 0]
            assert assoc.echo() == 0
    finally:
        scp.stop()
        scp.stop()  # twice is fine
    assert [row["status"] for row in receiver.rows] == ["completed"] * 3
    assert [refused for _, refused in receiver.arrivals] == [False] * 3
    cached = pacs.cache.instances()
    assert sorted(cached.SOPInstanceUID) == sorted(read_part10(p).sop_instance_uid for p in files)
    for path in files:
        data = Path(path).read_bytes()
        sop = read_part10(path).sop_instance_uid
        filed = Path(next(r["path"] for r in receiver.rows if r["SOPInstanceUID"] == sop))
        # The same data set bytes after the file meta.
        assert filed.read_bytes().endswith(data[read_part10(path).dataset_offset :])
    pacs.cache.close()


def test_our_scp_answers_only_to_its_own_ae_title(tmp_path, files):
    pacs, receiver, scp = _scp(tmp_path)
    with pytest.raises(AssociationError, match="rejected"):
        scp.start()
        try:
            with net.associate(
                "127.0.0.1", pacs.scp_port, called_ae="SOMEONE", contexts=_contexts(files)
            ):
                pass
        finally:
            scp.stop()
    assert receiver.rows == []
    pacs.cache.close()


def test_a_taken_port_is_an_association_error_that_says_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pacs = pf.PACS("127.0.0.1", 1, "PEER", scp_port=taken.getsockname()[1])
        with pytest.raises(AssociationError, match="Choose a free scp_port"):
            StorageSCP(pacs, lambda request: None).start()  # type: ignore[arg-type,return-value]


def test_stop_is_prompt_and_cuts_an_object_in_flight_without_a_trace(tmp_path, files):
    pacs, receiver, scp = _scp(tmp_path)
    scp.start()
    conn = socket.create_connection(("127.0.0.1", pacs.scp_port))
    try:
        time.sleep(0.1)  # connected, saying nothing
        started = time.monotonic()
        stopper = threading.Thread(target=scp.stop)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive() and time.monotonic() - started < 1.0
    finally:
        conn.close()
    assert receiver.rows == [] and list(pacs.cache.root.rglob("*.part")) == []
    pacs.cache.close()
