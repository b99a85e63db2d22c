"""Logs at INFO and DEBUG name AE titles, levels, counts and UIDs, never patients.

A notebook user turns on logging to see why a retrieve is slow; the log they paste
into a ticket must not carry a patient's name, ID or birth date. These tests capture
every record from every logger (pacsframe, pynetdicom, pydicom, the demo server) at
DEBUG over a whole find / get / move / store run and look for the cohort's
identifying values in it.
"""

from __future__ import annotations

import logging
import re

import pandas as pd
import pytest

import pacsframe as pf
from pacsframe.demo import DemoPACS

# UIDs are long digit strings; a birth date's eight digits can occur inside one by
# chance, so UIDs are blanked out before the search.
UID = re.compile(r"\b\d+(?:\.\d+)+\b")


def identifying_values(manifest: pd.DataFrame) -> set[str]:
    """Every patient name, name component, ID and birth date in ``manifest``."""
    found: set[str] = set()
    for name in manifest.PatientName.dropna().unique():
        found.add(str(name))
        found.update(part for part in re.split(r"[\^=]", str(name)) if len(part) >= 3)
    found.update(str(v) for v in manifest.PatientID.dropna().unique())
    for day in pd.to_datetime(manifest.PatientBirthDate, errors="coerce").dropna().unique():
        found.update({day.strftime("%Y%m%d"), day.strftime("%Y-%m-%d")})
    return found


@pytest.fixture
def captured(caplog):
    caplog.set_level(logging.DEBUG)
    # Libraries that attach no handler of their own still propagate to the root,
    # where caplog listens; make sure none is filtered above DEBUG on the way.
    for name in ("pacsframe", "pynetdicom", "pydicom"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_a_whole_session_logs_no_patient_data(peer, client, tmp_path, captured):
    """Against the demo PACS and Orthanc (the ``peer`` fixture's two params)."""
    manifest = peer.manifest
    pacs = client
    first = manifest.iloc[0]

    pacs.echo()
    patients = pacs.find_patients(PatientName="*", return_keys=["PatientBirthDate"])
    assert set(patients.PatientID) == set(manifest.PatientID)
    # Matching on identifying values puts them in the request identifier too.
    studies = pacs.find_studies(PatientID=first.PatientID, PatientName=first.PatientName)
    assert len(studies) > 0
    series = pacs.find_series(studies)
    pacs.find_instances(series.iloc[:1])
    assert pacs.get(series.iloc[:1], progress=False).failed == 0
    assert pacs.move(series.iloc[1:], progress=False).failed == 0
    with DemoPACS(tmp_path / "store") as target:
        stored = pf.PACS("127.0.0.1", target.port, target.ae_title).store(manifest.iloc[:3])
        assert stored.failed == 0

    records = captured.records
    assert records, "nothing was logged: the capture itself is broken"
    text = UID.sub("<uid>", "\n".join(r.getMessage() for r in records))
    leaked = sorted(v for v in identifying_values(manifest) if v in text)
    assert not leaked, f"logs carry patient data: {leaked}"

    # What the logs are for is still there: who was asked, at what level, how many.
    ours = [r.getMessage() for r in records if r.name == "pacsframe"]
    assert any("C-FIND STUDY level" in m and pacs.ae_title in m for m in ours), ours
    assert any(m.startswith("C-GET from") for m in ours), ours
    assert any(m.startswith("C-STORE to") for m in ours), ours


def test_identifier_dumps_return_when_asked(demo_server, captured, cohort):
    """The switch stays pynetdicom's: a user debugging a peer can turn dumps back on."""
    from pynetdicom import _config

    _, manifest = cohort
    pacs = pf.PACS("127.0.0.1", demo_server.port, demo_server.ae_title)
    patient = manifest.PatientID.iloc[0]
    _config.LOG_RESPONSE_IDENTIFIERS = True
    try:
        pacs.find_patients(PatientID=patient)
    finally:
        _config.LOG_RESPONSE_IDENTIFIERS = False
    assert patient in captured.text
