"""pf.DICOMweb against a real peer: Orthanc with Debian's DICOMweb plugin.

The same searches over Orthanc's C-FIND (pf.PACS) and its QIDO-RS (pf.DICOMweb)
give the same frames for the keys both answer; Orthanc's ``LimitFindResults`` cuts
QIDO-RS silently, which ``max_results=`` turns into a split; with
``AuthenticationEnabled`` a wrong password is ``reason="auth"``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import requests
from servers import OrthancServer, require_tool

import pacsframe as pf
from pacsframe.demo import make_cohort

pytestmark = pytest.mark.orthanc
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PASSWORD = "orthanc-Pw-42"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("dicomweb-orthanc")
    manifest = make_cohort(
        folder,
        patients=4,
        seed=21,
        studies_per_patient=(1, 2),
        series_per_study=(1, 2),
        instances_per_series=(1, 2),
        matrix=8,
    )
    return folder, manifest


class _Orthanc(OrthancServer):
    """Ready when /system answers, 401 included (AuthenticationEnabled)."""

    def _ready(self) -> bool:
        session = requests.Session()
        session.trust_env = False  # loopback: never through a proxy
        try:
            return session.get(f"{self.url}/system", timeout=1).status_code in (200, 401)
        except requests.RequestException:
            return False


def _orthanc(workdir: Path, manifest: pd.DataFrame, **extra) -> OrthancServer:
    require_tool("Orthanc")
    if not Path(PLUGIN).is_file():
        pytest.skip("Debian's orthanc-dicomweb plugin is not installed")
    config = {
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DefaultEncoding": "Utf8",
        **extra,
    }
    server = _Orthanc(workdir, extra_config=config)
    server.start()
    try:
        result = pf.PACS(server.host, server.dicom_port, server.aet).store(manifest)
        assert result.failed == 0
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def orthanc(cohort, tmp_path_factory):
    server = _orthanc(tmp_path_factory.mktemp("orthanc-web"), cohort[1], LimitFindResults=3)
    try:
        yield server
    finally:
        server.stop()


def _same(a: pd.DataFrame, b: pd.DataFrame, key: str) -> None:
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.filterwarnings("ignore:.*capped the")
def test_same_frames_as_c_find(orthanc, cohort):
    manifest = cohort[1]
    dimse = pf.PACS(orthanc.host, orthanc.dicom_port, orthanc.aet)
    web = pf.DICOMweb(orthanc.url + "/dicom-web", max_results=3)
    shared = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID"]
    a = dimse.find_studies(progress=False)
    b = web.find_studies(progress=False)
    assert b.attrs["pacsframe"]["split"] is True  # LimitFindResults=3 cut the first answer
    assert len(b) == manifest.StudyInstanceUID.nunique()
    _same(a[shared], b[shared], "StudyInstanceUID")
    series_a = dimse.find_series(a, progress=False)
    series_b = web.find_series(b, progress=False)
    keys = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber"]
    _same(series_a[keys], series_b[keys], "SeriesInstanceUID")


def test_authentication(cohort, tmp_path):
    server = _orthanc(
        tmp_path / "orthanc-auth",
        cohort[1],
        AuthenticationEnabled=True,
        RegisteredUsers={"alice": PASSWORD},
    )
    try:
        url = server.url + "/dicom-web"
        with pytest.raises(pf.AssociationError) as info:
            pf.DICOMweb(url, auth=("alice", "wrong-" + PASSWORD)).echo()
        assert info.value.reason == "auth" and PASSWORD not in str(info.value)
        found = pf.DICOMweb(url, auth=("alice", PASSWORD)).find_studies()
        assert len(found) == cohort[1].StudyInstanceUID.nunique()
    finally:
        server.stop()
