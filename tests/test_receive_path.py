"""The C-STORE receive path: file meta encoded as pynetdicom does, dataset filed as sent."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from pacsframe.cache import Cache, part10_head
from pacsframe.demo import make_cohort
from pacsframe.errors import CacheError
from pacsframe.net.operations import StoreRequest, read_part10
from pacsframe.retrieve import _Receiver


@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", "1.2.840.10008.5.1.4.1.1.2", "9" * 64])
@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.70"]
)
def test_file_meta_is_byte_for_byte_what_pynetdicom_writes(sop, syntax):
    meta = create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop, transfer_syntax=syntax
    )
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_head("1.2.840.10008.5.1.4.1.1.2", sop, str(syntax)) == expected


@pytest.mark.parametrize("bad", ["", "1.2.3 ", "1.2.\u00e93", "1" * 65])
def test_file_meta_of_odd_values_is_left_to_pydicom(bad):
    assert part10_head("1.2.3", bad, ExplicitVRLittleEndian) is None


def test_a_received_dataset_is_filed_as_sent(tmp_path):
    row = make_cohort(
        tmp_path / "src",
        patients=1,
        matrix=16,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=1,
    ).iloc[0]
    data = Path(row.path).read_bytes()
    ds = dcmread(row.path)
    buffer = io.BytesIO()
    write_file_meta_info(buffer, ds.file_meta)
    dataset = io.BytesIO(data[128 + 4 + len(buffer.getvalue()) :])
    syntax = str(ds.file_meta.TransferSyntaxUID)
    head = part10_head(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    cache = Cache(tmp_path / "cache")
    path, header = cache.add_received(head, dataset, syntax)
    assert path.read_bytes() == head + dataset.getvalue()
    assert header["SOPInstanceUID"] == row.SOPInstanceUID
    assert cache.verify().empty
    assert cache.instances().SOPInstanceUID.tolist() == [row.SOPInstanceUID]
    # A second copy is not written again.
    before = path.stat().st_mtime_ns
    assert cache.add_received(head, dataset, syntax)[0] == path
    assert path.stat().st_mtime_ns == before
    cache.close()


@pytest.mark.parametrize("junk", [b"\xff" * 11, b"\x08\x00\x18\x00UI\x40\x00" + b"1" * 10])
def test_a_received_dataset_that_cannot_be_read_fails_as_add_does_and_writes_nothing(
    tmp_path, junk
):
    head = part10_head("1.2.840.10008.5.1.4.1.1.2", "1.2.3", ExplicitVRLittleEndian)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(CacheError, match="refused"):
        cache.add(head + junk)
    with pytest.raises(CacheError, match="refused"):
        cache.add_received(head, io.BytesIO(junk), ExplicitVRLittleEndian)
    assert [p for p in cache.root.rglob("*") if p.suffix in (".dcm", ".part")] == []
    cache.close()


# --- _Receiver.writer: the receiver's books over Cache.receive ---------------------------


def _sample(tmp_path):
    row = make_cohort(
        tmp_path / "src",
        patients=1,
        matrix=16,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=1,
    ).iloc[0]
    part10 = read_part10(row.path)
    data = Path(row.path).read_bytes()[part10.dataset_offset :]
    request = StoreRequest(
        part10.sop_class_uid, part10.sop_instance_uid, part10.transfer_syntax, 1
    )
    return row, request, data


class _Bar:
    def __init__(self):
        self.n = 0
        self.postfix = ""

    def update(self, n):
        self.n += n

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


def _deliver(receiver, request, data, cuts=(1, 100, 101)):
    writer = receiver.writer(request)
    view = memoryview(data)
    start = 0
    for cut in [*cuts, len(data)]:
        writer.write(view[start:cut])
        start = cut
    return writer.commit()


def test_the_receivers_writer_files_counts_and_reports_as_its_event_handler(tmp_path):
    row, request, data = _sample(tmp_path)
    cache = Cache(tmp_path / "cache")
    seen = []
    bar = _Bar()
    receiver = _Receiver(
        cache, overwrite=False, on_received=lambda p, m: seen.append((p, m)), bar=bar
    )
    assert _deliver(receiver, request, data) == 0x0000
    [filed] = receiver.rows
    assert filed["status"] == "completed" and filed["SOPInstanceUID"] == row.SOPInstanceUID
    assert filed["StudyInstanceUID"] == row.StudyInstanceUID
    assert Path(filed["path"]).read_bytes().endswith(data)
    assert receiver.arrivals == [(row.SOPInstanceUID, False)]
    assert bar.n == 1 and "MB/s" in bar.postfix
    assert receiver.bytes == Path(filed["path"]).stat().st_size
    [(path, meta)] = seen
    assert path == filed["path"] and meta["TransferSyntaxUID"] == request.transfer_syntax
    assert meta["size"] == receiver.bytes
    # Sent twice in one retrieval: one row, one count, a success for the peer.
    assert _deliver(receiver, request, data) == 0x0000
    assert len(receiver.rows) == 1 and bar.n == 1 and len(seen) == 1
    assert receiver.arrivals[-1] == (row.SOPInstanceUID, False)
    cache.close()


def test_the_receivers_writer_refuses_what_the_cache_refuses_with_0xC000(tmp_path):
    head = part10_head("1.2.840.10008.5.1.4.1.1.2", "1.2.3", ExplicitVRLittleEndian)
    assert head is not None
    cache = Cache(tmp_path / "cache")
    receiver = _Receiver(cache, overwrite=False, on_received=None, bar=None)
    request = StoreRequest("1.2.840.10008.5.1.4.1.1.2", "1.2.3", ExplicitVRLittleEndian, 1)
    assert _deliver(receiver, request, b"\xff" * 11, cuts=(3,)) == 0xC000
    [failed] = receiver.rows
    assert failed["status"] == "failed" and failed["SOPInstanceUID"] == "1.2.3"
    assert failed["error"].startswith("refused")
    assert receiver.arrivals == [("1.2.3", True)]
    assert [p for p in cache.root.rglob("*") if not p.name.startswith("index")] == []
    cache.close()


def test_the_receivers_writer_answers_0xC001_when_the_cache_cannot_be_written(tmp_path):
    _, request, data = _sample(tmp_path)
    root = tmp_path / "not-a-folder"
    root.write_bytes(b"")
    receiver = _Receiver(Cache(root), overwrite=False, on_received=None, bar=None)
    assert _deliver(receiver, request, data) == 0xC001
    [failed] = receiver.rows
    assert failed["error"].startswith("could not be stored")
    assert receiver.arrivals == [(request.sop_instance_uid, True)]


def test_the_receivers_writer_leaves_no_trace_of_an_object_cut_short(tmp_path):
    _, request, data = _sample(tmp_path)
    cache = Cache(tmp_path / "cache")
    receiver = _Receiver(cache, overwrite=False, on_received=None, bar=None)
    writer = receiver.writer(request)
    writer.write(memoryview(data)[:500])
    writer.discard()
    assert receiver.rows == [] and receiver.arrivals == []
    assert list(cache.root.rglob("*.part")) == [] and len(cache) == 0
    cache.close()


def test_the_receivers_writer_keeps_cached_copies_of_units_requested_again(tmp_path):
    row, request, data = _sample(tmp_path)
    cache = Cache(tmp_path / "cache")
    path = cache.add(Path(row.path).read_bytes())[0]
    before = path.stat().st_mtime_ns
    receiver = _Receiver(
        cache, overwrite=False, on_received=None, bar=None, again={row.SOPInstanceUID}
    )
    assert _deliver(receiver, request, data) == 0x0000
    assert receiver.rows == [] and path.stat().st_mtime_ns == before
    assert receiver.arrivals == [(row.SOPInstanceUID, False)]
    cache.close()


def test_an_on_received_that_raises_stops_the_retrieval_with_the_object_cached(tmp_path):
    _, request, data = _sample(tmp_path)
    cache = Cache(tmp_path / "cache")

    def boom(path, meta):
        raise KeyboardInterrupt

    receiver = _Receiver(cache, overwrite=False, on_received=boom, bar=None)
    assert _deliver(receiver, request, data) == 0x0000
    assert isinstance(receiver.error, KeyboardInterrupt) and receiver.stop.is_set()
    assert len(cache) == 1
    cache.close()
