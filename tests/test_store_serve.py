"""C-STORE with a status per object, and the `pacsframe serve` command as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
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
    # The peer's Error Comment is part of the sentence.
    assert "SeriesInstanceUID is not a valid UID" in result.instances.error.iloc[0]
    assert not any(p.name == "escape" for p in tmp_path.rglob("*"))
    assert not (tmp_path.parent / "escape").exists()


def _dataset_bytes(path):
    """A Part-10 file's data set as it is on disk (the bytes after its file meta)."""
    data = Path(path).read_bytes()
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        pydicom.filereader._read_file_meta_info(handle)
        return data[handle.tell() :]


def test_files_go_as_on_disk_and_datasets_in_their_own_syntax(empty_server, cohort, tmp_path):
    _, manifest = cohort
    pacs = pf.PACS("127.0.0.1", empty_server.port, empty_server.ae_title)
    paths = manifest.path[:2].tolist()
    datasets = []
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = pydicom.dcmread(paths[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = syntax
        datasets.append(ds)
    before = pydicom.config.settings.writing_validation_mode
    result = pacs.store([*paths, *datasets])
    assert pydicom.config.settings.writing_validation_mode == before
    assert result.completed == 4, result.failed_instances
    assert result.instances.TransferSyntaxUID.tolist()[2:] == [
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    ]
    stored = empty_server.instances().set_index("SOPInstanceUID").path
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert _dataset_bytes(stored[uid]) == _dataset_bytes(path)
    for ds in datasets:
        back = pydicom.dcmread(stored[ds.SOPInstanceUID])
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert back.PixelData == ds.PixelData and back.PatientName == ds.PatientName


def test_a_dataset_pydicom_cannot_encode_is_a_failed_row(empty_server, cohort):
    _, manifest = cohort
    bad = pydicom.dcmread(manifest.path.iloc[0])
    with pytest.warns(UserWarning, match="cannot be assigned"):
        bad.Rows = "many"
    pacs = pf.PACS("127.0.0.1", empty_server.port, empty_server.ae_title)
    result = pacs.store([bad, manifest.path.iloc[1]])
    assert result.instances.status.tolist() == ["failed", "completed"]
    error = result.instances.error.iloc[0]
    assert error.startswith("not sent: pydicom could not encode it (With tag (0028,0010)")
    assert "\n" not in error


@pytest.fixture
def ct_only_peer():
    """A peer that accepts CT Image Storage in Explicit VR Little Endian only."""
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        status = pydicom.Dataset()
        status.Status = 0xB000
        status.ErrorComment = "kept, some elements dropped"
        return status

    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def test_objects_without_an_accepted_context_are_failed_rows(ct_only_peer, cohort):
    port, received = ct_only_peer
    _, manifest = cohort
    ct = manifest[manifest.SOPClassUID == CTImageStorage].path.tolist()
    mr = manifest[manifest.SOPClassUID == MRImageStorage].path.tolist()
    assert ct and mr
    pacs = pf.PACS("127.0.0.1", port, "CTONLY")
    result = pacs.store([*ct, *mr])
    rows = result.instances
    assert (result.warning, result.failed) == (len(ct), len(mr))
    assert len(received) == len(ct)
    assert rows.code.tolist()[: len(ct)] == [0xB000] * len(ct)
    assert "kept, some elements dropped" in rows.error.iloc[0]
    assert all("accepted no presentation context" in e for e in result.failed_instances.error)
    # A batch the peer accepts nothing of: rows again, not an exception.
    result = pacs.store(mr)
    assert result.failed == len(mr) and result.instances.code.isna().all()
    assert "CTONLY accepted no presentation context" in result.failed_instances.error.iloc[0]


def test_ctrl_c_mid_store_aborts_the_association(cohort):
    """Ctrl-C while the peer holds a C-STORE response: KeyboardInterrupt, an A-ABORT."""
    _, manifest = cohort
    hold, interrupted, aborted = threading.Event(), threading.Event(), threading.Event()

    def on_store(event):
        hold.set()
        # The peer holds the response until we were interrupted (its handler blocks
        # its reading: our A-ABORT is read after).
        interrupted.wait(30)
        return 0x0000

    ae = AE(ae_title="HOLDING")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_ABORTED, lambda event: aborted.set())]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    main = threading.get_ident()
    interrupter = threading.Thread(
        target=lambda: hold.wait(30) and signal.pthread_kill(main, signal.SIGINT)
    )
    try:
        pacs = pf.PACS("127.0.0.1", server.server_address[1], "HOLDING", dimse_timeout=30)
        interrupter.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pacs.store(manifest.path[:3].tolist())
        assert time.monotonic() - started < 10
        interrupted.set()
        assert aborted.wait(5), "the peer saw no A-ABORT"
    finally:
        interrupted.set()
        interrupter.join(30)
        server.shutdown()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("pacsframe-")]


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
