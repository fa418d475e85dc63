"""The journal's state machine: legal moves, history, reopening, runs."""

from __future__ import annotations

import pytest

from dicom_node import journal as j
from dicom_node.journal import InstanceRecord, Journal


def record(journal: Journal, study_uid: str, sop: str, assoc: str | None = None):
    return journal.record_instance(
        InstanceRecord(study_uid, study_uid + ".1", sop, "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.1.2.1", "CT", f"{study_uid}/{study_uid}.1/{sop}.dcm", 100),
        calling_ae="MOD", peer_host="127.0.0.1", assoc_id=assoc,
    )


@pytest.fixture
def journal(tmp_path):
    jr = Journal(tmp_path / "journal.sqlite")
    yield jr
    jr.close()


def test_every_state_has_a_row_and_only_listed_moves_are_legal(journal):
    assert set(j.TRANSITIONS) == {None, *j.STATES}
    key = record(journal, "1.2.3", "1.2.3.4").study_key
    with pytest.raises(j.IllegalTransition):
        journal.transition(key, j.DELIVERED)  # RECEIVING -> DELIVERED skips steps
    journal.transition(key, j.COMPLETE, "idle")
    journal.transition(key, j.QUEUED)
    journal.transition(key, j.QUEUED, "stale")  # a re-queue counts an attempt
    assert journal.get(key).attempts == 1
    journal.transition(key, j.ANALYZED, model="lung-nodule-ct", model_version="1.0.0",
                       outputs=["sr.dcm"])
    journal.transition(key, j.DELIVERED, destination="ORTHANC", destination_answer="0x0000")
    study = journal.get(key)
    assert study.state == j.DELIVERED and study.outputs == ["sr.dcm"]
    assert [h["to_state"] for h in journal.history(key)] == [
        "RECEIVING", "COMPLETE", "QUEUED", "QUEUED", "ANALYZED", "DELIVERED"]
    with pytest.raises(j.IllegalTransition):
        journal.transition(key, j.QUEUED)


def test_conditional_transition_protects_a_newer_run(journal):
    key = record(journal, "1.2.3", "1.2.3.4").study_key
    journal.transition(key, j.COMPLETE)
    journal.transition(key, j.QUEUED)
    record(journal, "1.2.3", "1.2.3.5")  # late instance: run 2 starts
    study = journal.get(key)
    assert (study.state, study.run) == (j.RECEIVING, 2)
    with pytest.raises(j.IllegalTransition):
        journal.transition(key, j.ANALYZED, expect_run=1)  # the old run's task finishing


def test_late_instance_after_delivery_supersedes_the_result(journal):
    key = record(journal, "1.2.3", "1.2.3.4").study_key
    for state in (j.COMPLETE, j.QUEUED):
        journal.transition(key, state)
    journal.transition(key, j.ANALYZED, outputs=["sr-1.dcm"])
    journal.transition(key, j.DELIVERED)
    result = record(journal, "1.2.3", "1.2.3.9")
    assert result.reopened and result.new
    study = journal.get(key)
    assert study.state == j.RECEIVING and study.run == 2
    assert study.predecessor_outputs == ["sr-1.dcm"] and study.outputs == []
    assert study.instance_count == 2
    moves = [(h["from_state"], h["to_state"], h["run"]) for h in journal.history(key)][-2:]
    assert moves == [("DELIVERED", "SUPERSEDED", 1), ("SUPERSEDED", "RECEIVING", 2)]


def test_our_own_outputs_sent_back_do_not_reopen_the_study(journal):
    """A routing rule that forwards everything to us sends our SR back: stored, no new run
    (else every report would cause the next one)."""
    key = record(journal, "1.2.3", "1.2.3.4").study_key
    for state in (j.COMPLETE, j.QUEUED):
        journal.transition(key, state)
    journal.record_outputs(key, 1, ["2.25.777"])
    journal.transition(key, j.ANALYZED, outputs=["SR.dcm"])
    journal.transition(key, j.DELIVERED)
    echoed = record(journal, "1.2.3", "2.25.777")
    assert echoed.new and not echoed.reopened
    study = journal.get(key)
    assert (study.state, study.run, study.instance_count) == (j.DELIVERED, 1, 1)
    assert journal.instance("2.25.777") is not None  # journaled: a third copy is a plain duplicate
    assert record(journal, "1.2.3", "1.2.3.5").reopened  # a real late instance still reopens


def test_duplicate_sop_is_not_counted_twice(journal):
    first = record(journal, "1.2.3", "1.2.3.4")
    again = record(journal, "1.2.3", "1.2.3.4")
    assert first.new and not again.new
    assert journal.get(first.study_key).instance_count == 1


def test_study_key_is_salted_and_stable(tmp_path):
    a = Journal(tmp_path / "a.sqlite")
    b = Journal(tmp_path / "b.sqlite")
    assert a.study_key("1.2.3") == Journal(tmp_path / "a.sqlite").study_key("1.2.3")
    assert a.study_key("1.2.3") != b.study_key("1.2.3")
    assert "1.2.3" not in a.study_key("1.2.3") and len(a.study_key("1.2.3")) == 16


def test_open_associations_hold_completion_data(journal):
    journal.open_association("a1", calling_ae="MOD", called_ae="PACS_AI", peer_host="127.0.0.1", peer_port=1)
    key = record(journal, "1.2.3", "1.2.3.4", assoc="a1").study_key
    [(study, open_assocs)] = journal.receiving_studies()
    assert study.study_key == key and open_assocs == 1
    journal.close_association("a1", "released", instances=1)
    [(_, open_assocs)] = journal.receiving_studies()
    assert open_assocs == 0
