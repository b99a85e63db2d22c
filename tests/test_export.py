"""Cache.export: de-identified copies checked against DICOM PS3.15 Table E.1-1.

The expected outcome of every attribute is derived here from the table itself (the
copy dicom-anonymizer keeps of the standard) and from the Retain Longitudinal
Temporal Information with Modified Dates Option, allowing each of the actions a
combined code permits (X/Z: removed or empty, ...), so the test checks conformance
to the standard and not pacsframe's own choices among them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import sqlite3
import warnings
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import pacsframe as pf
from pacsframe import Cache, CacheError
from pacsframe.deidentify import _CATEGORIES as CATEGORIES  # the library's names
from pacsframe.demo import make_cohort

SEED = "test-seed-1"
BASIC = {
    (t[0] << 16) | t[1]: code
    for name, code in CATEGORIES.items()
    for t in getattr(table, name)
    if len(t) == 2
}
REPEATING = [
    (t[0], t[1], t[2], t[3], CATEGORIES[name])
    for name in CATEGORIES
    for t in getattr(table, name)
    if len(t) == 4
]
# The option's column of Table E.1-1 marks every date and time attribute C except
# these three, which keep their basic action.
NOT_MODIFIED = {0x00100030, 0x00100032, 0x00160077}


def basic_action(tag: int) -> str | None:
    """The Basic Profile column for ``tag``: direct entries, then repeating groups."""
    if tag in BASIC:
        return BASIC[tag]
    for group, element, group_mask, element_mask, code in REPEATING:
        if (tag >> 16) & group_mask == group & group_mask and (
            tag & 0xFFFF
        ) & element_mask == element & element_mask:
            return code
    return None


def allowed(tag: int, vr: str) -> set[str]:
    """The outcomes the profile with the Modified Dates option allows for one attribute."""
    if (tag >> 16) & 1:
        return {"removed"}  # private attributes: X
    if (tag >> 16) & 0xFF00 == 0x6000 and basic_action(tag) is None:
        # Beyond the table, by pacsframe's documented choice: an overlay whose data
        # the table removes loses the rest of its group too (it would be invalid).
        return {"removed"}
    if vr in ("DA", "DT", "TM") and tag not in NOT_MODIFIED:
        return {"shifted"}  # the option's C: dates moved by the patient's days
    code = basic_action(tag)
    if code is None:
        return {"kept"}
    out = set()
    for part in code.split("/"):
        out |= {
            "X": {"removed"},
            "Z": {"empty", "dummy"},  # Z allows a dummy value consistent with the VR
            "D": {"dummy"},
            "U": {"new uid"},
            # U*: the sequence stays with the UIDs in its items replaced, which
            # walk() checks item by item against the same table.
            "U*": {"kept"},
        }[part]
    if vr == "SQ" and "dummy" in out:
        out.add("removed")
    return out


def shift_date(value: str, days: int) -> str:
    day = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    return day.strftime("%Y%m%d") + value[8:]


def outcome(before, after, days: int, uid_map: dict[str, str]) -> str:
    """What happened to one attribute, in the terms of :func:`allowed`."""
    if after is None:
        return "removed"
    if before.VR == "SQ":
        if len(after.value) == 0 and len(before.value) > 0:
            return "empty"
        return "kept"  # its items are checked one by one
    old, new = before.value, after.value
    if new in (None, "", b"") or (isinstance(new, list) and not new):
        return "empty" if old not in (None, "", b"") else "empty before and after"
    if before.VR == "UI":
        olds = [old] if isinstance(old, str) else list(old)
        news = [new] if isinstance(new, str) else list(new)
        if olds == news:
            return "kept"
        for o, n in zip(olds, news, strict=True):
            assert n.startswith("2.25.") and len(n) <= 64
            assert uid_map.setdefault(o, n) == n, f"{o} mapped to two UIDs"
        return "new uid"
    if before.VR in ("DA", "DT"):
        olds = [old] if isinstance(old, str) else list(old)
        news = [new] if isinstance(new, str) else list(new)
        if [shift_date(o, days) for o in olds] == news:
            return "shifted"
    if before.VR == "TM" and old == new:
        return "shifted"  # a whole-day shift leaves times of day as they were
    if old == new:
        return "kept"
    return "dummy"


def walk(before: Dataset, after: Dataset, days: int, uid_map, seen: dict, path: str = ""):
    """Check every attribute of ``before`` against the table, recursing into sequences."""
    for element in before:
        tag = int(element.tag)
        vr = element.VR
        if tag == 0x7FE00010:
            continue
        if not (tag >> 16) & 1 and dictionary_has_tag(tag):
            vr = dictionary_VR(tag)
        counterpart = after.get(element.tag) if after is not None else None
        got = outcome(element, counterpart, days, uid_map)
        ok = allowed(tag, vr)
        if ok != {"removed"}:  # an empty value has nothing to remove, shift or replace
            ok = ok | {"empty before and after"}
        where = f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X}) {element.keyword}"
        assert got in ok, f"{where}: {got}, the profile allows {sorted(ok)}"
        seen[got].add(where)
        if vr == "SQ" and got == "kept":
            assert len(counterpart.value) == len(element.value), where
            for i, (a, b) in enumerate(zip(element.value, counterpart.value, strict=True)):
                walk(a, b, days, uid_map, seen, f"{where}[{i}] > ")


def rich_instance(source: Path, reference: Dataset) -> bytes:
    """A cohort instance with what the cohorts lack: private, curve and overlay groups,
    nested references to another instance, DT and other dates, identifying sequences."""
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".99"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 99
    ds.AcquisitionDateTime = ds.StudyDate + "101500.25+0100"
    ds.DateOfSecondaryCapture = ds.StudyDate  # a date the table does not list
    ds.OperatorsName = "Smith^Jo"
    ds.InstitutionAddress = "1 Main Street"
    ds.PatientComments = "called on 5551234"
    ds.OtherPatientIDsSequence = [Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = "OTHER-ID-1"
    ref = Dataset()
    ref.ReferencedSOPClassUID = reference.SOPClassUID
    ref.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    ds.ReferencedImageSequence = [ref]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D1100", "SRT", "Head"
    ds.AnatomicRegionSequence = [code]
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "Doe^John private")
    ds.add_new(0x50000005, "US", 2)  # Curve Dimensions
    ds.add_new(0x50003000, "OW", b"\0\1" * 4)  # Curve Data
    ds.add_new(0x60000010, "US", ds.Rows)  # Overlay Rows
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\0" * (ds.Rows * ds.Columns // 8))
    ds.add_new(0x60004000, "LT", "overlay comment naming Doe")
    return _bytes(ds)


@pytest.fixture(scope="module")
def filled(demo_server, cohort, tmp_path_factory) -> Cache:
    """A cache filled by C-GET from the demo PACS, plus one instance rich in attributes."""
    root = tmp_path_factory.mktemp("export-cache")
    pacs = pf.PACS("127.0.0.1", demo_server.port, ae_title=demo_server.ae_title, cache=root)
    result = pacs.get(pacs.find_studies(), progress=False)
    assert result.failed == 0
    _, manifest = cohort
    first, second = manifest.path.iloc[0], manifest.path.iloc[1]
    pacs.cache.add(rich_instance(Path(second), dcmread(first, stop_before_pixels=True)))
    return pacs.cache


def snapshot(cache: Cache) -> tuple[dict[str, str], list]:
    """Hashes of every file in the cache and its index rows."""
    hashes = {}
    for folder, _, names in os.walk(cache.root):
        for name in names:
            if name.startswith("index.sqlite"):
                continue  # the index is compared by its rows (WAL files move on reads)
            path = Path(folder) / name
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    with sqlite3.connect(cache.root / "index.sqlite") as db:
        rows = db.execute("SELECT * FROM instances ORDER BY SOPInstanceUID").fetchall()
    return hashes, rows


@pytest.fixture(scope="module")
def exported(filled, tmp_path_factory):
    """Everything in the cache exported once, with the cache's state before and after."""
    before = snapshot(filled)
    out = tmp_path_factory.mktemp("export") / "out"
    result = filled.export(filled.find_studies(), out, seed=SEED, progress=False)
    assert snapshot(filled) == before, "the export changed the cache"
    return result


def test_every_attribute_follows_the_profile(filled, exported):
    manifest = exported.manifest
    assert len(manifest) == len(filled) and set(manifest.status) == {"written"}
    uid_map: dict[str, str] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    for row in manifest.itertuples():
        before, after = dcmread(row.source_path), dcmread(row.path)
        walk(before, after, int(row.date_offset_days), uid_map, seen)
        # What the profile adds, and what must follow the new UIDs.
        assert after.PatientIdentityRemoved == "YES"
        codes = {item.CodeValue for item in after.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113107"}
        assert after.DeidentificationMethod
        assert after.LongitudinalTemporalInformationModified == "MODIFIED"
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert after.PixelData == before.PixelData
        assert after.PatientID == row.new_PatientID != row.PatientID
        new = (after.StudyInstanceUID, after.SeriesInstanceUID, after.SOPInstanceUID)
        assert new == (row.new_StudyInstanceUID, row.new_SeriesInstanceUID, row.new_SOPInstanceUID)
        assert Path(row.path) == exported.folder / new[0] / new[1] / f"{new[2]}.dcm"
        # No original identifier survives anywhere in the file's bytes.
        data = Path(row.path).read_bytes()
        for old in (row.PatientID, row.StudyInstanceUID, row.SeriesInstanceUID):
            assert old.encode() not in data
        assert str(before.PatientName).split("^")[0].encode("utf-8") not in data
    # The cohort and the rich instance exercised every kind of outcome.
    assert set(seen) >= {"removed", "empty", "dummy", "new uid", "shifted", "kept"}
    assert any("(0029," in w for w in seen["removed"])  # private
    assert any("(6000,3000)" in w for w in seen["removed"])  # overlay data
    assert any("(5000,3000)" in w for w in seen["removed"])  # curve data
    assert any("ReferencedSOPInstanceUID" in w for w in seen["new uid"])
    assert any("FrameOfReferenceUID" in w for w in seen["new uid"])


def test_references_point_at_the_exported_objects(exported):
    by_new = {Path(p).stem: p for p in exported.manifest.path}
    rich = [
        dcmread(p) for p in exported.manifest.path if dcmread(p).get("ReferencedImageSequence")
    ]
    assert len(rich) == 1
    target = rich[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert target in by_new, "the reference does not follow the referenced object's new UID"
    # Frame of reference: one per series before, one per series after.
    frames = defaultdict(set)
    for path in exported.manifest.path:
        ds = dcmread(path, stop_before_pixels=True)
        frames[ds.SeriesInstanceUID].add(ds.FrameOfReferenceUID)
    assert all(len(v) == 1 for v in frames.values())


def test_dates_keep_their_intervals_per_patient(exported):
    manifest = exported.manifest
    offsets = manifest.groupby("PatientID")["date_offset_days"].nunique()
    assert (offsets == 1).all()
    assert manifest.groupby("PatientID")["date_offset_days"].first().nunique() > 1
    for _, rows in manifest.groupby("PatientID"):
        old = [dcmread(p, stop_before_pixels=True) for p in rows.source_path]
        new = [dcmread(p, stop_before_pixels=True) for p in rows.path]
        day = lambda ds: dt.datetime.strptime(ds.StudyDate, "%Y%m%d")  # noqa: E731
        gaps_old = [(day(a) - day(old[0])).days for a in old]
        gaps_new = [(day(a) - day(new[0])).days for a in new]
        assert gaps_old == gaps_new
        assert [a.StudyTime for a in old] == [a.StudyTime for a in new]
        assert {(day(a) - day(b)).days for a, b in zip(new, old, strict=True)} == {
            int(rows.date_offset_days.iloc[0])
        }


def test_same_seed_same_mapping_across_runs_and_parts(filled, exported, tmp_path):
    studies = filled.find_studies()
    # Two runs over halves into one folder give what one run over all gave.
    out = tmp_path / "parts"
    first = filled.export(studies.iloc[:2], out, seed=SEED, progress=False)
    second = filled.export(studies, out, seed=SEED, progress=False)
    assert first.written + second.written == len(filled)
    assert second.present == first.written
    relative = lambda r: sorted(  # noqa: E731
        str(Path(p).relative_to(r.folder)) for p in r.manifest.path
    )
    assert relative(second) == relative(exported)
    for path in second.manifest.path:
        twin = exported.folder / Path(path).relative_to(out)
        assert Path(path).read_bytes() == twin.read_bytes()
    # Another seed gives other identifiers.
    other = filled.export(studies.iloc[:1], tmp_path / "other", seed="x", progress=False)
    assert not set(other.manifest.new_SOPInstanceUID) & set(exported.manifest.new_SOPInstanceUID)


def test_random_seed_is_returned_and_resumes(filled, tmp_path):
    studies = filled.find_studies().iloc[:1]
    result = filled.export(studies, tmp_path / "r", progress=False)
    assert isinstance(result.seed, str) and len(result.seed) >= 32
    with pytest.raises(CacheError, match="already holds an export"):
        filled.export(studies, tmp_path / "r", progress=False)
    again = filled.export(studies, tmp_path / "r", seed=result.seed, progress=False)
    assert again.present == len(again.manifest) == len(result.manifest)
    other = filled.export(studies, tmp_path / "r2", progress=False)
    assert other.seed != result.seed


def test_an_interrupted_export_with_a_random_seed_hands_the_seed_over(filled, tmp_path):
    def stop(row):
        raise KeyboardInterrupt

    studies = filled.find_studies()
    with pytest.raises(KeyboardInterrupt) as caught:
        filled.export(studies, tmp_path / "r", progress=False, on_exported=stop)
    seed = caught.value.export_seed
    assert seed not in str(caught.value) and not any(seed in n for n in caught.value.__notes__)
    result = filled.export(studies, tmp_path / "r", seed=seed, progress=False)
    assert (result.present, result.written) == (1, len(filled) - 1)


def test_dates_of_every_form_move_by_the_same_days():
    from pacsframe.deidentify import Profile, deidentify_dataset

    ds = Dataset()
    ds.StudyDate = "20240110"
    ds.AcquisitionDateTime = "20240110101500.25+0100"
    ds.add_new(0x0018A002, "DT", "2024")  # ContributionDateTime, year precision
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # pydicom's check
        ds.add_new(0x0040A121, "DA", "not a date")  # Date: nothing to shift, so emptied
    ds.CalibrationDate = ["20240101", "20240301"]  # multi-valued
    ds.StudyTime = "101500"
    out = deidentify_dataset(ds, Profile("s"), -10)
    assert out.StudyDate == "20231231"
    assert out.AcquisitionDateTime == "20231231101500.25+0100"
    assert out[0x0018A002].value == "2023"
    assert out[0x0040A121].value == ""
    assert list(out.CalibrationDate) == ["20231222", "20240220"]
    assert out.StudyTime == "101500"


def test_interrupted_export_resumes(filled, exported, tmp_path):
    out = tmp_path / "resume"
    calls = []

    def fail_on_third(row):
        calls.append(row)
        if len(calls) == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        filled.export(
            filled.find_studies(), out, seed=SEED, progress=False, on_exported=fail_on_third
        )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(p.suffix == ".dcm" for p in files)
    result = filled.export(filled.find_studies(), out, seed=SEED, progress=False)
    assert (result.present, result.written) == (3, len(filled) - 3)
    for path in result.manifest.path:
        twin = exported.folder / Path(path).relative_to(out)
        assert Path(path).read_bytes() == twin.read_bytes()
    assert not [p for p in out.rglob(".*")], "a temporary file was left"


def test_a_killed_writers_temporary_file_is_removed(filled, tmp_path):
    out = tmp_path / "killed"
    first = filled.export(filled.find_series().iloc[:1], out, seed=SEED, progress=False)
    folder = Path(first.manifest.path.iloc[0]).parent
    Path(first.manifest.path.iloc[0]).unlink()
    # The name a writer in a process that no longer exists would have left.
    from pacsframe.cache import _host_tag

    stray = folder / f".x.dcm.{_host_tag()}-999999999-0123456789abcdef.part"
    stray.write_bytes(b"DICM partial")
    again = filled.export(filled.find_series().iloc[:1], out, seed=SEED, progress=False)
    assert again.written == 1 and not stray.exists()


def test_manifest_written_outside_the_export_only(filled, tmp_path):
    out = tmp_path / "m" / "out"
    series = filled.find_series().iloc[:1]
    with pytest.raises(CacheError, match="inside the export folder"):
        filled.export(series, out, seed=SEED, manifest=out / "sub" / "manifest.csv")
    assert not out.exists(), "a refused export wrote something"
    result = filled.export(
        series, out, seed=SEED, manifest=tmp_path / "m" / "key.csv", progress=False
    )
    assert result.manifest_path == tmp_path / "m" / "key.csv"
    back = pd.read_csv(result.manifest_path, dtype=str)
    expected = result.manifest.astype(str)
    assert back.columns.tolist() == expected.columns.tolist()
    assert back.equals(expected)
    again = filled.export(
        series, out, seed=SEED, manifest=tmp_path / "key.parquet", progress=False
    )
    pd.testing.assert_frame_equal(pd.read_parquet(again.manifest_path), again.manifest)
    assert again.manifest.drop(columns="status").equals(result.manifest.drop(columns="status"))
    # Only the objects are in the export, named by new UIDs only.
    names = {p.relative_to(out).parts for p in out.rglob("*") if p.is_file()}
    assert len(names) == len(result.manifest)
    olds = set(
        result.manifest[["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]].stack()
    )
    olds |= set(result.manifest.PatientID)
    for parts in names:
        assert not set(parts) & olds and parts[-1].endswith(".dcm")
        assert not {p.removesuffix(".dcm") for p in parts} & olds


def test_plain_copy_is_byte_identical(filled, tmp_path):
    series = filled.find_series().iloc[:1]
    before = snapshot(filled)
    result = filled.export(series, tmp_path / "plain", deidentify=False, progress=False)
    assert result.seed is None and result.manifest.date_offset_days.isna().all()
    for row in result.manifest.itertuples():
        assert Path(row.path).read_bytes() == Path(row.source_path).read_bytes()
        assert row.new_SOPInstanceUID == row.SOPInstanceUID
        assert Path(row.path).relative_to(tmp_path / "plain").parts == (
            row.StudyInstanceUID,
            row.SeriesInstanceUID,
            f"{row.SOPInstanceUID}.dcm",
        )
    assert snapshot(filled) == before


def test_bad_arguments_give_sentences(filled, tmp_path):
    series = filled.find_series().iloc[:1]
    cases = [
        ((series, filled.root / "x"), {}, "overlaps the cache"),
        ((series, filled.root.parent), {}, "overlaps the cache"),
        ((series, tmp_path / "o"), {"manifest": tmp_path / "key.txt"}, r"\.csv or \.parquet"),
        ((series, tmp_path / "o"), {"seed": 42}, "non-empty string"),
        ((series, tmp_path / "o"), {"seed": ""}, "non-empty string"),
        (("1.2.3", tmp_path / "o"), {}, "wrap a single UID in a list"),
        ((["1.2.3", "1.2.4"], tmp_path / "o"), {}, "2 of the 2 SOPInstanceUID"),
        ((series, 42), {}, "as a path"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(CacheError, match=message):
            filled.export(*args, progress=False, **kwargs)
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        filled.export(series, tmp_path / "file", progress=False)


@pytest.fixture
def small(tmp_path) -> Cache:
    """A cache of its own, for tests that tamper with it."""
    manifest = make_cohort(
        tmp_path / "src",
        patients=1,
        matrix=8,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=2,
    )
    cache = Cache(tmp_path / "cache")
    for path in manifest.path:
        cache.add(Path(path).read_bytes())
    return cache


def outside(tmp_path: Path) -> set[Path]:
    return {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts}


def test_path_like_uid_in_a_cached_file_never_escapes(small, tmp_path):
    row = small.instances().iloc[0]
    path = Path(small.locate("image", [row.SOPInstanceUID]).path.iloc[0])
    ds = dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom: not a valid UI value
        ds.SOPInstanceUID = "../../../../escaped"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)  # a cache tampered with behind its back
    before = outside(tmp_path)
    with (
        pytest.raises(CacheError, match="does not hold the instance its index row names"),
        pytest.warns(UserWarning, match="Invalid value for VR UI"),  # pydicom reading it
    ):
        small.export(small.find_studies(), tmp_path / "out", seed=SEED, progress=False)
    assert outside(tmp_path) == before
    # A plain copy is named by the index's checked UIDs, whatever the file says.
    result = small.export(
        small.find_studies(), tmp_path / "out2" / "out", deidentify=False, progress=False
    )
    assert all(
        Path(p).resolve().is_relative_to(tmp_path / "out2" / "out") for p in result.manifest.path
    )
    assert outside(tmp_path) - before <= {tmp_path / "out2"}


def test_path_like_uid_in_the_index_is_refused(small, tmp_path):
    sop = small.instances().SOPInstanceUID.iloc[0]
    with sqlite3.connect(small.root / "index.sqlite") as db:
        db.execute(
            "UPDATE instances SET SOPInstanceUID = ? WHERE SOPInstanceUID = ?", ("../../evil", sop)
        )
    before = outside(tmp_path)
    with pytest.raises(CacheError, match="not a valid UID"):
        small.export(small.find_studies(), tmp_path / "out", deidentify=False, progress=False)
    assert not (tmp_path / "out").exists() and outside(tmp_path) == before
    # De-identified, the path is made of new UIDs, but the file does not match its row.
    with pytest.raises(CacheError, match="does not hold the instance"):
        small.export(small.find_studies(), tmp_path / "out", seed=SEED, progress=False)
    assert outside(tmp_path) == before


def test_sequences_the_table_replaces_are_removed(small, tmp_path):
    """A D sequence (Operator Identification) goes; a Z sequence is emptied."""
    path = Path(small.locate("study", small.find_studies().StudyInstanceUID).path.iloc[0])
    ds = dcmread(path)
    operator = Dataset()
    operator.PersonAddress = "1 Main Street"
    ds.OperatorIdentificationSequence = [operator]
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = ds.StudyInstanceUID
    small.clear()
    small.add(_bytes(ds))
    result = small.export(small.find_studies(), tmp_path / "out", seed=SEED, progress=False)
    after = dcmread(result.manifest.path.iloc[0])
    assert "OperatorIdentificationSequence" not in after
    assert "ReferencedStudySequence" not in after or len(after.ReferencedStudySequence) == 0


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
