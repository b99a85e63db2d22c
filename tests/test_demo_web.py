"""The demo PACS's DICOMweb side (QIDO-RS, WADO-RS, STOW-RS) over real HTTP on loopback.

QIDO-RS answers are compared with the same server's C-FIND through pacsframe's own
client; WADO-RS bodies are split with a few lines here (not the client's parser)
and compared byte for byte with the files on disk.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage

import pacsframe as pf
from pacsframe.demo import DemoPACS, make_cohort
from pacsframe.demo.web import DEFAULT_MAX_UPLOAD

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
UID_RE = re.compile(r"\b\d+(?:\.\d+)+\b")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("web-cohort")
    manifest = make_cohort(
        folder,
        patients=5,
        seed=3,
        studies_per_patient=(1, 2),
        series_per_study=(1, 2),
        instances_per_series=(2, 3),
        matrix=16,
    )
    return folder, manifest


@pytest.fixture(scope="module")
def server(cohort):
    folder, _ = cohort
    with DemoPACS(folder, http_port=0) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def dimse(server) -> pf.PACS:
    return pf.PACS("127.0.0.1", server.port, server.ae_title, dimse_timeout=30)


@pytest.fixture
def manifest(cohort) -> pd.DataFrame:
    return cohort[1]


def qido(url: str, path: str, params=None, **kwargs) -> requests.Response:
    return requests.get(url + path, params=params, timeout=10, **kwargs)


def values(rows: list[dict], tag: str) -> list:
    """The first value of ``tag`` in each row (None when empty)."""
    out = []
    for row in rows:
        value = row.get(tag, {}).get("Value")
        out.append(value[0] if value else None)
    return out


def uids(rows: list[dict], tag: str) -> set[str]:
    return set(values(rows, tag))


def split_multipart(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """A plain split on the boundary: (headers, content) per part."""
    match = re.search(r'boundary="?([^";]+)"?', response.headers["Content-Type"])
    assert match, response.headers["Content-Type"]
    delimiter = b"\r\n--" + match.group(1).encode()
    sections = (b"\r\n" + response.content).split(delimiter)
    assert sections[0] == b"" and sections[-1] == b"--\r\n"
    parts = []
    for section in sections[1:-1]:
        head, _, content = section.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        parts.append((headers, content))
    return parts


def small_ct(**uids: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # path-like UIDs are made on purpose
        return _small_ct(**uids)


def _small_ct(**uids: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids.get("sop", generate_uid())
    ds.StudyInstanceUID = uids.get("study", generate_uid())
    ds.SeriesInstanceUID = uids.get("series", generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = uids.get("patient", "STOWED2")
    ds.PatientName = "Stowed^Patient"
    ds.StudyDate = "20260405"
    ds.Modality = "CT"
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype="<u2").tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    out = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # path-like UIDs are written on purpose
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(*contents: bytes, boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + c + b"\r\n"
        for c in contents
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(url: str, *contents: bytes, path: str = "/studies", **kwargs) -> requests.Response:
    body, ctype = multipart(*contents)
    return requests.post(
        url + path, data=body, headers={"Content-Type": ctype}, timeout=10, **kwargs
    )


# --- the server object ---------------------------------------------------------------------


def test_url_lifecycle_and_prompt_stop(tmp_path):
    pacs = DemoPACS(tmp_path, http_port=0)
    assert pacs.url is None
    pacs.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dicom-web", pacs.url)
        assert pacs.http_port > 0 and pacs.url.endswith(f":{pacs.http_port}/dicom-web")
        session = requests.Session()  # keeps its connection open after the answer
        assert session.get(pacs.url + "/studies", timeout=5).status_code == 204
    finally:
        started = time.monotonic()
        pacs.stop()
        assert time.monotonic() - started < 3
    assert pacs.url is None
    with pytest.raises(requests.ConnectionError):
        session.get(f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies", timeout=5)
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", pacs.http_port))
    assert DemoPACS(tmp_path).url is None  # no http_port: no HTTP


# --- QIDO-RS against C-FIND -----------------------------------------------------------------


def study_keys(manifest: pd.DataFrame) -> list[dict]:
    first = manifest.iloc[0]
    two = manifest.StudyInstanceUID.drop_duplicates().tolist()[:2]
    return [
        {},
        {"PatientID": first.PatientID},
        {"StudyDate": "20260101-20260331"},
        {"StudyDate": "-20251231"},
        {"PatientName": "*a*"},
        {"PatientName": str(first.PatientName).upper()},
        {"ModalitiesInStudy": "MR"},
        {"ModalitiesInStudy": "CT\\MR", "PatientSex": "F"},
        {"StudyInstanceUID": two},
        {"AccessionNumber": "ACC*"},
    ]


def test_qido_studies_find_what_c_find_finds(server, dimse, manifest):
    sizes = set()
    for keys in study_keys(manifest):
        params = {k: ",".join(v) if isinstance(v, list) else v for k, v in keys.items()}
        response = qido(server.url, "/studies", params)
        frame = dimse.find_studies(
            progress=False,
            return_keys=["NumberOfStudyRelatedInstances", "PatientName", "StudyDate"],
            **keys,
        )
        sizes.add(len(frame))
        if frame.empty:
            assert response.status_code == 204, keys
            continue
        assert response.status_code == 200, (keys, response.text)
        assert response.headers["Content-Type"] == "application/dicom+json"
        rows = response.json()
        assert uids(rows, "0020000D") == set(frame.StudyInstanceUID), keys
        by_uid = frame.set_index("StudyInstanceUID")
        for row in rows:
            uid = row["0020000D"]["Value"][0]
            assert row["00201208"] == {
                "vr": "IS",
                "Value": [int(by_uid.NumberOfStudyRelatedInstances[uid])],
            }
            name = row["00100010"]
            assert name["vr"] == "PN"
            assert name["Value"][0]["Alphabetic"] == by_uid.PatientName[uid]
            assert row["00080020"]["Value"][0] == by_uid.StudyDate[uid].strftime("%Y%m%d")
            assert row["00081190"]["Value"][0] == f"{server.url}/studies/{uid}"
    # Those queries matched subsets of several sizes: the comparison bites.
    assert len(sizes) > 2


def test_qido_tags_and_keywords_are_the_same(server, manifest):
    patient = manifest.PatientID.iloc[0]
    by_keyword = qido(server.url, "/studies", {"PatientID": patient}).json()
    by_tag = qido(server.url, "/studies", {"00100020": patient}).json()
    assert by_keyword == by_tag and len(by_tag) > 0


def test_qido_series_and_instances_find_what_c_find_finds(server, dimse, manifest):
    # A study with two series comes first, so the keys below select a proper subset.
    studies = manifest.groupby("StudyInstanceUID").SeriesInstanceUID.nunique()
    for study in studies.sort_values(ascending=False).index[:2]:
        for keys in ({}, {"Modality": "CT"}, {"SeriesNumber": "2"}):
            response = qido(server.url, f"/studies/{study}/series", keys)
            frame = dimse.find_series(progress=False, StudyInstanceUID=study, **keys)
            found = uids(response.json(), "0020000E") if response.status_code == 200 else set()
            assert response.status_code in (200, 204)
            assert found == set(frame.SeriesInstanceUID), (study, keys)
        for series in manifest[manifest.StudyInstanceUID == study].SeriesInstanceUID.unique()[:1]:
            response = qido(server.url, f"/studies/{study}/series/{series}/instances")
            frame = dimse.find_instances(
                progress=False, StudyInstanceUID=study, SeriesInstanceUID=series
            )
            rows = response.json()
            assert uids(rows, "00080018") == set(frame.SOPInstanceUID)
            assert {row["00280010"]["Value"][0] for row in rows} == {16}  # Rows, as a number
    # Searches over all series and all instances, and within a study.
    ct = manifest[manifest.Modality == "CT"]
    assert uids(qido(server.url, "/series", {"Modality": "CT"}).json(), "0020000E") == set(
        ct.SeriesInstanceUID
    )
    study = manifest.StudyInstanceUID.iloc[0]
    assert uids(qido(server.url, f"/studies/{study}/instances").json(), "00080018") == set(
        manifest[manifest.StudyInstanceUID == study].SOPInstanceUID
    )
    rows = qido(server.url, "/instances", {"PatientID": manifest.PatientID.iloc[0]}).json()
    assert uids(rows, "00080018") == set(
        manifest[manifest.PatientID == manifest.PatientID.iloc[0]].SOPInstanceUID
    )
    # Series and instance searches within a study match on the study's attributes too.
    own = manifest[manifest.StudyInstanceUID == study].PatientID.iloc[0]
    other = manifest[manifest.PatientID != own].PatientID.iloc[0]
    assert qido(server.url, f"/studies/{study}/series", {"PatientID": other}).status_code == 204
    assert qido(server.url, f"/studies/{study}/instances", {"PatientID": own}).status_code == 200
    # A search over all series carries the study's attributes too (PS3.18 6.7.1.2.1).
    rows = qido(server.url, "/series", {"SeriesInstanceUID": ct.SeriesInstanceUID.iloc[0]}).json()
    assert rows[0]["00100020"]["Value"] == [ct.PatientID.iloc[0]]
    assert rows[0]["00201208"]["vr"] == "IS"


def test_qido_json_forms(server, manifest):
    rows = qido(server.url, "/instances", {"limit": "1", "includefield": "PixelSpacing"}).json()
    row = rows[0]
    assert row["00280030"]["vr"] == "DS"
    assert all(isinstance(v, float) for v in row["00280030"]["Value"])
    assert isinstance(row["00200013"]["Value"][0], int)  # InstanceNumber, IS
    assert row["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    # An empty attribute has no Value (the cohort has an empty AccessionNumber).
    rows = qido(server.url, "/studies").json()
    assert any(r["00080050"] == {"vr": "SH"} for r in rows)
    # Non-ASCII names arrive as Unicode.
    names = {r["00100010"]["Value"][0]["Alphabetic"] for r in rows if "Value" in r["00100010"]}
    assert set(manifest.PatientName.dropna()) == names
    assert any(not n.isascii() for n in names)


def test_includefield(server):
    plain = qido(server.url, "/studies").json()[0]
    assert "00081030" not in plain and "00101010" not in plain
    for params in (
        {"includefield": "StudyDescription,00101010"},
        [("includefield", "StudyDescription"), ("includefield", "PatientAge")],
    ):
        row = qido(server.url, "/studies", params).json()[0]
        assert row["00081030"]["vr"] == "LO" and row["00101010"]["vr"] == "AS"
    every = qido(server.url, "/studies", {"includefield": "all"}).json()[0]
    assert {"00081030", "00101010", "00080061", "00201206"} <= set(every)
    every = qido(server.url, "/instances", {"includefield": "all", "limit": "1"}).json()[0]
    assert {"00280030", "00200032", "00080061", "00201209", "00080080"} <= set(every)
    assert all(re.fullmatch(r"[0-9A-F]{8}", tag) for tag in every)
    # A field the archive does not hold comes back empty, like a C-FIND return key.
    row = qido(server.url, "/studies", {"includefield": "InstitutionalDepartmentName"}).json()[0]
    assert row["00081040"] == {"vr": "LO"}


def test_limit_and_offset_page_through_every_match(server):
    everything = values(qido(server.url, "/instances").json(), "00080018")
    assert len(everything) > 10
    pages = []
    offset = 0
    while True:
        response = qido(server.url, "/instances", {"limit": "4", "offset": str(offset)})
        if response.status_code == 204:
            break
        page = values(response.json(), "00080018")
        assert 0 < len(page) <= 4 and "Warning" not in response.headers
        pages += page
        offset += len(page)
    assert pages == everything


@pytest.fixture
def capped(server):
    """The module's server with max_results=5 for one test (both may change at run time)."""
    server.max_results = 5
    try:
        yield server
    finally:
        server.max_results = None
        server.qido_cap_warning = True


def test_cap_warns_and_pages(capped, manifest):
    total = len(manifest)
    response = qido(capped.url, "/instances")
    assert response.status_code == 200 and len(response.json()) == 5
    warning = response.headers["Warning"]
    host = f"127.0.0.1:{capped.http_port}"
    assert warning == (
        f'299 {host}: "There are {total - 5} additional results that can be requested"'
    )
    # The cap applies after offset, so paging by what arrived gets everything.
    seen = []
    while True:
        response = qido(capped.url, "/instances", {"offset": str(len(seen))})
        if response.status_code == 204:
            break
        seen += values(response.json(), "00080018")
        more = total - len(seen)
        assert ("Warning" in response.headers) == (more > 0)
    assert sorted(seen) == sorted(manifest.SOPInstanceUID)
    # Under the cap, nothing is said.
    response = qido(capped.url, "/instances", {"limit": "5"})
    assert len(response.json()) == 5 and "Warning" not in response.headers
    capped.qido_cap_warning = False  # cut silently, as Orthanc 1.7 does
    response = qido(capped.url, "/instances")
    assert len(response.json()) == 5 and "Warning" not in response.headers


def test_no_match_is_204(server):
    response = qido(server.url, "/studies", {"PatientID": "NOBODY"})
    assert response.status_code == 204 and response.content == b""
    assert qido(server.url, "/studies/1.2.3.4/series").status_code == 204


@pytest.mark.parametrize(
    "params",
    [
        {"PatientIdd": "x"},
        {"StudyDate": "2026"},
        {"StudyDate": "20260401-20260301"},
        {"limit": "-1"},
        {"limit": "many"},
        {"offset": "-3"},
        {"includefield": "NoSuchThing"},
        {"00081115.0020000E": "1.2"},
        {"00091001": "private"},
        {"fuzzymatching": "maybe"},
    ],
)
def test_bad_parameters_are_400(server, params):
    response = qido(server.url, "/studies", params)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text.strip()


def test_fuzzymatching_is_accepted_and_ignored(server):
    plain = qido(server.url, "/studies", {"PatientName": "*a*"}).json()
    fuzzy = qido(server.url, "/studies", {"PatientName": "*a*", "fuzzymatching": "true"}).json()
    assert plain == fuzzy


def test_unknown_resources_and_accept(server):
    assert qido(server.url, "/patients").status_code == 404
    assert requests.get(server.url.replace("/dicom-web", "/other"), timeout=5).status_code == 404
    assert qido(server.url, "/studies/not..a..uid/series").status_code == 400
    response = qido(server.url, "/studies", headers={"Accept": "application/dicom+xml"})
    assert response.status_code == 406
    response = qido(server.url, "/studies", headers={"Accept": "application/json"})
    assert response.status_code == 200


# --- WADO-RS --------------------------------------------------------------------------------


def check_parts(server, response, expected: pd.DataFrame) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith(
        'multipart/related; type="application/dicom"; boundary='
    )
    assert int(response.headers["Content-Length"]) == len(response.content)
    parts = split_multipart(response)
    by_sop = expected.set_index("SOPInstanceUID")
    assert len(parts) == len(expected)
    got = set()
    for headers, content in parts:
        sop = headers["Content-Location"].rsplit("/", 1)[1]
        row = by_sop.loc[sop]
        assert content == Path(row.path).read_bytes()
        assert headers["Content-Type"] == (
            "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        )
        assert headers["Content-Location"] == (
            f"{server.url}/studies/{row.StudyInstanceUID}/series/{row.SeriesInstanceUID}"
            f"/instances/{sop}"
        )
        got.add(sop)
    assert got == set(expected.SOPInstanceUID)


def test_wado_study_series_and_instance_are_the_files(server, manifest):
    study = manifest.StudyInstanceUID.iloc[0]
    in_study = manifest[manifest.StudyInstanceUID == study]
    series = in_study.SeriesInstanceUID.iloc[0]
    in_series = in_study[in_study.SeriesInstanceUID == series]
    sop = in_series.SOPInstanceUID.iloc[0]
    for path, expected, accept in (
        (f"/studies/{study}", in_study, WADO_ACCEPT),
        (
            f"/studies/{study}/series/{series}",
            in_series,
            "multipart/related; type=application/dicom",
        ),
        (f"/studies/{study}/series/{series}/instances/{sop}", in_series.iloc[:1], None),
        (
            f"/studies/{study}",
            in_study,
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1',
        ),
    ):
        headers = {"Accept": accept} if accept else {}
        response = requests.get(server.url + path, headers=headers, timeout=10)
        check_parts(server, response, expected)


def test_wado_refusals(server, manifest):
    study = manifest.StudyInstanceUID.iloc[0]
    assert requests.get(f"{server.url}/studies/1.2.3.999", timeout=5).status_code == 404
    series = manifest.SeriesInstanceUID.iloc[0]
    response = requests.get(f"{server.url}/studies/{study}/series/{series}/instances/1.2.3")
    assert response.status_code == 404
    for accept in (
        'multipart/related; type="application/octet-stream"',
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
        "image/jpeg",
    ):
        response = requests.get(
            f"{server.url}/studies/{study}", headers={"Accept": accept}, timeout=5
        )
        assert response.status_code == 406, accept


def test_wado_metadata(server, manifest):
    study = manifest.StudyInstanceUID.iloc[0]
    response = requests.get(f"{server.url}/studies/{study}/metadata", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    rows = response.json()
    assert uids(rows, "00080018") == set(
        manifest[manifest.StudyInstanceUID == study].SOPInstanceUID
    )
    assert all("7FE00010" not in row for row in rows)
    assert requests.get(f"{server.url}/studies/1.2.3.999/metadata", timeout=5).status_code == 404


def test_keep_alive_connection_serves_several_requests(server, manifest):
    study = manifest.StudyInstanceUID.iloc[0]
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(server.url + "/studies", timeout=5).status_code == 200
            response = session.get(
                f"{server.url}/studies/{study}", headers={"Accept": WADO_ACCEPT}, timeout=5
            )
            assert len(split_multipart(response)) > 0
            assert session.get(server.url + "/studies/1.2.3.999", timeout=5).status_code == 404


def test_parallel_retrievals_and_a_client_that_hangs_up(server, manifest):
    from concurrent.futures import ThreadPoolExecutor

    studies = manifest.StudyInstanceUID.unique().tolist()
    # A client that asks for a study, reads a few bytes and goes away.
    port = int(server.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET /dicom-web/studies/{studies[0]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(16).startswith(b"HTTP/1.1 200")

    def fetch(study: str) -> int:
        response = requests.get(
            f"{server.url}/studies/{study}", headers={"Accept": WADO_ACCEPT}, timeout=10
        )
        return len(split_multipart(response))

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(fetch, studies * 2))
    expected = manifest.groupby("StudyInstanceUID").size()
    assert counts == [int(expected[s]) for s in studies * 2]


# --- STOW-RS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A demo PACS over an empty folder, shared by the STOW-RS tests (one start per module)."""
    root = tmp_path_factory.mktemp("stow") / "store"
    with DemoPACS(root, http_port=0) as pacs:
        yield pacs


def stowed(target: DemoPACS) -> set[str]:
    return set(target.instances().SOPInstanceUID)


def test_stow_round_trip(target):
    ds = small_ct(patient="STOWED1")
    data = encode(ds)
    response = stow(target.url, data)
    assert response.status_code == 200, response.text
    answer = response.json()
    base = f"{target.url}/studies/{ds.StudyInstanceUID}"
    assert answer["00081190"]["Value"] == [base]
    (item,) = answer["00081199"]["Value"]
    assert item["00081150"]["Value"] == [CTImageStorage]
    assert item["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert item["00081190"]["Value"] == [
        f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    ]
    assert "00081198" not in answer
    path = target.folder / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert (path / f"{ds.SOPInstanceUID}.dcm").read_bytes() == data
    # QIDO finds it, C-FIND finds it, WADO gives the same bytes back.
    rows = qido(target.url, "/studies", {"PatientID": "STOWED1"}).json()
    assert uids(rows, "0020000D") == {ds.StudyInstanceUID}
    found = pf.PACS("127.0.0.1", target.port, target.ae_title).find_studies(
        PatientID="STOWED1", progress=False
    )
    assert found.StudyInstanceUID.tolist() == [ds.StudyInstanceUID]
    response = requests.get(item["00081190"]["Value"][0], timeout=5)
    ((_, content),) = split_multipart(response)
    assert content == data


def test_stow_chunked_request(target):
    ds = small_ct()
    body, ctype = multipart(encode(ds))
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    response = requests.post(
        target.url + "/studies", data=chunks, headers={"Content-Type": ctype}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert ds.SOPInstanceUID in stowed(target)


def test_stow_path_like_uid_is_refused_and_nothing_escapes(target):
    good = small_ct()
    evil = small_ct(sop="../../../evil")
    evil_series = small_ct(series="../outside")
    response = stow(target.url, encode(evil), encode(evil_series))
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xC000], [0xC000]]
    assert "00081155" not in failed[0]  # the path-like UID is not echoed as a UI
    assert failed[1]["00081155"]["Value"] == [evil_series.SOPInstanceUID]
    assert "00081199" not in response.json()
    # A partial failure is 202, with both sequences.
    response = stow(target.url, encode(good), encode(evil))
    assert response.status_code == 202
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 1 and len(answer["00081198"]["Value"]) == 1
    assert good.SOPInstanceUID in stowed(target)
    # Nothing outside the folder, nothing named after the bad UIDs inside it.
    root = target.folder
    # (root/<study>/<series>/../../../evil.dcm would be root.parent/evil.dcm)
    outside = [p for p in root.parent.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []
    written = [p.relative_to(root).as_posix() for p in root.rglob("*")]
    assert not [p for p in written if "evil" in p or "outside" in p]


def test_stow_to_a_study_refuses_other_studies(target):
    ds = small_ct()
    response = stow(target.url, encode(ds), path="/studies/1.2.3.4")
    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert ds.SOPInstanceUID not in stowed(target)
    response = stow(target.url, encode(ds), path=f"/studies/{ds.StudyInstanceUID}")
    assert response.status_code == 200


@pytest.fixture
def small_uploads(target):
    target.max_upload = 2000
    try:
        yield target
    finally:
        target.max_upload = DEFAULT_MAX_UPLOAD


def test_stow_refusals(small_uploads):
    target = small_uploads
    before = stowed(target)
    data = encode(small_ct())
    body, ctype = multipart(data, data, data)
    assert len(body) > target.max_upload > len(multipart(data)[0])
    response = requests.post(
        target.url + "/studies", data=body, headers={"Content-Type": ctype}, timeout=10
    )
    assert response.status_code == 413
    response = requests.post(
        target.url + "/studies",
        data=body,
        headers={"Content-Type": "application/dicom"},
        timeout=10,
    )
    assert response.status_code == 415
    small, ctype = multipart(data)
    response = requests.post(
        target.url + "/studies",
        data=small[:-20],  # no closing delimiter
        headers={"Content-Type": ctype},
        timeout=10,
    )
    assert response.status_code == 400
    response = requests.post(
        target.url + "/studies",
        data=small,
        headers={"Content-Type": ctype.replace("boundary=", "boundary=x")},
        timeout=10,
    )
    assert response.status_code == 400  # a wrong boundary finds no delimiter
    response = stow(target.url, b"not DICOM at all")
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert stowed(target) == before


# --- basic auth and logs ----------------------------------------------------------------------


@pytest.fixture
def locked(target):
    target.http_auth = ("alice", "s3cret")
    try:
        yield target
    finally:
        target.http_auth = None


def test_basic_auth(locked):
    response = qido(locked.url, "/studies")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert qido(locked.url, "/studies", auth=("alice", "wrong")).status_code == 401
    assert qido(locked.url, "/studies", auth=("alice", "s3cret")).status_code in (200, 204)
    assert requests.get(f"{locked.url}/studies/1.2.3", timeout=5).status_code == 401
    body, ctype = multipart(encode(small_ct()))
    response = requests.post(
        locked.url + "/studies", data=body, headers={"Content-Type": ctype}, timeout=5
    )
    assert response.status_code == 401
    response = requests.post(
        locked.url + "/studies",
        data=body,
        headers={"Content-Type": ctype},
        auth=("alice", "s3cret"),
        timeout=5,
    )
    assert response.status_code == 200


def test_bad_http_auth(tmp_path):
    with pytest.raises(ValueError, match="http_auth"):
        DemoPACS(tmp_path, http_port=0, http_auth=("alice",))


def test_logs_carry_no_patient_data(server, manifest, caplog):
    caplog.set_level(logging.DEBUG)
    first = manifest.iloc[0]
    qido(server.url, "/studies", {"PatientID": first.PatientID, "PatientName": first.PatientName})
    qido(server.url, "/studies", {"PatientName": first.PatientName, "StudyDate": "bad"})
    qido(server.url, "/instances", {"PatientID": first.PatientID})
    requests.get(f"{server.url}/studies/{first.StudyInstanceUID}", timeout=5)
    # Only the server's records: the test's own HTTP client (urllib3) logs its URLs.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pacsframe")]
    text = UID_RE.sub("<uid>", "\n".join(ours))
    assert "QIDO-RS STUDY level" in text
    for value in (first.PatientID, str(first.PatientName).split("^")[0]):
        assert value not in text


# --- the command line ---------------------------------------------------------------------------


def test_cli_serve_takes_http_port(tmp_path, monkeypatch, capsys):
    from pacsframe import cli
    from pacsframe.demo import server as server_module

    calls = {}

    def fake_serve(folder, **kwargs):
        calls.update(kwargs, folder=folder)

    monkeypatch.setattr(server_module, "serve", fake_serve)
    monkeypatch.setattr("pacsframe.demo.serve", fake_serve)
    assert cli.main(["serve", str(tmp_path), "--port", "11999", "--http-port", "8042"]) == 0
    assert calls["http_port"] == 8042 and calls["port"] == 11999
    assert "DICOMweb at http://127.0.0.1:8042/dicom-web" in capsys.readouterr().out
    assert cli.main(["serve", str(tmp_path)]) == 0
    assert calls["http_port"] is None
    assert "DICOMweb" not in capsys.readouterr().out
