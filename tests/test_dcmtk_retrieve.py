"""Clients and a storage SCP we did not write (dcmtk) retrieving from the demo PACS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from servers import DcmqrscpServer, DcmtkStoreSCP, dcmtk_env, free_port, require_tool

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("dcmtk-retrieve")
    manifest = make_cohort(
        folder,
        patients=3,
        seed=11,
        studies_per_patient=(1, 2),
        series_per_study=(1, 2),
        instances_per_series=(2, 4),
        matrix=16,
    )
    return folder, manifest


@pytest.fixture
def demo(cohort) -> Iterator[DemoPACS]:
    with DemoPACS(cohort[0]) as pacs:
        yield pacs


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def uids_of(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def assert_same_instances(received: dict[str, pydicom.Dataset], rows: pd.DataFrame) -> None:
    assert sorted(received) == sorted(rows.SOPInstanceUID)
    for row in rows.itertuples():
        stored = pydicom.dcmread(row.path)
        got = received[row.SOPInstanceUID]
        assert got.SeriesInstanceUID == stored.SeriesInstanceUID
        assert got.PixelData == stored.PixelData


def test_getscu_retrieves_a_series(demo, cohort, tmp_path):
    getscu = require_tool("getscu")
    manifest = cohort[1]
    row = manifest.iloc[-1]
    rows = manifest[manifest.SeriesInstanceUID == row.SeriesInstanceUID]
    out = tmp_path / "got"
    out.mkdir()
    done = run(
        [
            getscu,
            "-S",
            "-aet",
            "DCMTKGET",
            "-aec",
            demo.ae_title,
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={row.StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={row.SeriesInstanceUID}",
            "-od",
            str(out),
            "127.0.0.1",
            str(demo.port),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert len(files) == len(rows), done.stderr
    assert_same_instances(uids_of(files), rows)


def test_movescu_moves_a_study_to_storescp(demo, cohort, tmp_path):
    movescu = require_tool("movescu")
    manifest = cohort[1]
    study = manifest.StudyInstanceUID.value_counts().index[0]
    rows = manifest[manifest.StudyInstanceUID == study]
    with DcmtkStoreSCP(tmp_path / "storescp", aet="DCMTKSTORE") as storescp:
        demo.add_known_ae(storescp.aet, "127.0.0.1", storescp.dicom_port)
        done = run(
            [
                movescu,
                "-S",
                "-aet",
                "DCMTKMOVE",
                "-aec",
                demo.ae_title,
                "-aem",
                storescp.aet,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study}",
                "127.0.0.1",
                str(demo.port),
            ]
        )
        files = storescp.received_files()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(files) == len(rows), done.stderr
    assert_same_instances(uids_of(files), rows)


def test_movescu_to_an_unknown_destination_reports_the_comment(demo, cohort):
    movescu = require_tool("movescu")
    study = cohort[1].StudyInstanceUID.iloc[0]
    done = run(
        [
            movescu,
            "-d",  # the debug log prints the response's command set, with its comment
            "-S",
            "-aet",
            "DCMTKMOVE",
            "-aec",
            demo.ae_title,
            "-aem",
            "NOWHERE",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(demo.port),
        ]
    )
    output = done.stdout + done.stderr
    assert "MoveDestinationUnknown" in output, output
    assert "Move destination unknown: NOWHERE" in output, output


def test_pacs_moves_from_a_dcmqrscp_that_requires_a_find_context(tmp_path: Path, cohort) -> None:
    """dcmqrscp ``--require-find`` refuses a C-MOVE on an association without the
    model's C-FIND context; pacsframe proposes it, so the move goes through."""
    require_tool("dcmqridx")
    _, manifest = cohort
    scp_port = free_port()
    server = DcmqrscpServer(
        tmp_path / "dcmqrscp",
        destinations={"PFMOVE": ("localhost", scp_port)},
        extra_args=["--require-find"],
    )
    server.index(list(manifest.path))
    with server:
        pacs = pf.PACS(
            server.host,
            server.port,
            server.aet,
            calling_ae="PFMOVE",
            scp_port=scp_port,
            cache=tmp_path / "cache",
        )
        result = pacs.move(pacs.find_studies(), progress=False)
    assert (result.completed, result.failed) == (len(manifest), 0), result
