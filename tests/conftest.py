"""Shared fixtures: a seeded cohort served by the demo PACS, Orthanc and dcmqrscp.

The same small cohort is loaded into both servers (through ``pacs.store``), so one
test body parametrized over ``peer`` checks that pacsframe reads both the same way.
Orthanc indexes only about 11 objects a second here, so this cohort stays at a few
tens of objects; large-result tests use the demo PACS alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))


from servers import DcmqrscpServer, OrthancServer, require_tool

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort

# No per-example deadline anywhere: wall-clock limits flake on a loaded 2-core
# machine (CI), and a test's own settings() still set its number of examples.
settings.register_profile("pacsframe", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pacsframe")

COHORT = {
    "patients": 4,
    "seed": 11,
    "studies_per_patient": (1, 2),
    "series_per_study": (1, 2),
    "instances_per_series": (2, 3),
    "matrix": 16,
}


@dataclass
class Peer:
    """A running server with a client for it and the cohort it holds."""

    name: str
    pacs: pf.PACS
    manifest: pd.DataFrame


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("cohort")
    return folder, make_cohort(folder, **COHORT)


@pytest.fixture(scope="session")
def demo_server(cohort, tmp_path_factory):
    folder, _ = cohort
    server = DemoPACS(folder).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def orthanc(cohort, tmp_path_factory):
    require_tool("Orthanc")
    _, manifest = cohort
    # Orthanc answers C-FIND in its DefaultEncoding whatever the query declares;
    # UTF-8 keeps every cohort name (test_orthanc_latin1 covers its Latin-1 mode).
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc"),
        check_called_aet=True,
        extra_config={"DefaultEncoding": "Utf8"},
    )
    server.start()
    try:
        result = pf.PACS(server.host, server.dicom_port, server.aet).store(manifest)
        assert result.failed == 0, result.failed_instances
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dcmqrscp(cohort, tmp_path_factory):
    """dcmtk's dcmqrscp holding the cohort (indexed in place with dcmqridx)."""
    require_tool("dcmqrscp")
    require_tool("dcmqridx")
    _, manifest = cohort
    server = DcmqrscpServer(tmp_path_factory.mktemp("dcmqrscp"))
    server.index(list(manifest.path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["demo", "orthanc"])
def peer(request, cohort) -> Peer:
    _, manifest = cohort
    if request.param == "demo":
        server = request.getfixturevalue("demo_server")
        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, dimse_timeout=30)
    else:
        server = request.getfixturevalue("orthanc")
        pacs = pf.PACS(server.host, server.dicom_port, server.aet, dimse_timeout=30)
    return Peer(request.param, pacs, manifest)


@pytest.fixture
def client(peer, tmp_path, request):
    """A PACS for ``peer`` with its own cache, registered as a C-MOVE destination there."""
    pacs = pf.PACS(
        peer.pacs.host,
        peer.pacs.port,
        peer.pacs.ae_title,
        calling_ae="PFCLIENT",
        cache=tmp_path / "cache",
        dimse_timeout=30,
    )
    if peer.name == "demo":
        server = request.getfixturevalue("demo_server")
        server.add_known_ae(pacs.calling_ae, "127.0.0.1", pacs.scp_port)
    else:
        server = request.getfixturevalue("orthanc")
        server.add_modality(pacs.calling_ae, pacs.calling_ae, "127.0.0.1", pacs.scp_port)
    return pacs
