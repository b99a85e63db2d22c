"""Smoke tests for the test-support servers in ``servers.py``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification
from servers import DcmqrscpServer, DcmtkStoreSCP, OrthancServer, free_port, require_tool

from pacsframe.demo import make_cohort

pytestmark = pytest.mark.timeout(120)


def make_secondary_capture(path: Path) -> Path:
    """Write a small valid Secondary Capture file (8x8, 8-bit) and return its path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Smoke^Test"
    ds.PatientID = "SMOKE1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    ds.save_as(path, enforce_file_format=True)
    return path


def c_echo(host: str, port: int, called_aet: str) -> int:
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    assert assoc.is_established, f"association to {called_aet}@{host}:{port} failed"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status)


def c_store(host: str, port: int, called_aet: str, path: Path) -> int:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=called_aet)
    assert assoc.is_established, f"association to {called_aet}@{host}:{port} failed"
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


@pytest.fixture
def fresh_orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """An empty Orthanc for one test (conftest's ``orthanc`` holds the shared cohort)."""
    require_tool("Orthanc")
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        # A clean Orthanc shutdown takes ~3 s; the folder is thrown away anyway.
        server.stop(graceful=False)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    require_tool("storescp")
    with DcmtkStoreSCP(tmp_path / "storescp") as server:
        yield server


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_require_tool_finds_orthanc_in_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Debian's orthanc package is not installed")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert require_tool("Orthanc") == "/usr/sbin/Orthanc"


@pytest.mark.parametrize("ci", ["", "false", "true", "TRUE", "1"])
def test_require_tool_missing(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    # Pretend nothing is installed, so the hint names the right Debian package.
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    expected = pytest.fail.Exception if ci.lower() in {"true", "1"} else pytest.skip.Exception
    with pytest.raises(expected, match="apt-get install dcmtk"):
        require_tool("storescp")
    with pytest.raises(expected, match="apt-get install orthanc"):
        require_tool("Orthanc")


def test_require_tool_outside_pytest() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import servers\n"
        "try:\n    servers.require_tool('no-such-tool')\n"
        "except RuntimeError as exc:\n    print('RuntimeError', exc)\n"
        "print('pytest' in sys.modules)"
    )
    tests_dir = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", code, tests_dir], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("RuntimeError no-such-tool was not found")
    assert done.stdout.strip().endswith("False")


def test_orthanc_echo_store_clear(fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    assert fresh_orthanc.system()["Version"].startswith("1.10.")
    assert c_echo(fresh_orthanc.host, fresh_orthanc.dicom_port, fresh_orthanc.aet) == 0x0000

    dicom = make_secondary_capture(tmp_path / "sc.dcm")
    assert (
        c_store(fresh_orthanc.host, fresh_orthanc.dicom_port, fresh_orthanc.aet, dicom) == 0x0000
    )
    assert fresh_orthanc.count_instances() == 1

    fresh_orthanc.clear()
    assert fresh_orthanc.count_instances() == 0


def test_orthanc_rejects_wrong_called_aet(tmp_path: Path) -> None:
    require_tool("Orthanc")
    with OrthancServer(tmp_path / "orthanc", check_called_aet=True) as server:
        ae = AE(ae_title="PFTEST")
        ae.add_requested_context(Verification)
        # Under load pynetdicom may end the association as aborted although it
        # decoded Orthanc's A-ASSOCIATE-RJ (Orthanc closes right after sending it);
        # the PDU itself is the rejection.
        rejections: list[A_ASSOCIATE_RJ] = []

        def on_pdu(event: evt.Event) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejections.append(event.pdu)

        assoc = ae.associate(
            server.host,
            server.dicom_port,
            ae_title="NOT-ORTHANC",
            evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
        )
        try:
            assert assoc.is_rejected or rejections
            assert not assoc.is_established
        finally:
            if assoc.is_established:
                assoc.release()
        # The right called AE title is still accepted.
        assert c_echo(server.host, server.dicom_port, server.aet) == 0x0000


def test_orthanc_modalities(tmp_path: Path) -> None:
    require_tool("Orthanc")
    modalities = {"fromconfig": ("CFGAE", "127.0.0.1", 11112)}
    with OrthancServer(tmp_path / "orthanc", modalities=modalities) as server:
        server.add_modality("ourscp", "PFSCP", "127.0.0.1", 11113)
        assert set(server.rest("GET", "/modalities")) == {"fromconfig", "ourscp"}
        expanded = server.registered_modalities()
        assert expanded["ourscp"]["AET"] == "PFSCP"
        assert expanded["ourscp"]["Port"] == 11113
        assert expanded["fromconfig"]["AET"] == "CFGAE"


def test_orthanc_stop_ends_process(tmp_path: Path) -> None:
    require_tool("Orthanc")
    server = OrthancServer(tmp_path / "orthanc").start()
    process = server.process
    assert process is not None and process.poll() is None
    server.stop()
    assert process.poll() is not None
    assert server.process is None
    server.stop()  # idempotent


def test_orthanc_start_failure_reports_log(tmp_path: Path) -> None:
    require_tool("Orthanc")
    server = OrthancServer(tmp_path / "orthanc", extra_config={"StorageDirectory": 42})
    with pytest.raises(RuntimeError, match="exited with code") as excinfo:
        server.start(timeout=30)
    assert "StorageDirectory" in str(excinfo.value)  # the log tail explains why
    assert server.process is None


def test_storescp_echo_and_store(storescp: DcmtkStoreSCP, tmp_path: Path) -> None:
    assert c_echo(storescp.host, storescp.port, storescp.aet) == 0x0000

    dicom = make_secondary_capture(tmp_path / "sc.dcm")
    assert c_store(storescp.host, storescp.port, storescp.aet, dicom) == 0x0000
    received = storescp.received_files()
    assert len(received) == 1
    assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(dicom).SOPInstanceUID


def test_storescp_stop_ends_process(tmp_path: Path) -> None:
    require_tool("storescp")
    server = DcmtkStoreSCP(tmp_path / "storescp").start()
    process = server.process
    assert process is not None and process.poll() is None
    server.stop()
    assert process.poll() is not None
    server.stop()  # idempotent
    assert not server.running
    assert server.last_returncode is not None


def test_orthanc_moves_to_storescp(
    fresh_orthanc: OrthancServer, storescp: DcmtkStoreSCP, tmp_path: Path
) -> None:
    # The usual pacsframe set-up: the calling AE is also the C-MOVE destination, so one
    # registered modality both authorizes the C-MOVE and tells Orthanc where to send.
    dicom = make_secondary_capture(tmp_path / "sc.dcm")
    assert (
        c_store(fresh_orthanc.host, fresh_orthanc.dicom_port, fresh_orthanc.aet, dicom) == 0x0000
    )
    fresh_orthanc.add_modality("pftest", "PFTEST", storescp.host, storescp.port)

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = pydicom.dcmread(dicom).StudyInstanceUID
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(fresh_orthanc.host, fresh_orthanc.dicom_port, ae_title=fresh_orthanc.aet)
    assert assoc.is_established
    try:
        responses = list(
            assoc.send_c_move(query, "PFTEST", StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert int(responses[-1][0].Status) == 0x0000
    assert [p.name for p in storescp.received_files()] == [
        f"SC.{pydicom.dcmread(dicom).SOPInstanceUID}"
    ]


def test_dcmqrscp_answers_finds_and_moves_to_a_destination_added_later(tmp_path: Path) -> None:
    require_tool("dcmqrscp")
    require_tool("dcmqridx")
    require_tool("storescp")
    manifest = make_cohort(
        tmp_path / "cohort",
        patients=1,
        seed=5,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=2,
        matrix=8,
    )
    server = DcmqrscpServer(tmp_path / "dcmqrscp")
    server.index(list(manifest.path))
    with server, DcmtkStoreSCP(tmp_path / "storescp", aet="PFDEST") as dest:
        assert c_echo(server.host, server.port, server.aet) == 0x0000
        # The HostTable is read at start-up: adding a destination restarts it.
        server.add_destination(dest.aet, dest.host, dest.port)
        assert server.running and "PFDEST" in server.config_path.read_text()
        ae = AE(ae_title="PFTEST")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(server.host, server.port, ae_title=server.aet)
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = manifest.StudyInstanceUID.iloc[0]
            statuses = [
                status.Status
                for status, _ in assoc.send_c_move(
                    query, dest.aet, StudyRootQueryRetrieveInformationModelMove
                )
            ]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000
        assert len(dest.received_files()) == len(manifest)
    assert not server.running and server.last_returncode is not None


def test_dcmqrscp_stop_ends_the_child_serving_an_open_association(tmp_path: Path) -> None:
    require_tool("dcmqrscp")
    server = DcmqrscpServer(tmp_path / "dcmqrscp").start()
    assert server.process is not None
    group = server.process.pid
    ae = AE(ae_title="PFTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(server.host, server.port, ae_title=server.aet)
    assert assoc.is_established  # a forked child of dcmqrscp now serves it
    try:
        server.stop()
        assert not server.running
        # Bounded: the group (the server and its children) is gone within 10 s.
        for _ in range(200):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("a dcmqrscp child outlived stop()")
    finally:
        assoc.abort()
