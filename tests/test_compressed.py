"""Compressed objects: C-MOVE brings them as stored; C-GET never alters their pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from servers import OrthancServer, require_tool

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.storage import storage_contexts


@pytest.fixture
def compressed_cohort(tmp_path):
    manifest = make_cohort(
        tmp_path / "src",
        patients=1,
        seed=71,
        studies_per_patient=1,
        series_per_study=1,
        instances_per_series=3,
        matrix=32,
        modalities=("CT",),
    )
    path = manifest.path.iloc[0]
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return tmp_path / "src", manifest


@pytest.fixture(params=["demo", "orthanc"])
def compressed_peer(request, compressed_cohort, tmp_path):
    folder, manifest = compressed_cohort
    if request.param == "demo":
        with DemoPACS(folder) as server:
            yield "demo", server, manifest
    else:
        require_tool("Orthanc")
        with OrthancServer(tmp_path / "orthanc") as server:
            server.start()
            loader = pf.PACS(server.host, server.dicom_port, server.aet)
            assert loader.store(manifest).completed == len(manifest)
            yield "orthanc", server, manifest


def _client(kind, server, cache):
    if kind == "demo":
        pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, "PFZIP", cache=cache)
        server.add_known_ae("PFZIP", "127.0.0.1", pacs.scp_port)
    else:
        pacs = pf.PACS(server.host, server.dicom_port, server.aet, "PFZIP", cache=cache)
        server.add_modality("PFZIP", "PFZIP", "127.0.0.1", pacs.scp_port)
    return pacs


def _pixels(path):
    ds = pydicom.dcmread(path)
    return ds.file_meta.TransferSyntaxUID, ds.pixel_array


def test_move_brings_compressed_objects_as_stored(compressed_peer, tmp_path):
    kind, server, manifest = compressed_peer
    pacs = _client(kind, server, tmp_path / "cache")
    result = pacs.move(pacs.find_studies(), progress=False)
    assert result.completed == len(manifest)
    held = pacs.cache.instances().set_index("SOPInstanceUID")
    rle = manifest.SOPInstanceUID.iloc[0]
    assert held.TransferSyntaxUID[rle] == RLELossless
    assert (held.drop(index=rle).TransferSyntaxUID == ExplicitVRLittleEndian).all()


def test_get_keeps_pixels_of_compressed_objects(compressed_peer, tmp_path):
    kind, server, manifest = compressed_peer
    pacs = _client(kind, server, tmp_path / "cache")
    result = pacs.get(pacs.find_studies(), progress=False)
    assert result.completed == len(manifest) and result.failed == 0
    held = pacs.cache.instances().set_index("SOPInstanceUID")
    for row in manifest.itertuples():
        syntax, got = _pixels(held.path[row.SOPInstanceUID])
        _, want = _pixels(row.path)
        # As stored when the peer accepted that syntax, else losslessly decoded.
        assert syntax in (RLELossless, ExplicitVRLittleEndian)
        np.testing.assert_array_equal(got, want)


def test_requestor_contexts_never_let_a_peer_recompress():
    contexts = storage_contexts()
    assert len(contexts) <= 127  # and one for the C-GET model: PS3.8 allows 128
    uncompressed = {ExplicitVRLittleEndian, "1.2.840.10008.1.2"}
    by_class: dict[str, list[set[str]]] = {}
    for cx in contexts:
        by_class.setdefault(cx.abstract_syntax, []).append(set(cx.transfer_syntax))
    for syntaxes in by_class.values():
        # Every class has a context offering only uncompressed syntaxes ...
        assert uncompressed in syntaxes
        # ... and no context mixes them with compressed ones.
        assert all(s == uncompressed or not (s & uncompressed) for s in syntaxes)
