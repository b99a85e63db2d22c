"""Small synthetic archives for the result-cap tests: one instance per study, dated at will.

Header-only objects (Secondary Capture, no pixel data): C-FIND is all these tests
exercise, and Orthanc indexes them as fast as it indexes anything.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["write_studies"]

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_studies(
    folder: str | Path,
    when: list[tuple[str, str]],
    *,
    seed: str = "caps",
    birth_dates: list[str] | None = None,
    instances: int = 1,
    patients: int | None = None,
    prefix: str = "CAP",
) -> pd.DataFrame:
    """Write one study per ``(StudyDate, StudyTime)`` (``""`` for none); return a manifest.

    Study ``i`` belongs to patient ``<prefix><i % patients>`` (by default one patient
    per study), born on ``birth_dates[i % patients]`` when given, and holds one
    series of ``instances`` objects.
    """
    folder = Path(folder)
    rows = []
    for i, (date, time) in enumerate(when):
        patient = i % patients if patients else i
        study = generate_uid(entropy_srcs=[seed, "study", str(i)])
        series = generate_uid(entropy_srcs=[seed, "series", str(i)])
        for n in range(instances):
            sop = generate_uid(entropy_srcs=[seed, "sop", str(i), str(n)])
            ds = Dataset()
            ds.SOPClassUID = _SECONDARY_CAPTURE
            ds.SOPInstanceUID = sop
            ds.PatientID = f"{prefix}{patient:04d}"
            ds.PatientName = f"Capped^Patient{patient}"
            ds.PatientBirthDate = birth_dates[patient] if birth_dates else ""
            ds.PatientSex = "O"
            ds.StudyInstanceUID = study
            ds.StudyDate = date
            ds.StudyTime = time
            ds.StudyID = str(i)
            ds.AccessionNumber = f"ACC{i}"
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = 1
            ds.InstanceNumber = n + 1
            ds.Modality = "OT"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            path = folder / study / series / f"{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            rows.append(
                {
                    "path": str(path),
                    "PatientID": ds.PatientID,
                    "PatientBirthDate": ds.PatientBirthDate,
                    "StudyInstanceUID": study,
                    "StudyDate": date,
                    "StudyTime": time,
                    "SeriesInstanceUID": series,
                    "SOPInstanceUID": sop,
                }
            )
    return pd.DataFrame(rows)
