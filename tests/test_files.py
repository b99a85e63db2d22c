"""pf.read_headers: folders of DICOM files into the typed frames C-FIND gives."""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

import pacsframe as pf
from pacsframe import matching
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.query import build_query

KEYS = {
    "patient": "PatientID",
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instance": "SOPInstanceUID",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("files")
    manifest = make_cohort(
        root,
        patients=4,
        matrix=8,
        studies_per_patient=(1, 2),
        series_per_study=(1, 3),
        instances_per_series=(2, 3),
    )
    return root, manifest


@pytest.fixture(scope="module")
def cfind(folder) -> dict[str, pd.DataFrame]:
    """The demo PACS's C-FIND frames of the same folder, at each level."""
    root, _ = folder
    with DemoPACS(root) as server:
        pacs = pf.PACS("127.0.0.1", server.port, ae_title=server.ae_title)
        out = {"patient": pacs.find_patients(return_keys=["PatientComments"])}
        out["study"] = pacs.find_studies(return_keys=["PatientAge", "SOPClassesInStudy"])
        out["series"] = pacs.find_series(out["study"], return_keys=["Manufacturer"])
        out["instance"] = pacs.find_instances(out["series"], return_keys=["PixelSpacing"])
    return out


EXTRA = {
    "patient": ["PatientComments"],
    "study": ["PatientAge", "SOPClassesInStudy"],
    "series": ["Manufacturer"],
    "instance": ["PixelSpacing"],
}


def assert_same(ours: pd.DataFrame, theirs: pd.DataFrame, level: str) -> None:
    """Column by column, dtypes included, rows in UID order, for the shared columns."""
    key = KEYS[level]
    theirs = theirs.sort_values(key, ignore_index=True)
    ours = ours.sort_values(key, ignore_index=True)
    shared = [c for c in ours.columns if c in theirs.columns]
    assert key in shared
    assert len(shared) == len(ours.columns)  # every column we give, C-FIND gives
    for column in shared:
        pd.testing.assert_series_equal(ours[column], theirs[column], check_names=True)


@pytest.mark.parametrize("level", ["instance", "series", "study", "patient"])
def test_frames_equal_cfind_frames(folder, cfind, level):
    root, manifest = folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = pf.read_headers(root, level=level, keys=EXTRA[level])
    theirs = cfind[level]
    assert len(frame) == len(theirs) == manifest[KEYS[level]].nunique()
    assert frame[KEYS[level]].is_monotonic_increasing  # sorted by the unique key
    assert_same(frame, theirs, level)
    meta = frame.attrs["pacsframe"]
    assert meta["level"] == theirs.attrs["pacsframe"]["level"]
    assert meta["model"] == theirs.attrs["pacsframe"]["model"]
    assert meta["source"] == [str(root)]
    assert (meta["files"], meta["skipped"], meta["errors"]) == (len(manifest), 0, [])


def test_default_columns_are_the_cfind_defaults(folder):
    root, _ = folder
    for level, model in (("instance", "study"), ("series", "study"), ("patient", "patient")):
        frame = pf.read_headers(root, level=level, workers=1)
        assert frame.columns.tolist() == build_query(level, model).columns
        assert frame[KEYS[level]].notna().all()


def test_cache_frames_equal_file_frames(folder, cfind, tmp_path):
    """Frames from files == the cache's offline frames == C-FIND frames."""
    root, manifest = folder
    cache = pf.Cache(tmp_path / "cache")
    try:
        for path in manifest.path:
            cache.add(Path(path).read_bytes())
        instances = cache.instances()
        files = pf.read_headers(root, keys=list(matching.INDEX_KEYWORDS))
        assert_same(files, instances, "instance")
        for level, find in (
            ("patient", cache.find_patients),
            ("study", cache.find_studies),
            ("series", cache.find_series),
            ("instance", cache.find_instances),
        ):
            offline = find(return_keys=EXTRA[level])
            assert_same(pf.read_headers(root, level=level, keys=EXTRA[level]), offline, level)
            assert_same(offline, cfind[level], level)
    finally:
        cache.close()


def test_nested_folders_and_a_list_of_paths(folder, tmp_path):
    _, manifest = folder
    one = Path(manifest.path.iloc[0])
    series_folder = Path(manifest.path.iloc[-1]).parent
    nested = tmp_path / "a" / "b" / "c"
    nested.mkdir(parents=True)
    shutil.copy(one, nested / "copy")  # any name: the preamble decides
    (tmp_path / "a" / "README.txt").write_text("not DICOM")
    (tmp_path / "a" / "b" / "DICOMDIR.bak").write_bytes(b"\0" * 10)
    frame = pf.read_headers([one, series_folder, tmp_path / "a", str(one)])
    expected = {
        manifest.SOPInstanceUID.iloc[0],
        *manifest[
            manifest.SeriesInstanceUID == manifest.SeriesInstanceUID.iloc[-1]
        ].SOPInstanceUID,
    }
    # The copy under a/b/c is the same instance: two rows with one UID, as files.
    assert set(frame.SOPInstanceUID) == expected
    assert len(frame) == len(expected) + 1
    meta = frame.attrs["pacsframe"]
    assert meta["skipped"] == 2
    assert meta["errors"] == []
    assert len(meta["source"]) == 4
    # Above the instance level the copy counts once, as in a PACS.
    series = pf.read_headers([one, series_folder, tmp_path / "a"], level="series")
    counts = manifest.groupby("SeriesInstanceUID").size()
    assert dict(
        zip(series.SeriesInstanceUID, series.NumberOfSeriesRelatedInstances, strict=True)
    ) == {uid: counts[uid] if uid == series_folder.name else 1 for uid in series.SeriesInstanceUID}


def _hostile(folder: Path, manifest: pd.DataFrame, out: Path) -> dict[str, str]:
    """Damaged copies of cohort files; the sentence each error must contain."""
    out.mkdir()
    good = Path(manifest.path.iloc[0]).read_bytes()
    (out / "good.dcm").write_bytes(good)
    (out / "truncated.dcm").write_bytes(good[: len(good) - 20])
    (out / "cut-in-header.dcm").write_bytes(good[:400])
    (out / "not-dicom.dcm").write_bytes(b"just text, with a .dcm name")
    (out / "notes.txt").write_text("skipped, not an error")
    sop = manifest.SOPInstanceUID.iloc[0].encode()
    evil = b"../../" + b"x" * (len(sop) - 6)
    (out / "path-uid.dcm").write_bytes(good.replace(sop, evil))
    name = good.index(b"\x10\x00\x10\x00PN")
    huge = bytearray(good)
    huge[name + 6 : name + 8] = struct.pack("<H", 0xFFFE)
    (out / "huge-length.dcm").write_bytes(bytes(huge))
    pixels = good.index(b"\xe0\x7f\x10\x00")
    huge_pixels = bytearray(good)
    huge_pixels[pixels + 8 : pixels + 12] = struct.pack("<L", 0xFFFFFFF0)
    (out / "huge-pixels.dcm").write_bytes(bytes(huge_pixels))
    # Deflated: the intact file reads (pydicom inflates it), a cut one is an error.
    deflated = dcmread(manifest.path.iloc[1])
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(out / "deflated.dcm")
    whole = (out / "deflated.dcm").read_bytes()
    (out / "deflated-cut.dcm").write_bytes(whole[: len(whole) - 40])
    return {
        "truncated.dcm": "truncated",
        "cut-in-header.dcm": "truncated",
        "not-dicom.dcm": "not DICOM",
        "path-uid.dcm": "not a valid UID",
        "huge-length.dcm": "past the end of the file",
        "huge-pixels.dcm": "truncated",
        "deflated-cut.dcm": "deflated data set is truncated or damaged",
    }


@pytest.mark.parametrize("workers", [1, 3])
def test_damaged_and_hostile_files(folder, tmp_path, workers):
    root, manifest = folder
    expected = _hostile(root, manifest, tmp_path / "bad")
    with pytest.warns(pf.UnreadableFileWarning) as caught:
        frame = pf.read_headers(tmp_path / "bad", level="instance", workers=workers)
    assert len([w for w in caught if issubclass(w.category, pf.UnreadableFileWarning)]) == 1
    assert "7 of 10 files could not be read" in str(caught[0].message)
    # good.dcm and deflated.dcm
    assert frame.SOPInstanceUID.tolist() == sorted(manifest.SOPInstanceUID.iloc[:2])
    meta = frame.attrs["pacsframe"]
    assert meta["skipped"] == 1
    errors = {Path(e["path"]).name: e["error"] for e in meta["errors"]}
    assert errors.keys() == expected.keys()
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])
    json.dumps(meta)  # JSON-safe
    # Above the instance level too: still one row, the same errors.
    with pytest.warns(pf.UnreadableFileWarning):
        studies = pf.read_headers(tmp_path / "bad", level="study")
    counts = manifest.iloc[:2].groupby("StudyInstanceUID").size()
    assert studies.NumberOfStudyRelatedInstances.tolist() == counts.sort_index().tolist()


def test_deflated_file_reads_as_the_original(folder, tmp_path):
    _, manifest = folder
    ds = dcmread(manifest.path.iloc[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm")
    keys = ["PatientName", "StudyDate", "PixelSpacing", "Modality"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = pf.read_headers(tmp_path, keys=keys)
    pd.testing.assert_frame_equal(frame, pf.read_headers(manifest.path.iloc[0], keys=keys))


def _bare(ds, path: Path, implicit: bool, meta: bool = False) -> None:
    """``ds`` written without the 128-byte preamble and 'DICM' (and its file meta)."""
    ds = ds.copy()
    ds.preamble = None
    if not meta:
        del ds.file_meta
    elif implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)


def test_files_without_preamble(folder, tmp_path):
    """Bare data sets (old CD imports) read as pydicom's force=True reads them.

    A file without the preamble and 'DICM' is read when it starts with a data set
    (an element of group 0008, implicit or explicit VR) or with a file meta (group
    0002); anything else is skipped and counted as not DICOM, or an error with a
    .dcm name.
    """
    _, manifest = folder
    originals = list(manifest.path.iloc[:3])
    first, second, third = (dcmread(p) for p in originals)
    _bare(first, tmp_path / "IM0001", implicit=True)
    _bare(second, tmp_path / "IM0002", implicit=False)
    _bare(third, tmp_path / "IM0003", implicit=True, meta=True)
    (tmp_path / "IM0004").write_bytes(b"\x10\x00\x10\x00" + b"no data set here" * 4)
    (tmp_path / "IM0005.dcm").write_bytes(b"MZ" + bytes(200))
    for name in ("IM0001", "IM0002", "IM0003"):
        assert (tmp_path / name).read_bytes()[128:132] != b"DICM"
        # the reference the choice follows: pydicom reads them with force=True
        assert dcmread(tmp_path / name, force=True).SOPInstanceUID in set(
            manifest.SOPInstanceUID.iloc[:3]
        )
    keys = ["PatientName", "StudyDate", "PixelSpacing", "SpecificCharacterSet"]
    with pytest.warns(pf.UnreadableFileWarning) as caught:
        frame = pf.read_headers(tmp_path, keys=keys)
    assert len(caught) == 1
    pd.testing.assert_frame_equal(frame, pf.read_headers(originals, keys=keys))
    meta = frame.attrs["pacsframe"]
    assert (meta["files"], meta["skipped"]) == (5, 1)
    assert [Path(e["path"]).name for e in meta["errors"]] == ["IM0005.dcm"]
    assert "not DICOM" in meta["errors"][0]["error"]
    # A bare data set cut short is an error like a cut Part 10 file.
    data = (tmp_path / "IM0001").read_bytes()
    (tmp_path / "IM0001").write_bytes(data[:-30])
    with pytest.warns(pf.UnreadableFileWarning):
        frame = pf.read_headers(tmp_path / "IM0001")
    assert len(frame) == 0
    assert "truncated" in frame.attrs["pacsframe"]["errors"][0]["error"]


def test_symbolic_links_and_loops(folder, tmp_path):
    """Links are followed; each folder and file is read once, so loops end."""
    _, manifest = folder
    series = manifest[manifest.SeriesInstanceUID == manifest.SeriesInstanceUID.iloc[0]]
    other = manifest[manifest.SeriesInstanceUID == manifest.SeriesInstanceUID.iloc[-1]]
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    for path in series.path:
        shutil.copy(path, top / "a" / "b")
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in other.path:
        shutil.copy(path, outside)
    os.symlink(top, top / "a" / "b" / "up")  # a loop back to the top
    os.symlink(top / "a", top / "a" / "self")  # a loop to its own folder
    os.symlink(outside, top / "linked")  # a folder elsewhere: followed
    first = next((top / "a" / "b").iterdir())
    os.symlink(first, top / "again.dcm")  # a second name for one file: read once
    os.symlink(tmp_path / "gone", top / "dangling")  # points nowhere: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = pf.read_headers(top)
    assert sorted(frame.SOPInstanceUID) == sorted([*series.SOPInstanceUID, *other.SOPInstanceUID])
    meta = frame.attrs["pacsframe"]
    assert (meta["files"], meta["skipped"], meta["errors"]) == (len(series) + len(other), 0, [])


@pytest.mark.orthanc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("level", ["instance", "series", "study", "patient"])
def test_frames_equal_orthanc_cfind(cohort, orthanc, level):
    """The shared cohort's files read as Orthanc's C-FIND answers them, column by column.

    Orthanc (conftest's fixture, the cohort stored into it) computes the counts and
    ModalitiesInStudy itself; no column of these needs a documented deviation.
    """
    root, manifest = cohort
    pacs = pf.PACS(orthanc.host, orthanc.dicom_port, orthanc.aet, dimse_timeout=30)
    if level == "patient":
        theirs = pacs.find_patients(return_keys=EXTRA[level])
    else:
        studies = pacs.find_studies(return_keys=EXTRA["study"])
        theirs = studies
        if level != "study":
            theirs = pacs.find_series(studies, return_keys=EXTRA["series"])
        if level == "instance":
            theirs = pacs.find_instances(theirs, return_keys=EXTRA[level])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = pf.read_headers(root, level=level, keys=EXTRA[level])
    assert len(ours) == len(theirs) == manifest[KEYS[level]].nunique()
    assert_same(ours, theirs, level)


def test_bad_arguments(tmp_path):
    with pytest.raises(pf.QueryError, match="neither a file nor a folder"):
        pf.read_headers(tmp_path / "nowhere")
    with pytest.raises(pf.QueryError):
        pf.read_headers(tmp_path, level="frame")
    with pytest.raises(pf.QueryError):
        pf.read_headers(tmp_path, keys=["NotAKeyword"])
    empty = pf.read_headers(tmp_path, level="study")
    assert len(empty) == 0
    assert str(empty.StudyDate.dtype) == "datetime64[ns]"


def test_long_header_and_implicit_vr(folder, tmp_path):
    """A header past the first 64 KiB is read on; implicit VR files read the same."""
    _, manifest = folder
    first, second = (dcmread(p) for p in manifest.path.iloc[:2])
    first.add_new(0x00091010, "LO", "PRIVATE")
    first.add_new(0x00091011, "OB", b"\1" * 300_000)
    first.save_as(tmp_path / "long.dcm")
    second.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    second.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
    keys = ["PatientName", "StudyDate", "PixelSpacing"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = pf.read_headers(tmp_path, keys=keys)
    reference = pf.read_headers(list(manifest.path.iloc[:2]), keys=keys)
    pd.testing.assert_frame_equal(frame, reference)
