"""The on-disk cache: layout, atomic writes, the SQLite index, offline queries, volumes."""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import platformdirs
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pacsframe as pf
from pacsframe import frames, matching
from pacsframe.cache import ENV_VAR, INDEX_NAME, Cache, Volume
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.query import build_query

COHORT = {
    "patients": 4,
    "seed": 7,
    "studies_per_patient": (1, 2),
    "series_per_study": (1, 2),
    "instances_per_series": (3, 5),
    "matrix": 16,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("cache-cohort")
    return folder, make_cohort(folder, **COHORT)


@pytest.fixture(scope="module")
def manifest(cohort) -> pd.DataFrame:
    return cohort[1]


def fill(cache: Cache, manifest: pd.DataFrame) -> list[Path]:
    return [
        cache.write(
            r.StudyInstanceUID, r.SeriesInstanceUID, r.SOPInstanceUID, Path(r.path).read_bytes()
        )
        for r in manifest.itertuples()
    ]


@pytest.fixture
def cache(tmp_path: Path, manifest: pd.DataFrame) -> Cache:
    cache = Cache(tmp_path / "cache")
    fill(cache, manifest)
    yield cache
    cache.close()


TEXT = {"capture_output": True, "text": True, "check": True}


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def encode(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


# --- layout and writing ---------------------------------------------------------------------


def test_layout_is_uid_folders_and_bytes_are_identical(cache, manifest):
    for row in manifest.itertuples():
        path = (
            cache.root / row.StudyInstanceUID / row.SeriesInstanceUID / f"{row.SOPInstanceUID}.dcm"
        )
        assert path.read_bytes() == Path(row.path).read_bytes()
        assert (
            cache.path_for(row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID) == path
        )
    assert not list(cache.root.rglob("*.part"))
    assert sorted(p.name for p in cache.root.iterdir() if p.is_file())[0] == INDEX_NAME
    assert len(cache) == len(manifest)
    assert cache.size_bytes == sum(Path(p).stat().st_size for p in manifest.path)


def test_write_accepts_bytearray_memoryview_chunks_and_a_stream(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    rows = list(manifest.head(4).itertuples())
    data = [Path(r.path).read_bytes() for r in rows]
    sources = [
        bytearray(data[0]),
        memoryview(data[1]),
        [data[2][:100], data[2][100:5000], data[2][5000:]],
    ]
    for row, source, raw in zip(rows[:3], sources, data, strict=False):
        path = cache.write(row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID, source)
        assert path.read_bytes() == raw
    row = rows[3]
    with cache.open_writer(row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID) as out:
        for start in range(0, len(data[3]), 777):
            out.write(data[3][start : start + 777])
        # Nothing is visible before the writer closes.
        assert cache.cached([row.SOPInstanceUID]) == set()
        assert not cache.path_for(
            row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID
        ).exists()
    assert cache.cached([r.SOPInstanceUID for r in rows]) == {r.SOPInstanceUID for r in rows}
    sizes = cache.instances().set_index("SOPInstanceUID")["size"]
    assert [sizes[r.SOPInstanceUID] for r in rows] == [len(d) for d in data]
    assert not list(cache.root.rglob("*.part"))


@pytest.mark.parametrize(
    "bad",
    ["../../x", "..", "1.2/../../3", "/etc/passwd", "1.02.3", "", "1" * 65, "1.2.3\\4", None],
)
@pytest.mark.parametrize("where", [0, 1, 2])
def test_invalid_uids_are_refused_and_nothing_is_written(tmp_path, manifest, bad, where):
    root = tmp_path / "nest" / "cache"
    cache = Cache(root)
    row = manifest.iloc[0]
    uids = [row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID]
    uids[where] = bad
    before = files_under(tmp_path)
    with pytest.raises(pf.CacheError, match=r"refused to write.*not a valid UID.*nothing was"):
        cache.write(*uids, Path(row.path).read_bytes())
    with pytest.raises(pf.CacheError, match="not a valid UID"), cache.open_writer(*uids) as out:
        out.write(b"x")
    assert files_under(tmp_path) == before
    assert not root.exists()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70) | st.from_regex(r"[0-9.]{1,70}", fullmatch=True))
def test_path_for_never_leaves_the_root(text):
    cache = Cache("/nonexistent/pacsframe/root")
    try:
        path = cache.path_for("1.2", text, "1.2.3")
    except pf.CacheError as exc:
        assert "nothing was written" in str(exc)
        assert not frames.is_uid(text)
    else:
        assert frames.is_uid(text)
        assert path.parent.name == text and path.parent.parent.parent == cache.root


def test_a_symlink_leading_outside_the_root_is_refused(tmp_path, manifest):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = Cache(tmp_path / "cache")
    row = manifest.iloc[0]
    cache.root.mkdir()
    (cache.root / row.StudyInstanceUID).symlink_to(outside)
    with pytest.raises(pf.CacheError, match="outside the cache root"):
        cache.write(
            row.StudyInstanceUID,
            row.SeriesInstanceUID,
            row.SOPInstanceUID,
            Path(row.path).read_bytes(),
        )
    assert list(outside.iterdir()) == []


def test_non_dicom_data_and_wrong_uids_leave_nothing(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    row = manifest.iloc[0]
    other = manifest.iloc[1]
    uids = (row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID)
    with pytest.raises(pf.CacheError, match="not a DICOM Part-10 file"):
        cache.write(*uids, b"hello" * 100)
    with pytest.raises(pf.CacheError, match="no TransferSyntaxUID"):
        cache.write(*uids, [b"\0" * 128, b"DICM", b"garbage"])
    with pytest.raises(pf.CacheError, match="its header has SOPInstanceUID"):
        cache.write(*uids, Path(other.path).read_bytes())
    # A dataset without file meta (not Part-10), as raw bytes.
    raw = Path(row.path).read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")  # FileMetaInformationGroupLength
    bare = raw[144 + meta_length :]
    assert pydicom.dcmread(BytesIO(bare), force=True).SOPInstanceUID == row.SOPInstanceUID
    with pytest.raises(pf.CacheError, match="not a DICOM Part-10 file"):
        cache.write(*uids, bare)
    with pytest.raises(RuntimeError, match="connection lost"), cache.open_writer(*uids) as out:
        out.write(Path(row.path).read_bytes()[:500])
        raise RuntimeError("connection lost")
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert left == {"c", *(f"c/{p.name}" for p in cache.root.glob(INDEX_NAME + "*"))}
    assert len(cache) == 0


def test_cached_objects_are_skipped_unless_overwrite(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    row = manifest.iloc[0]
    uids = (row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID)
    original = Path(row.path).read_bytes()
    changed = original[:-2] + b"\x07\x00"  # last pixel differs, still valid DICOM
    path = cache.write(*uids, original)
    inode = path.stat().st_ino
    assert cache.write(*uids, changed) == path
    assert path.read_bytes() == original and path.stat().st_ino == inode
    with cache.open_writer(*uids) as out:
        out.write(changed)
    assert path.read_bytes() == original
    cache.write(*uids, changed, overwrite=True)
    assert path.read_bytes() == changed
    assert len(cache) == 1
    with cache.open_writer(*uids, overwrite=True) as out:
        out.write(original)
    assert path.read_bytes() == original and len(cache) == 1
    # A file deleted behind the index's back is written again.
    path.unlink()
    cache.write(*uids, original)
    assert path.read_bytes() == original


def test_default_root_from_environment_and_platformdirs(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert Cache().root == tmp_path / "from-env"
    assert Cache(tmp_path / "arg").root == tmp_path / "arg"
    monkeypatch.delenv(ENV_VAR)
    assert Cache().root == Path(platformdirs.user_cache_dir("pacsframe"))
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda name: str(tmp_path / "pd" / name))
    cache = Cache()
    assert cache.root == tmp_path / "pd" / "pacsframe"
    assert not cache.root.exists()  # created on first use only
    assert len(cache) == 0
    assert (cache.root / INDEX_NAME).exists()
    assert "0 instances" in repr(cache)


def test_index_schema_and_wal(cache):
    with sqlite3.connect(cache.root / INDEX_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [r[1] for r in db.execute("PRAGMA table_info(instances)")]
        key = [r[1] for r in db.execute("PRAGMA table_info(instances)") if r[5]]
    assert key == ["SOPInstanceUID"]
    assert columns[:8] == [
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "TransferSyntaxUID",
        "path",
        "size",
        "stored_at",
    ]
    assert set(matching.INDEX_KEYWORDS) <= set(columns)
    with sqlite3.connect(cache.root / INDEX_NAME) as db:
        paths = [r[0] for r in db.execute("SELECT path FROM instances")]
    assert all(not os.path.isabs(p) and p.count("/") == 2 for p in paths)


# --- the index as a frame -------------------------------------------------------------------


def test_instances_is_typed_like_a_find_answer(cache, manifest):
    frame = cache.instances()
    assert len(frame) == len(manifest)
    assert list(frame.columns) == [
        *matching.INDEX_KEYWORDS,
        "TransferSyntaxUID",
        "path",
        "size",
        "stored_at",
    ]
    dtypes = frame.dtypes.astype(str)
    assert dtypes["StudyDate"] == "datetime64[ns]"
    assert dtypes["StudyTime"] == "timedelta64[ns]"
    assert dtypes["AcquisitionDateTime"] == "datetime64[ns]"
    for column in ("InstanceNumber", "SeriesNumber", "Rows", "Columns", "BitsAllocated"):
        assert dtypes[column] == "Int64", column
    for column in ("SliceThickness", "RescaleIntercept", "PatientWeight"):
        assert dtypes[column] == "Float64", column
    for column in ("PatientName", "PatientID", "SOPInstanceUID", "Modality", "path"):
        assert dtypes[column] == "string", column
    assert dtypes["size"] == "Int64"
    assert isinstance(frame["stored_at"].dtype, pd.DatetimeTZDtype)
    for column in ("ImageType", "PixelSpacing", "ImagePositionPatient", "SpecificCharacterSet"):
        assert dtypes[column] == "object", column

    merged = frame.merge(manifest, on="SOPInstanceUID", suffixes=("", "_m"))
    assert len(merged) == len(manifest)
    assert merged.PatientName.tolist() == merged.PatientName_m.tolist()  # decoded names
    assert merged.InstanceNumber.tolist() == merged.InstanceNumber_m.tolist()
    assert [
        tuple(p) for p in merged.ImagePositionPatient
    ] == merged.ImagePositionPatient_m.tolist()
    assert [tuple(p) for p in merged.PixelSpacing] == merged.PixelSpacing_m.tolist()
    assert merged.path.tolist() == [
        str(cache.root / s / e / f"{o}.dcm")
        for s, e, o in zip(
            merged.StudyInstanceUID, merged.SeriesInstanceUID, merged.SOPInstanceUID, strict=True
        )
    ]
    assert merged["size"].tolist() == [Path(p).stat().st_size for p in merged.path_m]
    ct = merged[merged.Modality == "CT"]
    assert (ct.RescaleIntercept == -1024).all()
    assert set(frame.TransferSyntaxUID) == {"1.2.840.10008.1.2.1"}
    # Empty values stay empty (the cohort has an empty AccessionNumber somewhere).
    assert frame.AccessionNumber.isna().any()


def test_empty_cache_has_the_same_columns_and_dtypes(tmp_path, cache):
    empty = Cache(tmp_path / "empty").instances()
    assert len(empty) == 0
    assert empty.dtypes.astype(str).to_dict() == cache.instances().dtypes.astype(str).to_dict()


def test_instances_filters_by_uid(cache, manifest):
    series = manifest.SeriesInstanceUID.unique()[:2].tolist()
    frame = cache.instances(SeriesInstanceUID=series)
    assert sorted(frame.SOPInstanceUID) == sorted(
        manifest[manifest.SeriesInstanceUID.isin(series)].SOPInstanceUID
    )
    with pytest.raises(pf.QueryError, match="filters on"):
        cache.instances(Modality="CT")


def test_cached_and_count(cache, manifest):
    some = manifest.SOPInstanceUID.iloc[::2].tolist()
    fake = [f"1.2.3.{i}" for i in range(2500)]  # more than one IN chunk
    assert cache.cached(some + fake) == set(some)
    assert cache.cached(pd.Series(some)) == set(some)
    assert cache.cached([]) == set()
    by_series = manifest.groupby("SeriesInstanceUID").size().to_dict()
    assert cache.count("series", [*by_series, "9.9.9"]) == {**by_series, "9.9.9": 0}
    assert cache.count("SERIES") == by_series
    by_study = manifest.groupby("StudyInstanceUID").size().to_dict()
    assert cache.count("study", manifest.StudyInstanceUID) == by_study
    assert cache.count("patient") == manifest.groupby("PatientID").size().to_dict()
    with pytest.raises(pf.QueryError):
        cache.count("image", some)


# --- offline queries ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(cohort):
    folder, _ = cohort
    with DemoPACS(folder) as server:
        yield server


def sort_frame(frame: pd.DataFrame) -> pd.DataFrame:
    key = next(
        c
        for c in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID")
        if c in frame.columns
    )
    return frame.sort_values(key).reset_index(drop=True)


def queries(manifest: pd.DataFrame) -> list[tuple[str, str, dict]]:
    dates = sorted(pd.to_datetime(manifest.StudyDate).unique())
    first, middle = dates[0], dates[len(dates) // 2]
    name = manifest.PatientName.iloc[-1]
    study = manifest.StudyInstanceUID.iloc[0]
    ct_study = manifest[manifest.Modality == "CT"].StudyInstanceUID.iloc[0]
    studies = manifest.StudyInstanceUID.unique()[:2].tolist()
    series = manifest.SeriesInstanceUID.iloc[-1]
    last_study = manifest.StudyInstanceUID.iloc[-1]
    return [
        ("patient", "patient", {}),
        ("patient", "patient", {"PatientName": name[:3] + "*"}),
        ("patient", "patient", {"PatientID": "PF07000?"}),
        ("study", "study", {}),
        ("study", "study", {"StudyDate": (first, middle)}),
        ("study", "study", {"StudyDate": (None, middle.strftime("%Y-%m-%d"))}),
        ("study", "study", {"StudyDate": middle.strftime("%Y%m%d") + "-"}),
        ("study", "study", {"ModalitiesInStudy": "MR", "return_keys": ["StudyDescription"]}),
        ("study", "study", {"PatientName": name.lower()}),  # PN is case-insensitive
        ("study", "study", {"StudyInstanceUID": studies}),
        ("study", "patient", {"PatientID": manifest.PatientID.iloc[0]}),
        ("series", "study", {"StudyInstanceUID": study}),
        ("series", "study", {"StudyInstanceUID": ct_study, "Modality": "CT"}),
        ("image", "study", {"StudyInstanceUID": last_study, "SeriesInstanceUID": series}),
        (
            "image",
            "study",
            {
                "StudyInstanceUID": last_study,
                "SeriesInstanceUID": series,
                "InstanceNumber": "2",
                "return_keys": ["ImagePositionPatient", "PixelSpacing"],
            },
        ),
    ]


def test_offline_find_answers_like_the_demo_pacs(tmp_path, server, manifest):
    cache = Cache(tmp_path / "c")
    fill(cache, manifest)
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title)
    for level, model, keys in queries(manifest):
        keys = dict(keys)
        return_keys = keys.pop("return_keys", None)
        online = pacs.find(level, model=model, return_keys=return_keys, **keys)
        offline = cache.find(level, model=model, return_keys=return_keys, **keys)
        assert len(online), (level, keys)
        pd.testing.assert_frame_equal(sort_frame(offline), sort_frame(online), obj=str(keys))
        # The same engine over the server's own index agrees too.
        query = build_query(level, model, keys, return_keys)
        direct = matching.answer(server.instances(), query)
        pd.testing.assert_frame_equal(sort_frame(offline), sort_frame(direct))
        assert offline.attrs["pacsframe"]["keys"] == query.matching
        assert offline.attrs["pacsframe"]["cache"] == str(cache.root)


def test_index_round_trips_to_the_same_frame_as_the_demo_pacs_index(tmp_path, server, manifest):
    cache = Cache(tmp_path / "c")
    fill(cache, manifest)
    keywords = list(matching.INDEX_KEYWORDS)
    ours = cache.instances()[keywords].sort_values("SOPInstanceUID", ignore_index=True)
    theirs = server.instances()[keywords].sort_values("SOPInstanceUID", ignore_index=True)
    pd.testing.assert_frame_equal(ours, theirs)


def test_offline_find_matches_the_manifest(cache, manifest):
    studies = manifest.drop_duplicates("StudyInstanceUID")
    days = pd.to_datetime(studies.StudyDate)
    start, end = days.min(), days.min() + pd.Timedelta(days=400)
    found = cache.find_studies(StudyDate=(start.date(), end.date()))
    expected = studies[(days >= start) & (days <= end)]
    assert sorted(found.StudyInstanceUID) == sorted(expected.StudyInstanceUID)
    assert found.StudyDate.dtype == "datetime64[ns]"

    assert len(cache.find_patients()) == manifest.PatientID.nunique()
    assert sorted(cache.find_patients(PatientID="PF07*").PatientID) == sorted(
        manifest.PatientID.unique()
    )
    ct = cache.find_series(Modality="CT")  # relational: no StudyInstanceUID needed
    assert sorted(ct.SeriesInstanceUID) == sorted(
        manifest[manifest.Modality == "CT"].SeriesInstanceUID.unique()
    )
    uids = manifest.StudyInstanceUID.unique()[:2].tolist()
    series = cache.find_series(StudyInstanceUID=uids)
    assert set(series.StudyInstanceUID) == set(uids)
    counts = manifest.groupby("SeriesInstanceUID").size()
    assert dict(
        zip(series.SeriesInstanceUID, series.NumberOfSeriesRelatedInstances, strict=True)
    ) == {u: counts[u] for u in series.SeriesInstanceUID}
    images = cache.find_instances(SeriesInstanceUID=manifest.SeriesInstanceUID.iloc[0])
    assert len(images) == counts[manifest.SeriesInstanceUID.iloc[0]]
    assert images.InstanceNumber.dtype == "Int64"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"PatientNmae": "X"}, "did you mean 'PatientName'"),
        ({"StudyDate": "2026*"}, "wildcards are not allowed"),
        ({"StudyDate": "2026-02-30"}, "not a real date"),
        ({"Modality": ["CT", "MR"]}, "takes a single value"),
        ({"StudyInstanceUID": "1.2.*"}, "wildcards are not allowed in a UID"),
        ({"Modality": "ct"}, "upper-case"),
    ],
)
def test_offline_find_rejects_bad_input_like_a_pacs(cache, keys, message):
    with pytest.raises(pf.QueryError, match=message):
        cache.find_series(**keys)


def test_offline_find_does_not_drill_down(cache):
    studies = cache.find_studies()
    with pytest.raises(pf.QueryError, match="does not drill down"):
        cache.find_series(studies)
    with pytest.raises(pf.QueryError, match="does not drill down"):
        cache.find("series", studies)
    with pytest.raises(pf.QueryError, match="not a query level"):
        cache.find("galaxy")


# --- reading --------------------------------------------------------------------------------


def test_read_frames_at_every_level_and_uid_lists(cache, manifest):
    sops = manifest.SOPInstanceUID.sample(5, random_state=1).tolist()
    assert [ds.SOPInstanceUID for ds in cache.read(sops)] == sops
    series_uid = manifest.SeriesInstanceUID.iloc[0]
    series = cache.find_series(SeriesInstanceUID=series_uid)
    datasets = cache.read(series)
    expected = manifest[manifest.SeriesInstanceUID == series_uid].sort_values("InstanceNumber")
    assert [ds.SOPInstanceUID for ds in datasets] == expected.SOPInstanceUID.tolist()
    assert datasets[0].pixel_array.shape == (16, 16)
    study_uid = manifest.StudyInstanceUID.iloc[-1]
    studies = cache.find_studies(StudyInstanceUID=study_uid)
    assert len(cache.read(studies)) == (manifest.StudyInstanceUID == study_uid).sum()
    assert len(cache.read(cache.find_patients())) == len(manifest)
    assert len(cache.read(cache.instances().SOPInstanceUID)) == len(manifest)
    with pytest.raises(pf.CacheError, match="nothing in the cache"):
        cache.read([*sops, "1.2.3.4"])
    with pytest.raises(pf.CacheError, match="wrap a single UID"):
        cache.read(sops[0])


def test_load_series_matches_the_cohort_geometry(cache, manifest):
    for series_uid, rows in manifest.groupby("SeriesInstanceUID"):
        volume = cache.load_series(series_uid)
        rows = rows.sort_values("InstanceNumber")
        z = [p[2] for p in rows.ImagePositionPatient]
        assert volume.array.shape == (len(rows), 16, 16)
        assert volume.array.dtype == np.float32
        assert volume.sop_instance_uids == rows.SOPInstanceUID.tolist()  # z rises with number
        assert volume.spacing[0] == pytest.approx(np.diff(z).mean(), abs=1e-4)
        assert volume.spacing[1:] == pytest.approx(rows.PixelSpacing.iloc[0])
        assert volume.origin == pytest.approx(rows.ImagePositionPatient.iloc[0])
        np.testing.assert_allclose(volume.orientation, np.eye(3))
        raw = np.stack([pydicom.dcmread(p).pixel_array for p in rows.path]).astype(np.float32)
        offset = -1024.0 if rows.Modality.iloc[0] == "CT" else 0.0
        np.testing.assert_array_equal(volume.array, raw + offset)
    assert "Volume(shape=(" in repr(volume) and "mm" in repr(volume)


def series_datasets(manifest: pd.DataFrame, modality: str = "CT") -> list[pydicom.Dataset]:
    rows = manifest[manifest.Modality == modality]
    first = rows.SeriesInstanceUID.iloc[0]
    return [pydicom.dcmread(p) for p in rows[rows.SeriesInstanceUID == first].path]


def test_load_series_sorts_by_position_not_by_number_or_storage_order(tmp_path, manifest):
    datasets = series_datasets(manifest)
    n = len(datasets)
    cache = Cache(tmp_path / "c")
    # InstanceNumbers scrambled against the positions, files written in reverse.
    for ds, number in zip(reversed(datasets), [3, 1, 5, 2, 4][:n], strict=False):
        ds.InstanceNumber = number
        cache.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, encode(ds))
    volume = cache.load_series(datasets[0].SeriesInstanceUID)
    by_z = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    assert volume.sop_instance_uids == [d.SOPInstanceUID for d in by_z]
    # A flipped orientation (feet first) flips the order along the normal.
    cache2 = Cache(tmp_path / "c2")
    for ds in datasets:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        cache2.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, encode(ds))
    flipped = cache2.load_series(datasets[0].SeriesInstanceUID)
    assert flipped.sop_instance_uids == volume.sop_instance_uids[::-1]
    np.testing.assert_allclose(flipped.orientation[2], [0, 0, -1])
    assert flipped.spacing[0] == pytest.approx(volume.spacing[0])


def test_load_series_falls_back_to_instance_number(tmp_path, manifest):
    datasets = series_datasets(manifest, "MR")
    cache = Cache(tmp_path / "c")
    for ds in datasets:
        del ds.ImagePositionPatient
        cache.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, encode(ds))
    volume = cache.load_series(datasets[0].SeriesInstanceUID)
    by_number = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    assert volume.sop_instance_uids == [d.SOPInstanceUID for d in by_number]
    assert np.isnan(volume.origin).all()
    assert volume.spacing[0] == pytest.approx(float(datasets[0].SpacingBetweenSlices))


def test_load_series_errors_are_sentences(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    with pytest.raises(pf.CacheError, match="is not in the cache"):
        cache.load_series("1.2.3")
    datasets = series_datasets(manifest)
    small = datasets[1]
    small.Rows = small.Columns = 8
    small.PixelData = np.zeros((8, 8), dtype="<u2").tobytes()
    for ds in datasets:
        cache.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, encode(ds))
    with pytest.raises(pf.CacheError, match=r"cannot be stacked.*8x8"):
        cache.load_series(datasets[0].SeriesInstanceUID)


def test_volume_repr():
    volume = Volume(np.zeros((2, 3, 4), np.float32), (1.0, 0.5, 0.5), (0.0, 0.0, 0.0), np.eye(3))
    assert repr(volume) == (
        "Volume(shape=(2, 3, 4), spacing=(1, 0.5, 0.5) mm, origin=(0, 0, 0), values 0 to 0)"
    )


# --- upkeep ---------------------------------------------------------------------------------


def test_verify_reports_and_drops_damaged_entries(cache, manifest):
    paths = cache.instances().set_index("SOPInstanceUID").path
    missing, truncated, junk = manifest.SOPInstanceUID.iloc[[0, 3, 6]]
    Path(paths[missing]).unlink()
    data = Path(paths[truncated]).read_bytes()
    Path(paths[truncated]).write_bytes(data[: len(data) // 2])
    Path(paths[junk]).write_bytes(b"\0" * len(Path(paths[junk]).read_bytes()))
    stray = Path(paths[manifest.SOPInstanceUID.iloc[1]]).parent / ".1.2.3.abc.part"
    stray.write_bytes(b"partial")
    # A name that does not say who writes it: stray once untouched for an hour.
    two_hours_ago = stray.stat().st_mtime - 7200
    os.utime(stray, (two_hours_ago, two_hours_ago))

    report = cache.verify()
    assert len(report) == 4
    found = dict(zip(report.problem, report.SOPInstanceUID, strict=True))
    assert found["missing"] == missing
    assert found["truncated"] == truncated
    assert found["not DICOM"] == junk
    assert pd.isna(found["stray temporary file"])
    assert report.set_index("problem").loc["stray temporary file", "path"] == str(stray)
    details = dict(zip(report.problem, report.detail, strict=True))
    assert details["missing"] == "the indexed file is gone; row dropped"
    half = len(data) // 2
    assert details["truncated"] == (
        f"{half} bytes on disk but {len(data)} in the index; file and row removed"
    )
    assert details["not DICOM"].startswith("its header cannot be read (")
    assert details["stray temporary file"] == "untouched for 2.0 hours; removed"
    assert not stray.exists() and not Path(paths[truncated]).exists()
    assert not Path(paths[junk]).exists()
    dropped = {missing, truncated, junk}
    assert cache.cached(manifest.SOPInstanceUID) == set(manifest.SOPInstanceUID) - dropped
    assert len(cache) == len(manifest) - 3
    assert cache.verify().empty
    # A re-run fetches what was dropped.
    fill(cache, manifest)
    assert len(cache) == len(manifest) and cache.verify().empty


def test_verify_indexes_files_without_rows_and_removes_leftover_copies(cache, manifest):
    before = cache.instances().set_index("SOPInstanceUID")
    orphan, junk, copied = manifest.SOPInstanceUID.iloc[[0, 2, 4]]
    db = sqlite3.connect(cache.root / INDEX_NAME)
    with db:  # as if a process was killed between renaming into place and indexing
        db.execute("DELETE FROM instances WHERE SOPInstanceUID IN (?, ?)", (orphan, junk))
    db.close()
    Path(before.path[junk]).write_bytes(b"\0" * 300)
    # A second copy under another series folder, as a stopped re-filing leaves it.
    copy = cache.root / before.StudyInstanceUID[copied] / "1.2.3" / f"{copied}.dcm"
    copy.parent.mkdir()
    copy.write_bytes(Path(before.path[copied]).read_bytes())

    report = cache.verify().set_index("SOPInstanceUID")
    assert report.problem.to_dict() == {
        orphan: "not indexed",
        junk: "not indexed",
        copied: "duplicate",
    }
    assert report.detail[orphan].endswith("; indexed")
    assert report.detail[junk].startswith("a file without index row that cannot be indexed")
    assert report.path[copied] == str(copy)
    assert not Path(before.path[junk]).exists()
    assert not copy.parent.exists()  # the folder it left empty is gone too
    after = cache.instances().set_index("SOPInstanceUID")
    assert len(after) == len(manifest) - 1
    columns = [c for c in after.columns if c != "stored_at"]
    pd.testing.assert_series_equal(after.loc[orphan, columns], before.loc[orphan, columns])
    assert cache.verify().empty


@pytest.mark.skipif(os.name != "posix", reason="writers are asked with os.kill(pid, 0)")
def test_verify_removes_temporary_files_only_when_their_writer_is_gone(cache, manifest):
    from pacsframe import cache as cache_module

    row = manifest.iloc[0]
    uids = (row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID)
    folder = cache.path_for(*uids).parent
    tag = cache_module._host_tag()
    other_host = "0" * 8 if tag != "0" * 8 else "1" * 8
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    gone_pid = int(finished.stdout)
    names = {
        "gone": f".1.2.3.{tag}-{gone_pid}-{'a' * 16}.part",
        "us, not writing": f".1.2.3.{tag}-{os.getpid()}-{'b' * 16}.part",
        "alive": f".1.2.3.{tag}-{os.getppid()}-{'c' * 16}.part",
        "another host": f".1.2.3.{other_host}-{gone_pid}-{'d' * 16}.part",
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    data = Path(row.path).read_bytes()
    with cache.open_writer(*uids, overwrite=True) as out:
        out.write(data[:1000])
        out.flush()
        (writing,) = [
            p
            for p in folder.iterdir()
            if p.name.endswith(".part") and p.name not in names.values()
        ]
        assert f"{tag}-{os.getpid()}-" in writing.name
        report = cache.verify()
        assert writing.exists()
        out.write(data[1000:])
    assert cache.path_for(*uids).read_bytes() == data
    removed = dict(zip(report.path, report.detail, strict=True))
    assert removed == {
        str(folder / names["gone"]): f"its writer, process {gone_pid}, is gone; removed",
        str(folder / names["us, not writing"]): (
            "its writer, this process, no longer writes it; removed"
        ),
    }
    assert (folder / names["alive"]).exists() and (folder / names["another host"]).exists()
    hour_ago = time.time() - 3700
    os.utime(folder / names["another host"], (hour_ago, hour_ago))
    assert cache.verify().path.tolist() == [str(folder / names["another host"])]
    (folder / names["alive"]).unlink()
    assert cache.verify().empty


def test_clear_removes_only_cache_files(cache, manifest, tmp_path):
    series_uid = manifest.SeriesInstanceUID.iloc[0]
    study_uid = manifest.StudyInstanceUID.iloc[0]
    keep = cache.root / "notes.txt"
    keep.write_text("mine")
    neighbour = tmp_path / "neighbour.dcm"
    neighbour.write_bytes(b"x")
    removed = cache.clear(cache.find_series(SeriesInstanceUID=series_uid))
    assert removed == (manifest.SeriesInstanceUID == series_uid).sum()
    assert not (cache.root / study_uid / series_uid).exists()
    assert cache.count("series", [series_uid]) == {series_uid: 0}
    assert len(cache) == len(manifest) - removed
    one = manifest.SOPInstanceUID.iloc[-1]
    assert cache.clear([one]) == 1 and cache.cached([one]) == set()
    assert cache.clear(cache.find_studies(StudyInstanceUID=manifest.StudyInstanceUID.iloc[-1])) > 0
    left = len(cache)
    assert left > 0 and cache.clear() == left
    assert len(cache) == 0 and cache.size_bytes == 0
    assert keep.read_text() == "mine" and neighbour.exists()
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(
        [INDEX_NAME, "notes.txt", *(p.name for p in cache.root.glob(INDEX_NAME + "-*"))]
    )


def test_concurrent_writes_index_every_object_once(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    payloads = [
        (r.StudyInstanceUID, r.SeriesInstanceUID, r.SOPInstanceUID, Path(r.path).read_bytes())
        for r in manifest.itertuples()
    ]
    barrier = threading.Barrier(4)

    def worker(offset: int) -> int:
        barrier.wait()
        # Every thread writes every object, starting at a different place, so the same
        # object is often written by two threads at once.
        order = payloads[offset::] + payloads[:offset]
        for study, series, sop, data in order:
            cache.write(study, series, sop, data, overwrite=offset % 2 == 1)
        return threading.get_ident()

    with ThreadPoolExecutor(4) as pool:
        idents = list(pool.map(worker, [0, len(payloads) // 4, len(payloads) // 2, 3]))
    assert len(set(idents)) == 4
    frame = cache.instances()
    assert len(frame) == len(manifest) == len(cache)
    assert sorted(frame.SOPInstanceUID) == sorted(manifest.SOPInstanceUID)
    for study, series, sop, data in payloads:
        assert cache.path_for(study, series, sop).read_bytes() == data
    assert not list(cache.root.rglob("*.part"))
    assert cache.verify().empty


def test_worker_threads_do_not_leak_index_connections(tmp_path, manifest):
    cache = Cache(tmp_path / "c")
    payloads = [
        (r.StudyInstanceUID, r.SeriesInstanceUID, r.SOPInstanceUID, Path(r.path).read_bytes())
        for r in manifest.head(8).itertuples()
    ]
    for _ in range(5):  # like five get() calls, each with fresh worker threads
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: cache.write(*p, overwrite=True), payloads))
    gc.collect()
    assert len(cache._connections) <= 1
    assert len(cache) == 8


def test_repr_and_close(cache, tmp_path):
    assert repr(Cache(tmp_path / "nothing")) == f"Cache({str(tmp_path / 'nothing')!r}, empty)"
    text = repr(cache)
    assert f"{len(cache)} instances" in text and "kB" in text
    cache.close()
    assert len(cache) > 0  # reopens on use
