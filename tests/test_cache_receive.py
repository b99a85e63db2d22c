"""Cache.receive: a C-STORE's data set streamed fragment by fragment into the cache."""

from __future__ import annotations

import io
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from pacsframe.cache import Cache, part10_head
from pacsframe.demo import make_cohort
from pacsframe.errors import CacheError
from pacsframe.net.operations import StoreRequest, read_part10

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A cohort file: (its bytes, where its data set starts, its meta, its frame row)."""
    row = make_cohort(
        tmp_path_factory.mktemp("src"),
        patients=1,
        matrix=16,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=1,
    ).iloc[0]
    data = Path(row.path).read_bytes()
    part10 = read_part10(row.path)
    return data[part10.dataset_offset :], part10, row


def _request(part10, syntax=None):
    return StoreRequest(
        part10.sop_class_uid, part10.sop_instance_uid, syntax or part10.transfer_syntax, 7
    )


def _encoded(ds: Dataset, syntax: str) -> bytes:
    """The data set of ``ds`` encoded in ``syntax``, without preamble or file meta."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data[read_part10(io.BytesIO(data)).dataset_offset :]


def _dataset(**values) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PF1"
    ds.Modality = "CT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _send(cache, request, dataset, cuts, **kwargs):
    writer = cache.receive(request, **kwargs)
    view = memoryview(dataset)
    start = 0
    for cut in [*cuts, len(dataset)]:
        writer.write(view[start:cut])
        start = cut
    assert writer.commit() is None
    return writer


def _leftovers(cache: Cache) -> list[str]:
    """Every file and folder in the root but the index."""
    return sorted(
        p.relative_to(cache.root).as_posix()
        for p in cache.root.rglob("*")
        if not p.name.startswith("index.sqlite")
    )


@pytest.mark.parametrize("how", ["whole", "bytes", "random", "across the header"])
def test_fragments_split_anywhere_file_the_object_as_sent(tmp_path, sample, how):
    dataset, part10, row = sample
    if how == "whole":
        cuts: list[int] = []
    elif how == "bytes":
        cuts = list(range(1, len(dataset)))
    elif how == "random":
        cuts = sorted(random.Random(3).sample(range(1, len(dataset)), 40))
    else:
        cuts = [1, 7, 8, 9, 131, 132, 300, 301]  # inside tags, lengths and values
    cache = Cache(tmp_path / "cache")
    writer = _send(cache, _request(part10), dataset, cuts)
    head = part10_head(part10.sop_class_uid, part10.sop_instance_uid, part10.transfer_syntax)
    assert writer.path.read_bytes() == head + dataset
    assert writer.path == cache.path_for(
        row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID
    )
    assert writer.written and writer.size == len(head) + len(dataset)
    assert writer.header["PatientID"] == row.PatientID
    frame = cache.instances()
    assert frame.SOPInstanceUID.tolist() == [row.SOPInstanceUID]
    assert int(frame["size"].iloc[0]) == len(head) + len(dataset)
    # Indexed exactly as add_received indexes the same object.
    other = Cache(tmp_path / "other")
    other.add_received(head, io.BytesIO(dataset), part10.transfer_syntax)
    assert (
        frame.drop(columns=["path", "stored_at"])
        .compare(other.instances().drop(columns=["path", "stored_at"]))
        .empty
    )
    assert cache.verify().empty
    assert [p.name for p in cache.root.glob(".*.part")] == []
    cache.close()
    other.close()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_big_object_streams_with_bounded_memory(tmp_path, syntax):
    ds = _dataset(Rows=2048, Columns=4096, BitsAllocated=16, BitsStored=16, HighBit=15)
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(2048 * 4096 * 2)  # 16 MiB
    dataset = _encoded(ds, syntax)
    request = StoreRequest(CT, ds.SOPInstanceUID, syntax, 1)
    del ds
    cache = Cache(tmp_path / "cache")
    cache.instances()  # the index exists: its setup is not the object's memory
    view = memoryview(dataset)
    tracemalloc.start()
    try:
        writer = cache.receive(request)
        for start in range(0, len(dataset), 16372):  # a P-DATA-TF's worth at a time
            writer.write(view[start : start + 16372])
        writer.commit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for a {len(dataset)}-byte object"
    assert writer.path.stat().st_size == writer.size > len(dataset)
    assert len(cache) == 1
    cache.close()


@pytest.mark.parametrize("where", ["at the kept bytes' end", "past them"])
def test_a_header_longer_than_the_kept_bytes_is_read_back_from_the_file(tmp_path, where):
    ds = _dataset(PatientComments="xx")
    # (0010,4000) Patient Comments, LT: sorted before the Study and Series UIDs. Sized
    # so the 64 KiB kept end exactly after it (a scan of them finds no UIDs and no
    # error), or in the middle of a long one.
    start = _encoded(ds, ExplicitVRLittleEndian).index(b"\x10\x00\x00\x40LT") + 8
    padding = (1 << 16) - start if where == "at the kept bytes' end" else 100_000
    ds.PatientComments = "x" * padding
    dataset = _encoded(ds, ExplicitVRLittleEndian)
    cache = Cache(tmp_path / "cache")
    request = StoreRequest(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, 1)
    if where == "at the kept bytes' end":
        assert dataset[1 << 16 : (1 << 16) + 4] == b"\x20\x00\x0d\x00"  # StudyInstanceUID
    writer = _send(cache, request, dataset, [5000, 70_000])
    assert writer.path == cache.path_for(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert writer.header["StudyInstanceUID"] == ds.StudyInstanceUID
    assert cache.instances().SeriesInstanceUID.tolist() == [ds.SeriesInstanceUID]
    cache.close()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_a_path_like_uid_is_refused_as_write_refuses_it_and_nothing_stays(tmp_path, keyword):
    ds = _dataset(**{keyword: "../../x"})
    dataset = _encoded(ds, ExplicitVRLittleEndian)
    cache = Cache(tmp_path / "cache")
    writer = cache.receive(StoreRequest(CT, "1.2.3", ExplicitVRLittleEndian, 1))
    writer.write(memoryview(dataset))
    with pytest.raises(CacheError) as caught:
        writer.commit()
    assert str(caught.value) == (
        f"refused to write into the cache: {keyword} '../../x' is not a valid UID (digits "
        "and dots, at most 64 characters); nothing was written."
    )
    writer.discard()  # what a driver may do after a failed commit: harmless
    assert _leftovers(cache) == []
    assert len(cache) == 0
    cache.close()


@pytest.mark.parametrize("junk", [b"\xff" * 11, b"\x08\x00\x18\x00UI\x40\x00" + b"1" * 10])
def test_a_data_set_that_cannot_be_read_is_refused_as_add_received_refuses_it(tmp_path, junk):
    head = part10_head(CT, "1.2.3", ExplicitVRLittleEndian)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(CacheError) as expected:
        cache.add_received(head, io.BytesIO(junk), ExplicitVRLittleEndian)
    writer = cache.receive(StoreRequest(CT, "1.2.3", ExplicitVRLittleEndian, 1))
    writer.write(junk)
    with pytest.raises(CacheError) as caught:
        writer.commit()
    assert str(caught.value) == str(expected.value)
    assert _leftovers(cache) == []
    cache.close()


def test_discard_leaves_no_trace_and_verify_spares_a_live_writer(tmp_path, sample):
    dataset, part10, _ = sample
    cache = Cache(tmp_path / "cache")
    writer = cache.receive(_request(part10))
    writer.write(memoryview(dataset)[:100])
    assert len(list(cache.root.glob(".*.part"))) == 1
    assert cache.verify().empty  # being written: left alone
    assert len(list(cache.root.glob(".*.part"))) == 1
    writer.discard()
    writer.discard()
    assert _leftovers(cache) == []
    with pytest.raises(CacheError, match="already"):
        writer.write(b"x")
    with pytest.raises(CacheError, match="already"):
        writer.commit()
    assert len(cache) == 0
    cache.close()


def test_verify_removes_a_received_objects_stray_temporary_file(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.instances()
    stray = cache.root / ".1.2.3.0000abcd-1-0123456789abcdef.part"
    stray.write_bytes(b"x")
    os.utime(stray, (0, 0))  # untouched for decades
    problems = cache.verify()
    assert problems.problem.tolist() == ["stray temporary file"]
    assert not stray.exists()
    cache.close()


def test_an_object_already_cached_is_kept_unless_overwrite(tmp_path, sample):
    dataset, part10, _ = sample
    cache = Cache(tmp_path / "cache")
    first = _send(cache, _request(part10), dataset, [10])
    before = (first.path.stat().st_mtime_ns, first.path.stat().st_ino)
    again = _send(cache, _request(part10), dataset, [20])
    assert again.path == first.path and not again.written
    assert (first.path.stat().st_mtime_ns, first.path.stat().st_ino) == before
    relative = first.path.relative_to(cache.root)
    assert _leftovers(cache) == [
        relative.parent.parent.as_posix(),
        relative.parent.as_posix(),
        relative.as_posix(),
    ]
    replaced = _send(cache, _request(part10), dataset, [30], overwrite=True)
    assert replaced.written and replaced.path == first.path
    assert replaced.path.stat().st_ino != before[1]
    assert len(cache) == 1 and cache.verify().empty
    cache.close()


def test_a_deflated_object_goes_through_the_whole_file_path(tmp_path):
    ds = _dataset(ImageComments="deflate me " * 200)
    dataset = _encoded(ds, DeflatedExplicitVRLittleEndian)
    cache = Cache(tmp_path / "cache")
    request = StoreRequest(CT, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, 1)
    writer = _send(cache, request, dataset, [1, 2, 50])
    assert writer.path.read_bytes().endswith(dataset)
    read = dcmread(writer.path)
    assert read.ImageComments.startswith("deflate me")
    frame = cache.instances()
    assert frame.TransferSyntaxUID.tolist() == [DeflatedExplicitVRLittleEndian]
    assert frame.StudyInstanceUID.tolist() == [ds.StudyInstanceUID]
    cache.close()


@pytest.mark.parametrize("sop", ["1.2.3 ", "1.2.\u00e93"])
def test_odd_request_uids_get_the_file_meta_pynetdicom_wrote(tmp_path, sample, sop):
    dataset, part10, row = sample
    cache = Cache(tmp_path / "cache")
    request = StoreRequest(part10.sop_class_uid, sop, part10.transfer_syntax, 1)
    writer = _send(cache, request, dataset, [3])
    meta = create_file_meta(
        sop_class_uid=part10.sop_class_uid,
        sop_instance_uid=sop,
        transfer_syntax=part10.transfer_syntax,
    )
    assert writer.path.read_bytes() == b"\0" * 128 + b"DICM" + encode_file_meta(meta) + dataset
    assert dcmread(writer.path).SOPInstanceUID == row.SOPInstanceUID
    cache.close()


def test_an_empty_request_uid_still_files_the_object_under_its_header(tmp_path, sample):
    dataset, part10, row = sample
    cache = Cache(tmp_path / "cache")
    request = StoreRequest(part10.sop_class_uid, "", part10.transfer_syntax, 1)
    writer = _send(cache, request, dataset, [3])
    assert dcmread(writer.path).SOPInstanceUID == row.SOPInstanceUID
    cache.close()


def _big(tmp_path):
    ds = _dataset(Rows=256, Columns=512, BitsAllocated=16, BitsStored=16, HighBit=15)
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(256 * 512 * 2)
    return ds, _encoded(ds, ExplicitVRLittleEndian)


def test_the_rest_of_an_object_already_cached_never_touches_the_disk(tmp_path):
    ds, dataset = _big(tmp_path)
    request = StoreRequest(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, 1)
    cache = Cache(tmp_path / "cache")
    first = _send(cache, request, dataset, [70_000])
    before = first.path.stat()
    writer = cache.receive(request)
    view = memoryview(dataset)
    for start in range(0, len(dataset), 16_000):
        writer.write(view[start : start + 16_000])
        if start >= 1 << 16:  # the header is in: nothing more is written
            assert list(cache.root.glob(".*.part")) == []
    writer.commit()
    assert writer.path == first.path and not writer.written
    assert writer.size == first.size and writer.header["SOPInstanceUID"] == ds.SOPInstanceUID
    after = first.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # With overwrite, it is written again, whole.
    again = _send(cache, request, dataset, [70_000], overwrite=True)
    assert again.written and again.path.read_bytes().endswith(dataset)
    assert again.path.stat().st_ino != before.st_ino
    assert len(cache) == 1 and cache.verify().empty
    cache.close()


def test_a_cached_copy_removed_while_the_object_arrives_again_fails_the_object(tmp_path):
    ds, dataset = _big(tmp_path)
    request = StoreRequest(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, 1)
    cache = Cache(tmp_path / "cache")
    first = _send(cache, request, dataset, [])
    writer = cache.receive(request)
    writer.write(memoryview(dataset)[:100_000])
    first.path.unlink()
    writer.write(memoryview(dataset)[100_000:])
    with pytest.raises(FileNotFoundError, match="retrieve it again"):
        writer.commit()
    assert list(cache.root.rglob("*.part")) == []
    cache.close()


def test_a_temporary_file_that_cannot_be_made_raises_its_os_error(tmp_path, monkeypatch):
    import pacsframe.cache as cache_module

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    cache = Cache(tmp_path / "cache")
    monkeypatch.setattr(cache_module.os, "open", no_space)
    with pytest.raises(OSError, match="No space left"):
        cache.receive(StoreRequest("1.2.3", "1.2.3.4", ExplicitVRLittleEndian, 1))
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "cache").glob(".*.part")]
    cache.close()


def _big_dataset() -> bytes:
    """A data set of about 300 kB: its pixel data spans several large fragments."""
    ds = _dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 300, 500, 16, 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = random.Random(5).randbytes(300 * 500 * 2)
    return _encoded(ds, ExplicitVRLittleEndian)


def test_small_and_large_fragments_mixed_file_the_bytes_as_sent(tmp_path):
    # Fragments under 64 KiB go through the write buffer (16 KiB PDVs), larger ones
    # straight to the kernel (a WADO-RS part's piece of a read): in any mix, in order.
    dataset = _big_dataset()
    sizes = [10, 70_000, 100, 3, 200_000, 1, 65_536, 65_535]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    cuts = [end for end in ends if end < len(dataset)]
    sop = dcmread(
        io.BytesIO(part10_head(CT, "1.2", ExplicitVRLittleEndian) + dataset)
    ).SOPInstanceUID
    cache = Cache(tmp_path / "cache")
    writer = _send(cache, StoreRequest(CT, sop, ExplicitVRLittleEndian, 1), dataset, cuts)
    head = part10_head(CT, sop, ExplicitVRLittleEndian)
    same = writer.path.read_bytes() == head + dataset  # (no diff of 300 kB on failure)
    assert same, "the cached file differs from the bytes sent"
    assert writer.size == len(head) + len(dataset)
    assert cache.verify().empty
    cache.close()


def _same_series(n: int) -> list[tuple[StoreRequest, bytes]]:
    study, series = generate_uid(), generate_uid()
    out = []
    for _ in range(n):
        ds = _dataset(StudyInstanceUID=study, SeriesInstanceUID=series)
        out.append(
            (
                StoreRequest(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, 1),
                _encoded(ds, ExplicitVRLittleEndian),
            )
        )
    return out


def test_batched_rows_are_held_then_committed_together(tmp_path, monkeypatch):
    from pacsframe import cache as cache_module

    monkeypatch.setattr(cache_module, "_BATCH_ROWS", 3)
    cache, other = Cache(tmp_path / "c"), Cache(tmp_path / "c")  # other: another connection
    objects = _same_series(5)
    with cache._batched():
        first = _send(cache, *objects[0], [])
        _send(cache, *objects[1], [])
        # Held: this thread sees them (an object arriving again keeps its copy), the
        # index does not have them yet, and a batch not full is not committed.
        assert cache._existing(objects[0][0].sop_instance_uid) is not None
        again = _send(cache, *objects[0], [])
        assert not again.written and again.path == first.path
        cache._flush_rows(full=True)
        assert other.instances().empty
        _send(cache, *objects[2], [])
        cache._flush_rows(full=True)  # three held: committed in one transaction
        assert len(other.instances()) == 3
        for request, dataset in objects[3:]:
            _send(cache, request, dataset, [])
        assert len(other.instances()) == 3
    # The block's end commits the rest.
    assert sorted(other.instances().SOPInstanceUID) == sorted(
        r.sop_instance_uid for r, _ in objects
    )
    assert cache.verify().empty and other.verify().empty
    cache.close()
    other.close()


def test_rows_the_index_refuses_at_a_batch_commit_raise_a_sentence(tmp_path):
    import sqlite3

    from pacsframe.cache import INDEX_NAME

    cache = Cache(tmp_path / "c")
    ((request, dataset),) = _same_series(1)
    refused = pytest.raises(CacheError, match=r"did not record 1 object\(s\) just filed")
    with refused, cache._batched():
        writer = _send(cache, request, dataset, [])
        with sqlite3.connect(cache.root / INDEX_NAME) as conn:
            conn.execute("DROP TABLE instances")  # the index breaks under the writer
    assert writer.path.exists()  # filed whole; only its row is missing
    assert not list(cache.root.rglob("*.part"))
    cache.close()


def test_an_instance_filed_under_other_parents_is_kept_in_a_batch_as_outside(tmp_path):
    # The peer now sends a cached instance under another series: in a batch, as one
    # row at a time, the cached copy is kept and no second copy is written.
    cache = Cache(tmp_path / "c")
    ds = _dataset()
    request = StoreRequest(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, 1)
    first = _send(cache, request, _encoded(ds, ExplicitVRLittleEndian), [])
    ds.SeriesInstanceUID = generate_uid()
    with cache._batched():
        again = _send(cache, request, _encoded(ds, ExplicitVRLittleEndian), [])
    assert not again.written and again.path == first.path
    assert list(cache.root.rglob("*.dcm")) == [first.path]
    assert len(cache) == 1 and cache.verify().empty
    cache.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_names_its_temporary_files_as_its_own(tmp_path):
    # The PID and the random prefix are kept, not asked per file: a fork renews both.
    from pacsframe import cache as cache_module

    parent = cache_module._random_tag()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, f"{cache_module._pid()} {cache_module._random_tag()}".encode())
        os._exit(0)
    os.waitpid(child, 0)
    pid, tag = os.read(read, 100).decode().split()
    os.close(read)
    os.close(write)
    assert int(pid) == child and cache_module._pid() == os.getpid()
    assert tag[:8] != parent[:8] and len(tag) == len(parent) == 16
