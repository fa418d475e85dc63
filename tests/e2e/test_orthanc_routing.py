"""The Orthanc recipe of deploy/pacs/ end to end: a real Orthanc with the recipe's Lua rule
(``deploy/pacs/orthanc/autorouting.lua``) and its DicomModalities entry
(``deploy/pacs/orthanc/pacs-ai-modality.json``), and ``pacs-ai run``.

A phantom CT study uploaded to Orthanc by REST is forwarded by the rule alone (the test never
asks Orthanc to send), the SR comes back into Orthanc, and nothing loops: our SR, key images
and KOS arriving in Orthanc are not sent back, the journal ends DELIVERED with run 1, and a
CT instance that pacs-ai's own AE title stores into Orthanc is not routed either, while one
from a modality is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.conftest import free_port
from tests.nodeproc import NodeProcess
from tests.orthanc import OrthancProcess

from .conftest import phantom_files, quick, read

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "pacs" / "orthanc"
PACS_AI_AET = "PACS_AI"
SCANNER_AET = "CT_SCANNER"


def recipe_modality(node_port: int) -> tuple[str, dict]:
    """The recipe's DicomModalities entry, pointed at the node under test."""
    entries = json.loads((RECIPE / "pacs-ai-modality.json").read_text())["DicomModalities"]
    [(name, entry)] = entries.items()
    assert entry["AET"] == PACS_AI_AET
    return name, {**entry, "Host": "127.0.0.1", "Port": node_port}


def store_one_ct(orthanc: OrthancProcess, source: Path, calling_ae: str) -> str:
    """C-STORE one phantom slice, as a new study, into Orthanc as ``calling_ae``; its study UID."""
    ds = dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established, f"Orthanc refused {calling_ae}: {orthanc.log_text()[-2000:]}"
    try:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    return str(ds.StudyInstanceUID)


def lua_errors(orthanc: OrthancProcess) -> list[str]:
    return [line for line in orthanc.log_text().splitlines() if line[:1] == "E" and "Lua" in line]


def test_orthanc_lua_rule_routes_ct_to_pacs_ai_and_the_report_comes_back_once(tmp_path, phantom):
    node_port = free_port()
    name, entry = recipe_modality(node_port)
    orthanc = OrthancProcess(
        tmp_path / "orthanc",
        # Only known modalities may store: our results get in through the recipe's entry.
        always_allow_store=False,
        extra_config={
            "LuaScripts": [str(RECIPE / "autorouting.lua")],
            "DicomModalities": {name: entry,
                                "scanner": {"AET": SCANNER_AET, "Host": "127.0.0.1", "Port": free_port()}},
            "DicomAssociationCloseDelay": 5,  # Orthanc's default, as the recipe leaves it
        },
    ).start()
    node = NodeProcess(tmp_path, port=node_port, command="run", sections=quick(tmp_path),
                       peers=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}])
    try:
        node.start(timeout=60)
        files = phantom_files(phantom)
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        orthanc.upload(files)  # REST: RequestOrigin "RestApi"; the Lua rule does the rest

        [sr_series] = orthanc.wait_for_series(study_uid, "SR", timeout=120)
        [sr_instance] = orthanc.instances_of_series(sr_series["ID"])
        sr = read(orthanc.instance_file(sr_instance["ID"]))
        assert sr.StudyInstanceUID == study_uid and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        [study] = node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "DELIVERED", "DELIVERED", timeout=60)
        assert study["study_uid"] == study_uid and study["calling_ae"] == orthanc.aet
        assert study["instance_count"] == len(files)

        # No loop: our outputs stored into Orthanc (by PACS_AI, Modality SR/OT/KO) go nowhere.
        time.sleep(5)  # five idle timeouts of the node; Orthanc's association close delay
        [again] = node.status()
        assert (again["state"], again["run"], again["instance_count"]) == ("DELIVERED", 1, len(files)), again
        history = node.status(again["study_key"])["history"]
        states = [h["to_state"] for h in history]
        # One run, received once and delivered once (QUEUED may repeat: a study no worker took
        # within queue.stale_after is queued again, which is not a loop).
        assert {h["run"] for h in history} == {1}, history
        assert states.count("RECEIVING") == 1 and states.count("DELIVERED") == 1, states
        assert states[0] == "RECEIVING" and states[-1] == "DELIVERED" and "SUPERSEDED" not in states, states
        study_id = orthanc.study_id_for_uid(study_uid)
        sr_series_now = [s for s in orthanc.series_of(study_id) if s["MainDicomTags"].get("Modality") == "SR"]
        assert len(sr_series_now) == 1 and len(orthanc.instances_of_series(sr_series_now[0]["ID"])) == 1

        # The AE-title guard on its own: a CT that PACS_AI stores into Orthanc is not routed,
        # a CT from a modality is (origin DicomProtocol). Lua events run in order, so once
        # the modality's study has reached the node the other one would have too.
        ours = store_one_ct(orthanc, files[0], PACS_AI_AET)
        theirs = store_one_ct(orthanc, files[1], SCANNER_AET)
        node.wait_for(lambda s: any(x["study_uid"] == theirs for x in s), "the modality's CT routed", timeout=60)
        time.sleep(3)
        uids = {s["study_uid"] for s in node.status()}
        assert uids == {study_uid, theirs}, f"routed {uids - {study_uid, theirs}}; {ours} must not be"
        assert lua_errors(orthanc) == []
    finally:
        node.stop()
        orthanc.kill9()
