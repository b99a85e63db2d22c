"""A client we did not write (dcmtk findscu) against the demo PACS, and a large result."""

from __future__ import annotations

import subprocess
import time
from io import BytesIO

import pandas as pd
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from servers import dcmtk_env, require_tool

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.frames import FrameBuilder
from pacsframe.query import build_query

KEYS = [
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
]


def test_findscu_gets_the_same_rows_as_pacsframe(demo_server, tmp_path):
    findscu = require_tool("findscu")
    command = [
        findscu,
        "-S",
        "-aet",
        "DCMTK",
        "-aec",
        demo_server.ae_title,
        "127.0.0.1",
        str(demo_server.port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        *[arg for key in KEYS for arg in ("-k", key)],
        "-X",
        "-od",
        str(tmp_path),
    ]
    done = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    files = sorted(tmp_path.glob("rsp*.dcm"))
    assert files, done.stderr
    builder = FrameBuilder(KEYS)
    for path in files:
        builder.add(pydicom.dcmread(path))
    theirs = builder.frame().sort_values("StudyInstanceUID").reset_index(drop=True)
    pacs = pf.PACS("127.0.0.1", demo_server.port, demo_server.ae_title)
    ours = pacs.find_studies(return_keys=KEYS)[KEYS]
    ours = ours.sort_values("StudyInstanceUID").reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)


def test_findscu_patient_root_image_level(demo_server, cohort, tmp_path):
    findscu = require_tool("findscu")
    _, manifest = cohort
    row = manifest.iloc[0]
    command = [findscu, "-P", "-aec", demo_server.ae_title, "127.0.0.1", str(demo_server.port)]
    for key in (
        "QueryRetrieveLevel=IMAGE",
        f"PatientID={row.PatientID}",
        f"StudyInstanceUID={row.StudyInstanceUID}",
        f"SeriesInstanceUID={row.SeriesInstanceUID}",
        "SOPInstanceUID",
    ):
        command += ["-k", key]
    command += ["-X", "-od", str(tmp_path)]
    done = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in tmp_path.glob("rsp*.dcm"))
    expected = manifest[manifest.SeriesInstanceUID == row.SeriesInstanceUID].SOPInstanceUID
    assert theirs == sorted(expected)


@pytest.fixture(scope="module")
def large_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    manifest = make_cohort(
        folder,
        patients=1250,
        seed=5,
        studies_per_patient=4,
        series_per_study=1,
        instances_per_series=1,
        matrix=8,
    )
    server = DemoPACS(folder).start()
    yield server, manifest
    server.stop()


def test_five_thousand_row_result(large_server):
    server, manifest = large_server
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title)
    studies = pacs.find_studies()
    assert len(studies) == 5000
    assert studies.StudyInstanceUID.is_unique
    assert sorted(studies.StudyInstanceUID) == sorted(manifest.StudyInstanceUID)
    assert str(studies.StudyDate.dtype) == "datetime64[ns]"
    assert studies.NumberOfStudyRelatedInstances.eq(1).all()
    march = pacs.find_studies(StudyDate=("2026-03-01", "2026-03-31"))
    expected = manifest[manifest.StudyDate.between("20260301", "20260331")]
    assert len(march) == len(expected) > 0


def _converted_seconds(encoded: list[bytes], rows: int) -> float:
    """Time the per-answer work of a C-FIND: decode each identifier, then build the frame."""
    builder = FrameBuilder(KEYS)
    # CPU time of this process, not the wall clock: other processes on a busy machine
    # do not count.
    start = time.process_time()
    for i in range(rows):
        builder.add(decode(BytesIO(encoded[i % len(encoded)]), True, True))
    frame = builder.frame()
    elapsed = time.process_time() - start
    assert len(frame) == rows
    return elapsed


def test_conversion_grows_linearly_to_100k_rows(large_server):
    """100,000 answers convert in about ten times what 10,000 take, not a hundred.

    The identifiers are the demo server's own answers to a study-level C-FIND, kept
    as the bytes that crossed the wire; 20 passes over its 5,000 make 100,000 rows.
    Only the ratio of CPU times is bounded (loosely), never a wall-clock time.
    """
    server, _ = large_server
    ae = AE(ae_title="PACSFRAME")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        query = build_query("STUDY", return_keys=KEYS).dataset()
        responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        encoded = [encode(ds, True, True) for status, ds in responses if ds is not None]
    finally:
        assoc.release()
    assert len(encoded) == 5000
    small = min(_converted_seconds(encoded, 10_000) for _ in range(2))
    large = _converted_seconds(encoded, 100_000)
    assert large / small < 25, f"10k rows: {small:.2f} s, 100k rows: {large:.2f} s"
