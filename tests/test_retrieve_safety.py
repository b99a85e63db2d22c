"""Retrieval stays inside the cache and in bounded memory."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort


@pytest.fixture
def hostile_server(tmp_path):
    """A demo PACS whose folder holds objects with path-like and invalid SOP UIDs."""
    folder = tmp_path / "served"
    manifest = make_cohort(
        folder, patients=1, seed=31, studies_per_patient=1, series_per_study=1, matrix=8
    )
    first = manifest.iloc[0]
    for name, uid in (("hostile-1", "../../escape"), ("hostile-2", "1.2.abc")):
        ds = pydicom.dcmread(first.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(folder / f"{name}.dcm")
    with DemoPACS(folder) as server:
        yield server, manifest


def test_hostile_uids_are_refused_and_nothing_escapes(hostile_server, tmp_path):
    server, manifest = hostile_server
    root = tmp_path / "cache"
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=root)
    result = pacs.get(pacs.find_series(pacs.find_studies()), progress=False)
    assert result.completed == len(manifest)
    assert result.failed == 2
    errors = " ".join(result.failed_instances.error)
    assert "'../../escape' is not a valid UID" in errors or "not a valid UID" in errors
    outside = [p for p in tmp_path.rglob("*escape*")]
    assert outside == []
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve())
    assert sorted(pacs.cache.instances().SOPInstanceUID) == sorted(manifest.SOPInstanceUID)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def big_study(tmp_path_factory):
    """One CT study of 4 series x 125 slices of 512 x 512: 500 objects, about 260 MB.

    make_cohort draws one slice per series (drawing 500 phantoms of that size takes
    most of a minute); the other slices are byte copies of it with their own UIDs and
    instance numbers, which is all a retrieval looks at.
    """
    folder = tmp_path_factory.mktemp("big")
    drawn = make_cohort(
        folder,
        patients=1,
        seed=41,
        studies_per_patient=1,
        series_per_study=4,
        instances_per_series=1,
        matrix=512,
        modalities=("CT",),
    )
    rows = []
    for row in drawn.to_dict("records"):
        ds = pydicom.dcmread(row["path"])
        rows.append(row)
        for number in range(2, 126):
            uid = generate_uid(prefix=None, entropy_srcs=[row["SOPInstanceUID"], str(number)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = number
            path = Path(row["path"]).with_name(f"{uid}.dcm")
            ds.save_as(path, enforce_file_format=True)
            copy = {"path": str(path), "SOPInstanceUID": uid, "InstanceNumber": number}
            rows.append({**row, **copy})
    manifest = pd.DataFrame(rows)
    with DemoPACS(folder) as server:
        yield server, manifest


def test_500_instance_study_in_bounded_memory(big_study, tmp_path):
    server, manifest = big_study
    assert len(manifest) == 500
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=tmp_path / "cache")
    studies = pacs.find_studies()
    baseline = _rss()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        deadline = time.monotonic() + 600
        while not done.is_set() and time.monotonic() < deadline:
            peak = max(peak, _rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = pacs.get(studies, workers=4, progress=False)
    finally:
        done.set()
        sampler.join(5)
    total = sum(os.path.getsize(p) for p in manifest.path)
    assert result.completed == 500
    assert total > 250e6  # the study is larger than the bound below
    growth = peak - baseline
    assert growth < 150e6, f"RSS grew by {growth / 1e6:.0f} MB"
