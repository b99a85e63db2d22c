"""C-STORE with a status per object, and the `pacsframe serve` command as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid
from servers import free_port

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort


@pytest.fixture
def empty_server(tmp_path):
    with DemoPACS(tmp_path / "store") as server:
        yield server


def test_store_reports_each_object(empty_server, cohort, tmp_path):
    _, manifest = cohort
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    pacs = pf.PACS("127.0.0.1", empty_server.port, empty_server.ae_title)
    result = pacs.store([*manifest.path[:3], junk])
    assert (result.completed, result.failed, result.warning) == (3, 1, 0)
    rows = result.instances
    assert list(rows.columns) == [
        "path",
        "SOPInstanceUID",
        "SOPClassUID",
        "TransferSyntaxUID",
        "status",
        "code",
        "error",
    ]
    assert rows.status.tolist() == ["completed"] * 3 + ["failed"]
    assert rows.code.tolist()[:3] == [0, 0, 0]
    assert "not a readable DICOM file" in result.failed_instances.error.iloc[0]
    found = pacs.find_studies(StudyInstanceUID=manifest.StudyInstanceUID.iloc[0])
    assert len(found) == 1


def test_store_a_folder_and_datasets(empty_server, tmp_path):
    folder = tmp_path / "src"
    manifest = make_cohort(folder, patients=1, seed=21, studies_per_patient=1, matrix=8)
    pacs = pf.PACS("127.0.0.1", empty_server.port, empty_server.ae_title)
    assert pacs.store(folder).completed == len(manifest)
    ds = pydicom.dcmread(manifest.path.iloc[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert pacs.store(ds).completed == 1


def test_store_refused_object_is_a_failed_row_and_nothing_escapes(empty_server, cohort, tmp_path):
    _, manifest = cohort
    ds = pydicom.dcmread(manifest.path.iloc[0])
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SeriesInstanceUID = "../../escape"
    result = pf.PACS("127.0.0.1", empty_server.port, empty_server.ae_title).store(ds)
    assert result.failed == 1
    assert result.instances.code.iloc[0] >= 0xA700
    assert not any(p.name == "escape" for p in tmp_path.rglob("*"))
    assert not (tmp_path.parent / "escape").exists()


def test_store_refuses_nonsense_before_connecting():
    pacs = pf.PACS("127.0.0.1", free_port(), "X")
    with pytest.raises(pf.QueryError, match="does not exist"):
        pacs.store("/no/such/file.dcm")
    with pytest.raises(pf.QueryError, match="'path' column"):
        pacs.store(pd.DataFrame({"x": [1]}))


def test_serve_command_runs_until_interrupted(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "pacsframe.cli", "serve", str(tmp_path / "d")]
    command += ["--port", str(port), "--cohort", "1", "--aet", "SERVED"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pacs = pf.PACS("127.0.0.1", port, "SERVED", connect_timeout=2)
        deadline = time.monotonic() + 60
        while True:
            try:
                pacs.echo()
                break
            except pf.AssociationError:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not come up in 60 s"
                time.sleep(0.2)
        assert len(pacs.find_patients()) == 1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 130
