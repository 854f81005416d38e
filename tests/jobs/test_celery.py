"""Scale-out on Celery with real peers: redis-server, the real node, two real `srnode worker` processes, and
dcmtk's storescp as the PACS (``+uf``: every received instance gets its own file, so a second delivery of the
same instance would show as a second file).

N series are spread over both workers; then one worker is SIGKILLed (with its pool child) in the middle of a
job: the broker gives the job to the other worker after the visibility timeout, and every result arrives once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from node.bench.scaleout import RedisServer, WorkerProcess
from node.config import config_from_dict, load_config
from node.jobs.celery_executor import broker_display, make_app, transport_options
from node.store import Index
from tests.support.nodeproc import NodeProc, dump_toml, merge
from tests.support.peers import STORESCP, free_port, storescu, wait_until

pytestmark = pytest.mark.timeout(300)

VISIBILITY_S = 12  # above the longest job here (a few seconds, more on a loaded CI); the kill test waits this once


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp: AE PACS on a free port, one file per received instance (+uf)."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    logf = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen([STORESCP, "-aet", "PACS", "+uf", "-od", str(out), str(port)],
                            stdout=logf, stderr=subprocess.STDOUT)
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)


def _jobs_done(index: Index, n: int) -> list[int]:
    jobs = [j for j in index.jobs() if j.state != "superseded"]
    done = [j.id for j in jobs if j.state in ("delivered", "failed", "dead-letter")]
    return done if len(done) >= n else []


def _dicomweb_node(tmp_path: Path, redis: RedisServer, pacs_port: int,
                   node: dict[str, Any] | None = None) -> tuple[NodeProc, Path]:
    """The real node on Celery with ``data_access = "dicomweb"`` (HTTP token, visibility timeout 60 s, stable_age_s
    1 s and ``node`` over its [node] section) whose rule "ct" (x2) sends to the storescp ``pacs`` on ``pacs_port``;
    and the config file of its workers (``tmp_path/worker.toml``): their own spool under ``tmp_path/worker-spool``,
    the series fetched from the node over WADO-RS. The caller stops the node."""
    executor = {"kind": "celery", "broker_url": redis.url, "data_access": "dicomweb", "visibility_timeout_s": 60}
    proc = NodeProc.start(tmp_path / "node", {
        "node": {"stable_age_s": 1.0, **(node or {})},
        "http": {"token": "t0ken"},
        "executor": executor,
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs_port}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["pacs"]}],
    })
    wcfg = tmp_path / "worker.toml"
    wcfg.write_text(dump_toml(merge(proc.config, {"node": {"spool_dir": str(tmp_path / "worker-spool")},
                                                  "executor": {**executor, "node_url": proc.http_url}})))
    return proc, wcfg


def test_settings_for_scale_out() -> None:
    """Prefetch 1, acks late, reject on worker lost, visibility timeout from config; no password in logs."""
    cfg = config_from_dict({"executor": {"kind": "celery", "broker_url": "amqp://srnode:s3cret@mq:5672//",
                                         "visibility_timeout_s": 600}})
    app = make_app(cfg)
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.broker_transport_options["visibility_timeout"] == 600
    assert transport_options(cfg)["unacked_restore_interval"] == 60
    assert app.conf.broker_url.startswith("amqp://")  # RabbitMQ by configuration alone
    assert "s3cret" not in broker_display(cfg.executor.broker_url)


def test_two_workers_share_jobs_and_survive_a_kill(tmp_path: Path, redis_server: RedisServer,
                                                   pacs: tuple[int, Path]) -> None:
    pacs_port, pacs_dir = pacs
    node = NodeProc.start(tmp_path / "node", {
        "http": {"enabled": False},
        "executor": {"kind": "celery", "broker_url": redis_server.url, "visibility_timeout_s": VISIBILITY_S},
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs_port}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["pacs"]}],
    })
    spool = node.spool
    workers = [WorkerProcess(node.config_path, f"w{i}@test", tmp_path / f"worker{i}.log") for i in (1, 2)]
    try:
        for w in workers:
            w.launch()
        for w in workers:
            w.wait_ready()
        index = Index(spool / "index.sqlite")
        port = node.port

        # N small series, sent together: both workers take jobs
        n = 4
        for i in range(n):
            files = write_phantom_series(tmp_path / f"in{i}", seed=i, slices=8, size=64)
            assert storescu(files, port).returncode == 0
        wait_until(lambda: _jobs_done(index, n), timeout=120, what=f"{n} jobs delivered")
        ran = {w.name: w.log().count(": finished on ") for w in workers}
        assert all(ran.values()), f"both workers should have run jobs: {ran}"

        def start_big(seed: int) -> tuple[int, WorkerProcess, int]:
            """Send a bigger series; returns (job id, the worker running it, its pool process id)."""
            files = write_phantom_series(tmp_path / f"big{seed}", seed=seed, slices=16, size=512)
            assert storescu(files, port).returncode == 0
            series_uid = dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID

            def started() -> tuple[int, WorkerProcess, int] | None:
                job = next((j for j in index.jobs() if j.series_uid == series_uid), None)
                for w in workers if job is not None else []:
                    m = re.search(rf"job {job.id}: started on {re.escape(w.name)} pid (\d+)", w.log())
                    if m:
                        return job.id, w, int(m.group(1))
                return None

            return wait_until(started, timeout=60, what=f"a worker to start the job of series seed {seed}")

        # the whole worker dies mid-job (SIGKILL to it and its pool process, as a machine that fails): the
        # broker gives the job to the other worker after the visibility timeout
        job_id, victim, _pid = start_big(99)
        # the worker logs "started" just before it claims the job in the index
        wait_until(lambda: index.job(job_id).state == "processing", timeout=30, what=f"job {job_id} processing")
        victim.kill9()
        survivor = next(w for w in workers if w is not victim)
        wait_until(lambda: index.job(job_id).state == "delivered", timeout=VISIBILITY_S + 90,
                   what=f"job {job_id} re-run by {survivor.name} and delivered")
        assert f"job {job_id}: started on {survivor.name}" in survivor.log()
        assert f"job {job_id}: finished on {survivor.name}" in survivor.log()

        # only the job's pool process dies (as under the OOM killer): rejected and re-run at once
        job_id2, w, pid = start_big(98)
        assert w is survivor
        wait_until(lambda: index.job(job_id2).state == "processing", timeout=30, what=f"job {job_id2} processing")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: index.job(job_id2).state == "delivered", timeout=90,
                   what=f"job {job_id2} re-run after its pool process was killed")
        assert survivor.log().count(f"job {job_id2}: started on ") == 2
        assert f"job {job_id2}: finished on {survivor.name}" in survivor.log()

        # every result delivered once: one file per SOP instance at the PACS, every job's series there
        received = [dcmread(p, stop_before_pixels=True) for p in sorted(pacs_dir.rglob("*")) if p.is_file()]
        counts = Counter(ds.SOPInstanceUID for ds in received)
        assert received and max(counts.values()) == 1, f"instances delivered twice: {counts.most_common(3)}"
        series_at_pacs = {ds.SeriesInstanceUID for ds in received}
        jobs = [j for j in index.jobs() if j.state == "delivered"]
        assert len(jobs) == n + 2
        for j in jobs:
            assert j.derived_series_uid in series_at_pacs, f"job {j.id}: derived series not at the PACS"
            assert not j.uncertainty_series_uid, f"job {j.id}: cubic has no sigma, yet an uncertainty series"
    finally:
        for w in workers:
            w.stop()
        node.stop()


def test_worker_without_shared_spool_fetches_over_dicomweb(tmp_path: Path, redis_server: RedisServer,
                                                           pacs: tuple[int, Path]) -> None:
    """data_access = "dicomweb": the worker has its own spool, fetches the series from the node over WADO-RS,
    delivers the results itself, and the node's job records the outcome."""
    pacs_port, pacs_dir = pacs
    node, wcfg = _dicomweb_node(tmp_path, redis_server, pacs_port)
    worker = WorkerProcess(wcfg, "remote@test", tmp_path / "worker.log")
    try:
        worker.start()
        files = write_phantom_series(tmp_path / "in", seed=7, slices=10, size=64)
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: js and all(j["state"] in ("delivered", "failed") for j in js),
                              timeout=120, what="the remote job recorded on the node")
        assert [j["state"] for j in jobs] == ["delivered"], jobs
        assert "fetched 10 instances" in worker.log()
        scratch = tmp_path / "worker-spool" / "workers" / "remote@test"  # this worker's own (worker_cmd.scratch_spool)
        assert (scratch / "index.sqlite").exists(), sorted((tmp_path / "worker-spool").rglob("*"))[:20]
        assert not list((scratch / "instances").rglob("*.dcm")), "worker scratch not cleaned"
        assert not (node.spool / "outbox").exists() or not any((node.spool / "outbox").iterdir())
        received = [dcmread(p, stop_before_pixels=True) for p in pacs_dir.rglob("*") if p.is_file()]
        counts = Counter(ds.SOPInstanceUID for ds in received)
        assert received and max(counts.values()) == 1, f"instances delivered twice: {counts.most_common(3)}"
        assert {ds.SeriesInstanceUID for ds in received} == {jobs[0]["derived_series"]}  # cubic: no sigma
        assert jobs[0]["uncertainty_series"] == ""
    finally:
        worker.stop()
        node.stop()


def test_deployment_files_are_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's and compose's configs load (their HTTP token from SRNODE_HTTP_TOKEN, which compose passes to
    the node and the workers); every COPY source exists; the Dockerfile lints clean."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("SRNODE_HTTP_TOKEN", "tok-deploy-test")
    assert load_config(root / "deploy/config.toml").executor.kind == "inprocess"
    cfg = load_config(root / "deploy/config-celery.toml")
    assert cfg.executor.kind == "celery" and cfg.node.spool_dir == "/var/lib/srnode/spool"
    assert cfg.http.token == "tok-deploy-test" == load_config(root / "deploy/config.toml").http.token
    dockerfile = (root / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (root / src).exists(), f"Dockerfile: COPY source {src} is missing"
    assert "scripts/install-python.sh" in dockerfile and "scripts/install-python.sh" in (root / "Makefile").read_text()
    compose = (root / "deploy/docker-compose.yml").read_text()
    assert "./config-celery.toml:/etc/srnode/config.toml" in compose
    assert compose.count("SRNODE_HTTP_TOKEN: ${SRNODE_HTTP_TOKEN:?") == 2, "node and worker need the HTTP token"
    hadolint = shutil.which("hadolint")
    if hadolint:
        r = subprocess.run([hadolint, str(root / "Dockerfile")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_dicomweb_worker_retires_the_results_late_instances_replace(tmp_path: Path, redis_server: RedisServer,
                                                                      pacs: tuple[int, Path]) -> None:
    """hostile18: data_access = "dicomweb", 8 of 10 slices, delivered by the remote worker; then the 2 late
    slices: a second node job. Before: the worker took it as 'already delivered' (it compared the series' count
    from its own last fetch, 8, with its job's, 8) and answered the first result: the node's job 2 'delivered'
    with job 1's derived series (SeriesNumber 98002 both), the 2 late slices in no derived series, nothing said.
    And the worker removed its delivered results, so a re-made one could carry no rejection note. Now the node
    sends the count its job took (10): the 10 slices are fetched, processed (19 derived slices) and delivered
    with a KO retiring exactly the first result, under the next SeriesNumber revision, as in process."""
    pacs_port, pacs_dir = pacs
    node, wcfg = _dicomweb_node(tmp_path, redis_server, pacs_port)
    worker = WorkerProcess(wcfg, "remote@test", tmp_path / "worker.log")
    try:
        worker.start()
        files = write_phantom_series(tmp_path / "in", seed=18, slices=10, size=64)
        assert storescu(files[:8], node.port).returncode == 0
        node.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "delivered", timeout=120,
                       what="the first job delivered")
        assert storescu(files[8:], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in ("delivered", "failed") for j in js),
                              timeout=120, what="the second job done")
        assert [j["state"] for j in jobs] == ["delivered", "delivered"], jobs
        received = [dcmread(p, stop_before_pixels=True) for p in pacs_dir.rglob("*") if p.is_file()]
        kos = [ds for ds in received if ds.Modality == "KO"]
        first = {ds.SeriesNumber for ds in received if ds.SeriesInstanceUID == jobs[0]["derived_series"]}
        second = {ds.SeriesNumber for ds in received if ds.SeriesInstanceUID == jobs[1]["derived_series"]}
        assert jobs[0]["derived_series"] != jobs[1]["derived_series"] and first != second, (first, second)
        assert sum(ds.SeriesInstanceUID == jobs[1]["derived_series"] for ds in received) == 19
        assert len(kos) == 1, [ds.Modality for ds in received]
        (ko,) = kos
        rejected = {r.ReferencedSOPInstanceUID for s in ko.CurrentRequestedProcedureEvidenceSequence[0]
                    .ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert rejected == {ds.SOPInstanceUID for ds in received if ds.SeriesInstanceUID == jobs[0]["derived_series"]}
    finally:
        worker.stop()
        node.stop()


def test_a_result_made_on_another_dicomweb_worker_is_said_unretired(tmp_path: Path, redis_server: RedisServer,
                                                                   pacs: tuple[int, Path]) -> None:
    """hostile18: the first result made by worker A, the late slices' job by worker B (its own scratch spool: no
    record of A's result). B cannot make the rejection note; the node's job 2 says so, naming the series to
    retire by hand, and a WARNING line (before: nothing said)."""
    pacs_port, _pacs_dir = pacs
    node, wcfg = _dicomweb_node(tmp_path, redis_server, pacs_port)
    files = write_phantom_series(tmp_path / "in", seed=19, slices=10, size=64)
    a = WorkerProcess(wcfg, "a@test", tmp_path / "a.log")
    try:
        a.start()
        assert storescu(files[:8], node.port).returncode == 0
        first = node.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "delivered", timeout=120,
                               what="the first job delivered")[0]
    finally:
        a.stop()
    b = WorkerProcess(wcfg, "b@test", tmp_path / "b.log")
    try:
        b.start()
        assert storescu(files[8:], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in ("delivered", "failed") for j in js),
                              timeout=120, what="the second job done")
        assert jobs[1]["state"] == "delivered", jobs
        assert f"no rejection note retires job {first['id']}'s derived series {first['derived_series']}" in \
            jobs[1]["reason"], jobs[1]
        assert "retire it in the PACS by hand" in node.log()
    finally:
        b.stop()
        node.stop()


def test_a_dicomweb_worker_is_not_given_part_of_a_series_the_node_pruned(tmp_path: Path, redis_server: RedisServer,
                                                                         pacs: tuple[int, Path]) -> None:
    """break18b: data_access = "dicomweb"; a series delivered, pruned by the node's retention, then 2 of its 4
    instances sent again: published to the worker, whose own spool knows nothing of the prune (it still listed the 4
    instances it had removed after delivering): the job failed "write error while writing results: No such file or
    directory (ENOENT) …; 'srnode retry' re-queues the job once there is room" (a retry failed the same way). Now
    the node decides it before publishing: 'ignored', its reason saying the pruned results cover it; nothing sent."""
    pacs_port, pacs_dir = pacs
    node, wcfg = _dicomweb_node(tmp_path, redis_server, pacs_port, {"retention_days": 2e-5})
    worker = WorkerProcess(wcfg, "remote@test", tmp_path / "worker.log")
    try:
        worker.start()
        files = write_phantom_series(tmp_path / "in", seed=19, slices=4, size=64)
        assert storescu(files, node.port).returncode == 0
        node.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "delivered", timeout=120,
                       what="the first job delivered")
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the retention to pass and the prune")
        sent = sorted(p for p in pacs_dir.rglob("*") if p.is_file())
        assert storescu(files[:2], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] not in ("queued", "processing", "sending"),
                              timeout=120, what="the resend decided")
        assert jobs[1]["state"] == "ignored", (jobs[1]["state"], jobs[1]["reason"])
        assert "2 of them were sent again" in jobs[1]["reason"], jobs
        assert sorted(p for p in pacs_dir.rglob("*") if p.is_file()) == sent
    finally:
        worker.stop()
        node.stop()
