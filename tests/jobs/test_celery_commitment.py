"""A ``data_access = "dicomweb"`` Celery worker delivering to a DICOM peer that offers Storage Commitment (a real
Orthanc that knows the node's AE title as a modality), with real redis, node and ``srnode worker`` processes."""

from __future__ import annotations

from pathlib import Path

from node.app.phantom import write_phantom_series
from node.bench.scaleout import RedisServer, WorkerProcess
from tests.jobs.test_celery import redis_server  # noqa: F401 - the fixture
from tests.send.test_confirm import put_modality
from tests.support.nodeproc import NodeProc, dump_toml, merge
from tests.support.peers import Orthanc, storescu


def test_a_dicomweb_worker_confirms_a_commitment_peer_by_count(tmp_path: Path, redis_server: RedisServer,  # noqa: F811
                                                                orthanc: Orthanc) -> None:
    """break19: the worker requested Storage Commitment from its own process; Orthanc sent the report to the node's
    AE title (the node), which knew no such transaction ("no delivery awaits it (ignored)"); the worker's delivery
    stayed 'sent' in its scratch index, and the node's job 'sending' with no delivery and no reason, for good
    (still so 90 s later, confirm_timeout_s 20). Now a worker does not request commitment (no report can reach it):
    ``auto`` counts by C-FIND: the job delivered, Orthanc holding the 11 derived instances."""
    orthanc.clear()
    executor = {"kind": "celery", "broker_url": redis_server.url, "data_access": "dicomweb",
                "visibility_timeout_s": 60}
    node = NodeProc.start(tmp_path / "node", {
        "http": {"token": "t0ken"}, "executor": executor, "outbox": {"confirm_timeout_s": 20},
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "calling_ae_title": "SRNODE"}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2, "destinations": ["pacs"]}],
    })
    put_modality(orthanc, "confirm-b19", "SRNODE", node.port)  # Orthanc's reports go to the node, as in a site
    wcfg = tmp_path / "worker.toml"
    wcfg.write_text(dump_toml(merge(node.config, {"node": {"spool_dir": str(tmp_path / "worker-spool")},
                                                  "executor": {**executor, "node_url": node.http_url}})))
    worker = WorkerProcess(wcfg, "remote@test", tmp_path / "worker.log")
    try:
        worker.start()
        assert storescu(write_phantom_series(tmp_path / "in", seed=19, slices=6, size=64), node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: js and all(j["state"] in ("delivered", "failed", "dead-letter") for j in js),
                              timeout=90, what="the remote job settled on the node")
    finally:
        worker.stop()
        node.stop()
    assert [j["state"] for j in jobs] == ["delivered"], jobs
    held = orthanc.get("/series?expand")
    derived = [s for s in held if s["MainDicomTags"].get("SeriesInstanceUID") == jobs[0]["derived_series"]]
    assert len(derived) == 1 and len(derived[0]["Instances"]) == 11, derived
    assert "11 of 11 instance(s) listed by the destination" in worker.log()
    assert "no delivery awaits it" not in node.log()


def test_commitment_on_dicomweb_workers_is_refused_at_load_naming_the_key() -> None:
    """break19: ``confirm = "commitment"`` with workers that deliver themselves (``data_access = "dicomweb"``) can
    never be confirmed (the report goes to the node): refused at load, naming the key, instead of a dead letter
    after every send. On a shared spool (the node takes the reports) it stays allowed."""
    import pytest

    from node.config import config_from_dict
    from node.errors import ConfigError

    def cfg(access: str) -> object:
        return config_from_dict({
            "executor": {"kind": "celery", "data_access": access, "node_url": "http://127.0.0.1:8080"},
            "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                              "confirm": "commitment"}],
            "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"]}]})

    with pytest.raises(ConfigError, match=r"destinations\[0\]\.confirm: 'commitment' with executor.data_access"):
        cfg("dicomweb")
    cfg("shared")
