"""The queue's pure parts: the Celery configuration, destinations, backoff, message checks.
Everything that moves a study is tested with real processes in tests/e2e/."""
from __future__ import annotations

import pytest

from study_queue.celery_app import DELIVER, embedded_folders, make_app
from study_queue.delivery import NoDestination, backoff, check_result, destination_for
from study_queue.errors import ConfigError
from study_queue.settings import load_settings
from study_queue.workdir import BadMessage, WorkDir


def settings(tmp_path, **sections):
    return load_settings(env={}, overrides={"node": {"spool": str(tmp_path / "spool")}, **sections})


def test_the_celery_app_takes_json_only_and_acknowledges_late(tmp_path):
    app = make_app(settings(tmp_path))
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert not conf.task_always_eager
    assert conf.task_routes[DELIVER] == {"queue": "delivery"}
    assert conf.broker_url.startswith("filesystem://")
    folders = embedded_folders(tmp_path / "spool")
    assert conf.broker_transport_options["data_folder_in"] == str(folders["messages"])
    assert all(f.is_dir() for f in folders.values())
    assert {"study_queue.analyze", "study_queue.deliver"} <= set(app.tasks)


def test_redis_broker_options(tmp_path):
    s = settings(tmp_path)
    s.queue.broker_url = "rediss://:secret@redis.example.org:6380/0"
    app = make_app(s)
    assert app.conf.broker_transport_options["visibility_timeout"] == 7200.0
    assert app.conf.broker_use_ssl["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED


@pytest.mark.parametrize("url, ok", [("", True), ("redis://localhost:6379/0", True), ("rediss://h:1/0", True),
                                     ("filesystem://", False), ("amqp://x", False)])
def test_broker_url_must_be_redis_or_empty(tmp_path, url, ok):
    if ok:
        assert settings(tmp_path, queue={"broker_url": url}).queue.broker_url == url
    else:
        with pytest.raises(ConfigError, match="queue.broker_url"):
            settings(tmp_path, queue={"broker_url": url})


def test_bad_queue_and_delivery_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="queue.max_attempts"):
        settings(tmp_path, queue={"max_attempts": 0})
    with pytest.raises(ConfigError, match="queue.stale_after"):
        settings(tmp_path, queue={"stale_after": -1.0})
    with pytest.raises(ConfigError, match="delivery.backoff_max"):
        settings(tmp_path, delivery={"backoff_initial": 10.0, "backoff_max": 5.0})


def test_backoff_doubles_up_to_its_cap(tmp_path):
    s = settings(tmp_path, delivery={"backoff_initial": 10.0, "backoff_max": 60.0})
    assert [backoff(s, n) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_destinations(tmp_path):
    s = load_settings(env={}, overrides={"node": {"spool": str(tmp_path)}})
    from study_queue.settings import PeerSettings

    s.peers = [PeerSettings("ORTHANC", "10.0.0.5", 4242), PeerSettings("CT1", "10.0.0.9", 104)]
    assert str(destination_for(s, "ORTHANC")) == "ORTHANC@10.0.0.5:4242"
    with pytest.raises(NoDestination, match="'STRANGER' has no \\[\\[peers\\]\\] entry"):
        destination_for(s, "STRANGER")
    s.delivery.return_to = "ORTHANC"
    assert str(destination_for(s, "CT1")) == "ORTHANC@10.0.0.5:4242"  # results from the scanner go to the PACS
    s.delivery.return_to = "none"
    assert destination_for(s, "CT1") is None


@pytest.mark.parametrize("message, error", [
    ([], "JSON object"),
    ({"study_key": "../../etc", "run": 1, "outcome": "analyzed"}, "16 hexadecimal"),
    ({"study_key": "0123456789abcdef", "run": "1", "outcome": "analyzed"}, "positive integer"),
    ({"study_key": "0123456789abcdef", "run": 1, "outcome": "pwned"}, "outcome"),
    ({"study_key": "0123456789abcdef", "run": 1, "outcome": "analyzed", "outputs": [1]}, "paths"),
])
def test_malformed_results_are_refused_with_the_reason(message, error):
    with pytest.raises(BadMessage, match=error):
        check_result(message)


def test_work_folder_and_heartbeat(tmp_path):
    work = WorkDir(tmp_path, "0123456789abcdef", 2)
    assert work.path == tmp_path / "work" / "0123456789abcdef" / "run-2"
    assert work.heartbeat_age() is None and work.read_result() is None
    from study_queue.workdir import Heartbeat

    with Heartbeat(work, 0.05):
        assert work.heartbeat_age() is not None and work.heartbeat_age() < 1.0
    work.write_result({"outcome": "ignored"})
    assert work.read_result() == {"outcome": "ignored"}
    work.clear_heartbeat()
    assert work.heartbeat_age() is None
