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
