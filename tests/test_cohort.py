"""Tests of the synthetic cohort writer, pacsframe.demo.cohort."""

from __future__ import annotations

import doctest
import io
import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from pacsframe.demo import cohort as cohort_module
from pacsframe.demo.cohort import make_cohort

COLUMNS = [
    "path",
    "PatientID",
    "PatientName",
    "SpecificCharacterSet",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "PixelSpacing",
    "SliceThickness",
]
SMALL = {
    "patients": 5,
    "seed": 7,
    "studies_per_patient": (1, 2),
    "series_per_study": (1, 3),
    "instances_per_series": (2, 5),
    "matrix": 16,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("small")
    return folder, make_cohort(folder, **SMALL)


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read(path: str) -> Dataset:
    return pydicom.dcmread(path)


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_files_and_manifest(tmp_path, small):
    folder, manifest = small
    again = make_cohort(tmp_path, **SMALL)
    assert files_under(tmp_path) == files_under(folder)
    relative = lambda frame, root: frame.assign(  # noqa: E731
        path=[os.path.relpath(p, root) for p in frame.path]
    )
    pd.testing.assert_frame_equal(relative(again, tmp_path), relative(manifest, folder))


def test_rewriting_into_the_same_folder_is_idempotent(tmp_path):
    args = {**SMALL, "patients": 2}
    first = make_cohort(tmp_path, **args)
    before = files_under(tmp_path)
    second = make_cohort(tmp_path, **args)
    pd.testing.assert_frame_equal(first, second)
    assert files_under(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_different_seeds_give_disjoint_identifiers(tmp_path):
    args = {**SMALL, "patients": 4}
    a = make_cohort(tmp_path / "a", **{**args, "seed": 1})
    b = make_cohort(tmp_path / "b", **{**args, "seed": 2})
    for column in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert not set(a[column]) & set(b[column]), column
    frames = lambda m: {read(p).FrameOfReferenceUID for p in m.path}  # noqa: E731
    assert not frames(a) & frames(b)
    accessions = lambda m: set(m.AccessionNumber) - {""}  # noqa: E731
    assert not accessions(a) & accessions(b)


def test_other_shape_arguments_change_uids(tmp_path):
    a = make_cohort(tmp_path / "a", 2, seed=3, matrix=16)
    b = make_cohort(tmp_path / "b", 2, seed=3, matrix=32)
    assert not set(a.SOPInstanceUID) & set(b.SOPInstanceUID)
    assert list(a.PatientID.unique()) == list(b.PatientID.unique())


def test_a_smaller_cohort_is_the_first_patients_of_a_larger_one(tmp_path):
    args = {**SMALL}
    del args["patients"]
    few = make_cohort(tmp_path / "few", 3, **args)
    many = make_cohort(tmp_path / "many", 6, **args)
    head = many[many.PatientID.isin(few.PatientID)].reset_index(drop=True)
    pd.testing.assert_frame_equal(head.drop(columns="path"), few.drop(columns="path"))


# -------------------------------------------------------------------------------- validity


def test_manifest_shape_and_types(small):
    folder, manifest = small
    assert list(manifest.columns) == COLUMNS
    keys = ["PatientID", "StudyInstanceUID", "SeriesNumber", "InstanceNumber"]
    assert manifest.equals(manifest.sort_values(keys).reset_index(drop=True))
    for column in ("SeriesNumber", "InstanceNumber", "Rows", "Columns"):
        assert str(manifest[column].dtype) == "int64"
    assert str(manifest.SliceThickness.dtype) == "float64"
    assert manifest.SOPInstanceUID.is_unique
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in manifest.path)
    assert sorted(manifest.path) == sorted(str(p) for p in folder.rglob("*.dcm"))
    for value in manifest.ImagePositionPatient:
        assert isinstance(value, tuple) and len(value) == 3
        assert all(isinstance(v, float) for v in value)
    for value in manifest.PixelSpacing:
        assert isinstance(value, tuple) and len(value) == 2


def test_every_file_is_valid_part10_and_matches_the_manifest(small):
    _, manifest = small
    for row in manifest.itertuples(index=False):
        raw = Path(row.path).read_bytes()
        assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
        ds = read(row.path)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == row.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == row.SOPInstanceUID
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert UID(meta.ImplementationClassUID).is_valid
        # The group length must be right, or strict readers reject the file.
        assert meta.FileMetaInformationGroupLength == raw.index(b"\x08\x00", 144) - 144
        # Layout: <study>/<series>/<sop>.dcm
        parts = Path(row.path).parts[-3:]
        assert parts == (row.StudyInstanceUID, row.SeriesInstanceUID, f"{row.SOPInstanceUID}.dcm")
        for uid in (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            ds.FrameOfReferenceUID,
        ):
            assert UID(uid).is_valid and len(uid) <= 64
        assert ds.pixel_array.shape == (row.Rows, row.Columns) == (16, 16)
        assert ds.pixel_array.dtype == np.uint16
        expected = {
            "PatientID": row.PatientID,
            "PatientSex": row.PatientSex,
            "PatientBirthDate": row.PatientBirthDate,
            "StudyInstanceUID": row.StudyInstanceUID,
            "StudyDate": row.StudyDate,
            "StudyTime": row.StudyTime,
            "AccessionNumber": row.AccessionNumber,
            "StudyDescription": row.StudyDescription,
            "SeriesInstanceUID": row.SeriesInstanceUID,
            "SeriesDescription": row.SeriesDescription,
            "Modality": row.Modality,
        }
        assert {key: ds[key].value for key in expected} == expected
        assert str(ds.PatientName) == row.PatientName
        assert ds.get("SpecificCharacterSet", "") == row.SpecificCharacterSet
        assert ds.SeriesNumber == row.SeriesNumber
        assert ds.InstanceNumber == row.InstanceNumber
        assert tuple(float(v) for v in ds.ImagePositionPatient) == row.ImagePositionPatient
        assert tuple(float(v) for v in ds.PixelSpacing) == row.PixelSpacing
        assert float(ds.SliceThickness) == row.SliceThickness


def test_files_are_exactly_what_dcmwrite_writes(small):
    # The writer assembles files from pre-encoded elements for speed; a dataset built
    # afresh with the ordinary pydicom API and written by dcmwrite must give the same bytes.
    _, manifest = small
    for path in manifest.path:
        stored = read(path)
        fresh = Dataset()
        if "SpecificCharacterSet" in stored:
            fresh.SpecificCharacterSet = stored.SpecificCharacterSet
        for element in stored:
            if element.keyword != "SpecificCharacterSet":
                value = element.value
                setattr(fresh, element.keyword, str(value) if element.VR == "PN" else value)
        fresh["PixelData"].VR = "OW"
        fresh.file_meta = FileMetaDataset()
        for keyword in ("MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID"):
            setattr(fresh.file_meta, keyword, stored.file_meta[keyword].value)
        fresh.file_meta.ImplementationVersionName = stored.file_meta.ImplementationVersionName
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, fresh, enforce_file_format=True)
        assert buffer.getvalue() == Path(path).read_bytes(), path


def test_modality_specific_attributes(small):
    _, manifest = small
    for modality, rows in manifest.groupby("Modality"):
        ds = read(rows.path.iloc[0])
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert (ds.PixelRepresentation, ds.SamplesPerPixel) == (0, 1)
        assert ds.BodyPartExamined
        if modality == "CT":
            assert ds.SOPClassUID == CTImageStorage
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
            for keyword in ("KVP", "ConvolutionKernel", "WindowCenter", "WindowWidth"):
                assert ds[keyword].value not in (None, ""), keyword
        else:
            assert ds.SOPClassUID == MRImageStorage
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M"]
            for keyword in (
                "EchoTime",
                "RepetitionTime",
                "MagneticFieldStrength",
                "ScanningSequence",
                "SequenceVariant",
                "SequenceName",
            ):
                assert ds[keyword].value not in (None, ""), keyword
        for keyword in (
            "Manufacturer",
            "ManufacturerModelName",
            "StationName",
            "InstitutionName",
            "StudyID",
            "PatientAge",
            "SeriesDate",
            "SeriesTime",
            "ContentDate",
            "ContentTime",
            "AcquisitionDate",
        ):
            assert keyword in ds, keyword


def test_writing_raises_no_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest = make_cohort(tmp_path, **{**SMALL, "patients": 4})
        for path in manifest.path:
            read(path).pixel_array  # noqa: B018


def test_pixel_data_is_a_phantom_not_noise(small):
    _, manifest = small
    for _, series in manifest.groupby("SeriesInstanceUID"):
        images = [read(p) for p in series.path]
        arrays = [ds.pixel_array.astype(int) for ds in images]
        for array in arrays:
            assert array.max() <= 4095
            # A body on a dark background: the corner is darker than the centre.
            assert array[0, 0] < array[5:11, 5:11].mean()
        if images[0].Modality == "CT":
            hu = arrays[0] + int(images[0].RescaleIntercept)
            assert -1100 < hu[0, 0] < -900  # air around the patient
        if len(arrays) > 2:
            assert any(not np.array_equal(arrays[0], a) for a in arrays[1:])


def test_pixels_show_structure_at_a_larger_matrix(tmp_path):
    manifest = make_cohort(tmp_path, 1, seed=2, instances_per_series=3, matrix=64)
    array = read(manifest.path.iloc[1]).pixel_array.astype(float)
    # Smoothing the noise away leaves several distinct tissue levels.
    levels = np.unique(np.round(array / 100))
    assert len(levels) >= 4


def test_dates_and_times_are_realistic(small):
    _, manifest = small
    assert manifest.StudyDate.between("20260105", "20260430").all()
    assert manifest.StudyTime.str.fullmatch(r"(0[7-9]|1\d)[0-5]\d[0-5]\d").all()
    births = manifest.PatientBirthDate[manifest.PatientBirthDate != ""]
    assert births.str.fullmatch(r"(19|20)\d{6}").all()
    for path in manifest.drop_duplicates("SeriesInstanceUID").path:
        ds = read(path)
        assert ds.StudyDate <= ds.SeriesDate <= ds.ContentDate
        assert ds.PatientAge[:3].isdigit() and ds.PatientAge.endswith("Y")


# --------------------------------------------------------------------------- character sets


def test_first_three_patients_cover_the_three_character_set_kinds(small):
    _, manifest = small
    patients = manifest.drop_duplicates("PatientID").set_index("PatientID")
    assert patients.loc["PF070001", ["PatientName", "SpecificCharacterSet"]].tolist() == [
        "Łukasiewicz^Zoë",
        "ISO_IR 192",
    ]
    assert patients.loc["PF070002", ["PatientName", "SpecificCharacterSet"]].tolist() == [
        "Müller^Jürgen",
        "ISO_IR 100",
    ]
    assert patients.loc["PF070003", ["PatientName", "SpecificCharacterSet"]].tolist() == [
        "Smith^John",
        "",
    ]


def test_names_are_encoded_on_disk_as_declared(tmp_path):
    manifest = make_cohort(tmp_path, 40, seed=4, studies_per_patient=1, series_per_study=1,
                           instances_per_series=1, matrix=8)  # fmt: skip
    kinds = set()
    for row in manifest.itertuples():
        raw = Path(row.path).read_bytes()
        ds = read(row.path)
        assert str(ds.PatientName) == row.PatientName
        if row.SpecificCharacterSet == "ISO_IR 192":
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert row.PatientName.encode("utf-8") in raw
            with pytest.raises(UnicodeEncodeError):
                row.PatientName.encode("latin-1")
        elif row.SpecificCharacterSet == "ISO_IR 100":
            assert ds.SpecificCharacterSet == "ISO_IR 100"
            assert row.PatientName.encode("latin-1") in raw
            assert row.PatientName.encode("utf-8") not in raw
            assert not row.PatientName.isascii()
        else:
            assert row.SpecificCharacterSet == ""
            assert "SpecificCharacterSet" not in ds
            assert b"\x08\x00\x05\x00CS" not in raw
            assert row.PatientName.isascii()
            assert row.PatientName.encode("ascii") in raw
        kinds.add(row.SpecificCharacterSet)
    assert kinds == {"ISO_IR 192", "ISO_IR 100", ""}
    # Names drawn after the first three patients come from the pools too.
    assert manifest.PatientName.nunique() > 3


def test_name_pools():
    for name, _ in cohort_module._UTF8_NAMES:
        with pytest.raises(UnicodeEncodeError):
            name.encode("latin-1")
    for name, _ in cohort_module._LATIN1_NAMES:
        name.encode("latin-1")
        assert not name.isascii()
    for name, _ in cohort_module._ASCII_NAMES:
        assert name.isascii()
    # Distinct family-name prefixes after case and accent folding, so a wildcard query
    # such as "Mül*" selects one family even on servers that fold (Orthanc does).
    names = [
        name
        for pool in (cohort_module._UTF8_NAMES, cohort_module._LATIN1_NAMES)
        for name, _ in pool
    ] + [name for name, _ in cohort_module._ASCII_NAMES]

    def fold(text: str) -> str:
        decomposed = unicodedata.normalize("NFKD", text.replace("ß", "ss").replace("Ł", "L"))
        return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()

    prefixes = [fold(name.split("^")[0])[:3] for name in names]
    assert len(set(prefixes)) == len(prefixes)
    sexes = {sex for pool in cohort_module._CHARSETS for _, sex in pool[1]}
    assert sexes == {"M", "F", "O"}


# ----------------------------------------------------------------------------- empty values


def test_empty_values_are_present_and_zero_length(small):
    _, manifest = small
    patients = manifest.drop_duplicates("PatientID")
    studies = manifest.drop_duplicates("StudyInstanceUID")
    series = manifest.drop_duplicates("SeriesInstanceUID")
    checks = [
        (patients[patients.PatientBirthDate == ""], "PatientBirthDate", b"\x10\x00\x30\x00DA"),
        (studies[studies.AccessionNumber == ""], "AccessionNumber", b"\x08\x00\x50\x00SH"),
        (studies[studies.StudyDescription == ""], "StudyDescription", b"\x08\x00\x30\x10LO"),
        (series[series.SeriesDescription == ""], "SeriesDescription", b"\x08\x00\x3e\x10LO"),
    ]
    for rows, keyword, header in checks:
        assert len(rows), keyword
        for path in rows.path:
            ds = read(path)
            assert keyword in ds and ds[keyword].value == "" and ds[keyword].is_empty
            assert header + b"\x00\x00" in Path(path).read_bytes()
    # Not everything is empty.
    assert (studies.AccessionNumber != "").any() and (series.SeriesDescription != "").any()


# ---------------------------------------------------------------------------------- studies


def test_mixed_study_and_single_modality_studies(small):
    _, manifest = small
    per_study = manifest.groupby("StudyInstanceUID").Modality.agg(frozenset)
    assert (per_study == frozenset({"CT", "MR"})).sum() >= 1
    assert (per_study.map(len) == 1).sum() >= (per_study.map(len) == 2).sum()


def test_modalities_argument_is_respected(tmp_path):
    manifest = make_cohort(tmp_path, 4, seed=1, modalities=["MR"], matrix=8)
    assert set(manifest.Modality) == {"MR"}
    assert set(manifest.SOPClassUID) == {str(MRImageStorage)}


def test_no_mixed_study_when_series_counts_forbid_it(tmp_path):
    manifest = make_cohort(tmp_path, 4, seed=1, series_per_study=1, matrix=8)
    assert manifest.groupby("StudyInstanceUID").Modality.nunique().eq(1).all()


def test_study_descriptions_fit_the_modality(small):
    _, manifest = small
    for _, study in manifest.groupby("StudyInstanceUID"):
        description = study.StudyDescription.iloc[0]
        for modality in set(study.Modality):
            assert description == "" or modality in description


# --------------------------------------------------------------------------------- geometry


def test_geometry_is_consistent(small):
    _, manifest = small
    for _, series in manifest.groupby("SeriesInstanceUID"):
        series = series.sort_values("InstanceNumber")
        assert series.InstanceNumber.tolist() == list(range(1, len(series) + 1))
        datasets = [read(p) for p in series.path]
        z = np.array([position[2] for position in series.ImagePositionPatient])
        assert len({position[:2] for position in series.ImagePositionPatient}) == 1
        first = datasets[0]
        step = float(first.get("SpacingBetweenSlices", first.SliceThickness))
        if len(z) > 1:
            assert (np.diff(z) > 0).all()
            assert np.allclose(np.diff(z), step, atol=2e-4)
        assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
        for ds, expected_z in zip(datasets, z, strict=True):
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(ds.SliceLocation) == expected_z
            assert float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) > 0


def test_pixel_spacing_scales_with_the_matrix(tmp_path):
    small = make_cohort(tmp_path / "a", 1, seed=9, matrix=16, instances_per_series=1)
    large = make_cohort(tmp_path / "b", 1, seed=9, matrix=64, instances_per_series=1)
    ratio = small.PixelSpacing.iloc[0][0] / large.PixelSpacing.iloc[0][0]
    assert ratio == pytest.approx(4, rel=1e-3)


def test_files_of_a_series_are_written_in_shuffled_order(tmp_path, monkeypatch):
    order: list[str] = []
    original = cohort_module.atomic_write

    def recording(path, chunks):
        order.append(path)
        original(path, chunks)

    monkeypatch.setattr(cohort_module, "atomic_write", recording)
    manifest = make_cohort(tmp_path, 3, seed=5, instances_per_series=8, matrix=8)
    number = dict(zip(manifest.path, manifest.InstanceNumber, strict=True))
    series = dict(zip(manifest.path, manifest.SeriesInstanceUID, strict=True))
    shuffled = 0
    for uid in manifest.SeriesInstanceUID.unique():
        written = [number[p] for p in order if series[p] == uid]
        shuffled += written != sorted(written)
    assert shuffled > 0


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(cohort_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        make_cohort(tmp_path, 1, seed=1, matrix=8)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------------- counts


def test_exact_counts(tmp_path):
    manifest = make_cohort(
        tmp_path,
        3,
        seed=2,
        studies_per_patient=2,
        series_per_study=3,
        instances_per_series=4,
        matrix=8,
    )
    assert manifest.PatientID.nunique() == 3
    assert manifest.groupby("PatientID").StudyInstanceUID.nunique().eq(2).all()
    assert manifest.groupby("StudyInstanceUID").SeriesInstanceUID.nunique().eq(3).all()
    assert manifest.groupby("SeriesInstanceUID").size().eq(4).all()
    assert len(manifest) == 3 * 2 * 3 * 4
    assert (manifest.Rows == 8).all() and (manifest.Columns == 8).all()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    patients=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    studies=st.tuples(st.integers(1, 3), st.integers(0, 2)).map(lambda t: (t[0], t[0] + t[1])),
    series=st.tuples(st.integers(1, 3), st.integers(0, 2)).map(lambda t: (t[0], t[0] + t[1])),
    instances=st.tuples(st.integers(1, 3), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1])),
)
def test_ranges_are_respected(tmp_path_factory, patients, seed, studies, series, instances):
    folder = tmp_path_factory.mktemp("ranges")
    manifest = make_cohort(
        folder,
        patients,
        seed=seed,
        studies_per_patient=studies,
        series_per_study=series,
        instances_per_series=instances,
        matrix=8,
    )
    per_patient = manifest.groupby("PatientID").StudyInstanceUID.nunique()
    per_study = manifest.groupby("StudyInstanceUID").SeriesInstanceUID.nunique()
    per_series = manifest.groupby("SeriesInstanceUID").size()
    assert len(per_patient) == patients
    assert per_patient.between(*studies).all()
    assert per_study.between(*series).all()
    assert per_series.between(*instances).all()
    assert manifest.PatientID.str.fullmatch(rf"PF{seed:02d}\d{{4}}").all()
    assert len(list(folder.rglob("*.dcm"))) == len(manifest)


# -------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patients": 0}, r"patients must be between 1 and 9999, got 0"),
        ({"patients": 10_000}, r"patients must be between 1 and 9999"),
        ({"patients": 2.0}, r"patients must be an integer, got 2\.0"),
        ({"patients": True}, r"patients must be an integer"),
        ({"seed": -1}, r"seed must be between 0 and"),
        ({"seed": "1"}, r"seed must be an integer"),
        ({"matrix": 4}, r"matrix must be between 8 and 1024"),
        ({"matrix": 16.5}, r"matrix must be an integer"),
        ({"studies_per_patient": 0}, r"studies_per_patient must be at least 1"),
        ({"series_per_study": (3, 1)}, r"series_per_study range \(3, 1\) is empty"),
        ({"instances_per_series": (1, 2, 3)}, r"instances_per_series must be an int or a"),
        ({"instances_per_series": (0, 2)}, r"instances_per_series must be at least 1"),
        ({"instances_per_series": "4"}, r"instances_per_series must be an int or a"),
        ({"modalities": "CT"}, r"modalities must be a sequence .*\('CT',\)"),
        ({"modalities": ()}, r"modalities is empty"),
        ({"modalities": ("CT", "US")}, r"modalities contains \['US'\]"),
        ({"modalities": ("ct",)}, r"use only 'CT', 'MR'"),
        ({"modalities": ("CT", "CT")}, r"lists a modality twice"),
    ],
)
def test_bad_arguments_raise_helpful_value_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as caught:
        make_cohort(tmp_path, **kwargs)
    text = str(caught.value)
    assert text.endswith(".") and (";" in text or "pass" in text)
    assert not list(tmp_path.iterdir())


def test_directory_must_be_a_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        make_cohort(afile, 1)
    with pytest.raises(ValueError, match="non-empty path"):
        make_cohort("", 1)
    with pytest.raises(ValueError, match="non-empty path"):
        make_cohort(None, 1)  # type: ignore[arg-type]


def test_directory_is_created(tmp_path):
    target = tmp_path / "a" / "b"
    manifest = make_cohort(str(target), 1, seed=1, matrix=8)
    assert target.is_dir()
    assert all(p.startswith(str(target)) for p in manifest.path)


# ------------------------------------------------------------------------------ speed, docs


def test_two_thousand_instances_sanity(tmp_path):
    manifest = make_cohort(
        tmp_path,
        100,
        seed=3,
        studies_per_patient=2,
        series_per_study=2,
        instances_per_series=5,
        matrix=16,
    )
    assert len(manifest) == 2000
    assert manifest.SOPInstanceUID.is_unique
    assert len(list(tmp_path.rglob("*.dcm"))) == 2000


def test_docstring_examples_run():
    result = doctest.testmod(cohort_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
