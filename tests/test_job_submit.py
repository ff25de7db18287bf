"""`ray job submit` end to end: a `ray start --head` cluster of our own, the job's corpus, model and index on
the loopback S3 server, status and logs through the job API, the published index searched from S3.

The head cluster is separate from the session's in-process Ray (`ray_cluster` in conftest) and does not
depend on it, so this module runs in any order, alone or beside the rest of the suite:

* it lives in a private `--temp-dir`: `ray start` writes its address to `<temp-dir>/ray_current_cluster`, so
  a plain `ray.init()` elsewhere (which looks in the default /tmp/ray) never attaches to it;
* every port is a free one picked here, worker ports are chosen by the OS (`--min-worker-port=0`);
* it is stopped by killing exactly its own processes (the process group of `ray start` and the descendants
  of those processes, i.e. the workers, job supervisors and job drivers). `ray stop` is not used: it stops
  every Ray on the machine, the session's cluster and other users' included.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import S3_REGION, SESSION_WORKERS_KEPT, sample_docs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
N_DOCS = 80  # any size does: the job's own progress, publish and count lines and two searches are checked


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open together, so no port is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_env() -> dict[str, str]:
    """The environment of `ray start` (inherited by the raylet, job supervisors and job drivers): this venv's
    `python` first on PATH, no auth token, offline Hugging Face, and no ambient AWS settings, so the job
    gets its credentials only from its runtime_env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1",
               # the raylet keeps idle workers between a job's census, write and tier tasks (conftest's
               # ray_cluster does the same for the session's Ray)
               RAY_num_workers_soft_limit=str(SESSION_WORKERS_KEPT))
    return env


def _cluster_processes(pgid: int):
    """Live processes of the cluster started as process group `pgid`, plus all their descendants (workers
    put themselves in their own process groups but stay children of the raylet)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                found[p.pid] = p
        except (ProcessLookupError, psutil.Error):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            continue
    me = os.getpid()
    return [p for pid, p in found.items() if pid != me]


def _alive_with(marker: str) -> list[str]:
    """Non-zombie processes (other than this one and its ancestors) whose command line mentions `marker`."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.pid in mine or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in a for a in (p.info["cmdline"] or [])):
                out.append(f"{p.pid} {' '.join(p.info['cmdline'])[:160]}")
        except psutil.Error:
            continue
    return out


def _stop_cluster(pgid: int, marker: str) -> None:
    import psutil

    procs = _cluster_processes(pgid)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=1)
    for p in alive:  # gcs_server and the autoscaler monitor can sit on SIGTERM for a while: no need to wait
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    leftovers = [p.pid for p in _cluster_processes(pgid) if p.status() != psutil.STATUS_ZOMBIE]
    leftovers += _alive_with(marker)
    assert not leftovers, f"Ray processes of the test cluster survived: {leftovers}"


@pytest.fixture(scope="module")
def head_cluster():
    """`ray start --head` on free loopback ports in a private temp dir; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="ejs", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    names = ["--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
             "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    ports = dict(zip(names, _free_ports(len(names))))
    dash = ports["--dashboard-port"]
    cmd = [RAY, "start", "--head", "--num-cpus=3", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0",
           f"--object-store-memory={256 * 1024 * 1024}", *(f"{k}={v}" for k, v in ports.items())]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=_cluster_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid
    try:
        rc = proc.wait(timeout=90)
        log.flush()
        assert rc == 0, Path(log.name).read_text()[-3000:]
        address = f"http://127.0.0.1:{dash}"
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 60
        while True:  # the job API answers a few seconds after `ray start` returns
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        yield {"address": address, "temp_dir": temp_dir}
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        try:
            _stop_cluster(pgid, temp_dir)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_bucket(s3_server):
    """A bucket with the corpus (gzipped JSONL) and the bundled MiniLM, written with job-only credentials."""
    import boto3

    from embindex.checkpoints import resolve_model_path

    creds = {"key": "embindex-job-" + secrets.token_hex(4), "secret": "sk-" + secrets.token_hex(16)}
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=creds["key"],
                          aws_secret_access_key=creds["secret"], region_name=S3_REGION)
    bucket = "jobs-" + secrets.token_hex(4)
    client.create_bucket(Bucket=bucket)
    docs = sample_docs(N_DOCS)
    body = gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode())
    client.put_object(Bucket=bucket, Key="corpus/docs-0.jsonl.gz", Body=body)
    model_dir = resolve_model_path("builtin:all-MiniLM-L6-v2")
    for root, _, names in os.walk(model_dir):
        for n in names:
            full = os.path.join(root, n)
            client.upload_file(full, bucket, f"models/minilm/{os.path.relpath(full, model_dir)}")
    return {"bucket": bucket, "endpoint": s3_server["endpoint_url"], "docs": docs, "client": client, **creds}


def _working_dir(root: Path) -> Path:
    """What the job uploads: the entrypoint and the config, nothing else (the package is installed)."""
    wd = root / "wd"
    (wd / "pipelines").mkdir(parents=True)
    (wd / "configs").mkdir()
    for script in ("build_index.py", "reindex_index.py"):
        shutil.copy(REPO / "pipelines" / script, wd / "pipelines" / script)
    shutil.copy(REPO / "configs" / "quickstart.yaml", wd / "configs" / "quickstart.yaml")
    return wd


def _runtime_env(root: Path, bucket: dict) -> Path:
    """cluster/runtime_env.yaml plus the test's credentials in env_vars (never on a command line; on a real
    cluster they come from the nodes' role or a Kubernetes Secret instead)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env["env_vars"].update(AWS_ACCESS_KEY_ID=bucket["key"], AWS_SECRET_ACCESS_KEY=bucket["secret"],
                           AWS_REGION=S3_REGION)
    path = root / "runtime_env.yaml"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(env))
    return path


def _overrides(bucket: dict, index_prefix: str, cache_dir: Path) -> list[str]:
    b, ep = bucket["bucket"], bucket["endpoint"]
    sets = [f"source.uri=s3://{b}/corpus/", f"model.path=s3://{b}/models/minilm", f"model.cache_dir={cache_dir}",
            f"index.uri=s3://{b}/{index_prefix}",
            # small and quick on 2 CPUs: the quickstart model and tiers, shorter inputs, fewer quality queries
            "model.max_length=128", "index.quality_sample=100", "resources.cpus_per_actor=1",
            "resources.batch_tokens=8192", "run.progress=false"]
    for section in ("source", "model", "index"):
        sets += [f"{section}.storage.endpoint_url={ep}", f"{section}.storage.region={S3_REGION}"]
    return [a for s in sets for a in ("--set", s)]


def _submit_cmd(head: dict, wd: Path, runtime_env: Path, args: list[str], submission_id: str,
                script: str = "build_index.py") -> list[str]:
    return [RAY, "job", "submit", "--address", head["address"], "--submission-id", submission_id,
            "--working-dir", str(wd), "--runtime-env", str(runtime_env), "--",
            "python", f"pipelines/{script}", "--config", "configs/quickstart.yaml", *args]


def _submit(head: dict, wd: Path, runtime_env: Path, args: list[str], submission_id: str,
            timeout: float = 240, script: str = "build_index.py") -> subprocess.CompletedProcess:
    cmd = _submit_cmd(head, wd, runtime_env, args, submission_id, script)
    return subprocess.run(cmd, env=_cluster_env(), capture_output=True, text=True, timeout=timeout, cwd=wd)


@pytest.fixture(scope="module")
def failing_submission(head_cluster, job_bucket, tmp_path_factory):
    """`ray job submit` of an invalid config, started in the background as soon as the cluster is up, so
    that it runs beside the build job (the test that checks it only waits for it)."""
    root = tmp_path_factory.mktemp("bad-job")
    wd = _working_dir(root)
    runtime_env = _runtime_env(root, job_bucket)
    sid = "embindex-bad-" + secrets.token_hex(3)
    args = _overrides(job_bucket, "indexes/bad", root / "cache") + ["--set", "index.tiers=[]"]
    proc = subprocess.Popen(_submit_cmd(head_cluster, wd, runtime_env, args, sid), env=_cluster_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=wd)
    yield {"sid": sid, "proc": proc}
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_ray_job_submit_build_on_s3(head_cluster, job_bucket, failing_submission, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    import embindex

    wd = _working_dir(tmp_path)
    runtime_env = _runtime_env(tmp_path, job_bucket)
    size = sum(f.stat().st_size for f in wd.rglob("*") if f.is_file())
    assert size < 100_000, size  # far below Ray's 100 MiB working_dir cap: only the entrypoint and config

    t0 = time.monotonic()
    sid = "embindex-build-" + secrets.token_hex(3)
    proc = _submit(head_cluster, wd, runtime_env, _overrides(job_bucket, "indexes/docs", tmp_path / "cache"), sid)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    client = JobSubmissionClient(head_cluster["address"])
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    info = client.get_job_info(sid)
    assert info.entrypoint.startswith("python pipelines/build_index.py --config configs/quickstart.yaml")
    logs = client.get_job_logs(sid)
    bucket = job_bucket["bucket"]
    assert f"published v000001 at s3://{bucket}/indexes/docs" in logs, logs[-3000:]
    assert f"rows in {N_DOCS}: indexed {N_DOCS}, rejected 0" in logs
    assert f"[embindex] {N_DOCS} rows in 1 jsonl file(s)" in logs  # the build's own progress lines come back
    assert "Progress bars disabled" not in logs  # Ray Data's hint about the progress setting embindex makes
    for blob in (logs, out):  # credentials are never printed
        assert job_bucket["secret"] not in blob and job_bucket["key"] not in blob

    # the published index is in the bucket and searchable from there
    storage = {"endpoint_url": job_bucket["endpoint"], "key": job_bucket["key"], "secret": job_bucket["secret"],
               "region": S3_REGION}
    from embindex.checkpoints import resolve_model_path

    reader = embindex.open_index(f"s3://{bucket}/indexes/docs", storage=storage,
                                 model_path=resolve_model_path("builtin:all-MiniLM-L6-v2"))
    docs = job_bucket["docs"]
    for tier in (64, 384):
        hits = reader.search([docs[3]["text"], docs[70]["text"]], k=5, tier=tier)
        assert [h[0].id for h in hits] == [docs[3]["id"], docs[70]["id"]]
    manifest = json.loads(job_bucket["client"].get_object(
        Bucket=bucket, Key="indexes/docs/versions/v000001/manifest.json")["Body"].read())
    assert manifest["counts"]["documents"] == N_DOCS and manifest["model"]["path"].startswith("s3://")
    assert job_bucket["secret"] not in json.dumps(manifest)
    print(f"job {sid}: submit-to-exit {elapsed:.1f}s")

    # the nightly pipeline: ten new documents, then the reindex entrypoint embeds only those
    new = [{"id": f"new-{i}", "text": f"Nightly addition {i}: how to rotate log files with logging.handlers."}
           for i in range(10)]
    job_bucket["client"].put_object(Bucket=bucket, Key="corpus/day2.jsonl",
                                    Body="".join(json.dumps(d) + "\n" for d in new).encode())
    sid = "embindex-reindex-" + secrets.token_hex(3)
    proc = _submit(head_cluster, wd, runtime_env, _overrides(job_bucket, "indexes/docs", tmp_path / "cache"), sid,
                   script="reindex_index.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    logs = client.get_job_logs(sid)
    assert f"published v000002 at s3://{bucket}/indexes/docs" in logs, logs[-3000:]
    assert "'added': 10, 'changed': 0, 'deleted': 0" in logs
    reader = embindex.open_index(f"s3://{bucket}/indexes/docs", storage=storage,
                                 model_path=resolve_model_path("builtin:all-MiniLM-L6-v2"))
    assert reader.manifest.parent == "v000001" and reader.manifest.delta["documents_embedded"] == 10
    assert reader.search(new[4]["text"], k=1)[0][0].id == "new-4"


def test_ray_job_submit_failure_comes_back(head_cluster, job_bucket, failing_submission):
    """An invalid config fails the job before any worker starts; status and the error come back."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sid, proc = failing_submission["sid"], failing_submission["proc"]
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stdout[-3000:]  # `ray job submit` exits 1 when the job fails
    assert "failed" in stdout + stderr
    client = JobSubmissionClient(head_cluster["address"])
    assert client.get_job_status(sid) == JobStatus.FAILED
    logs = client.get_job_logs(sid)
    assert "index.tiers needs at least one tier" in logs, logs[-3000:]
    assert "failed with exit code 1" in (client.get_job_info(sid).message or "")
    keys = job_bucket["client"].list_objects_v2(Bucket=job_bucket["bucket"], Prefix="indexes/bad/")
    assert keys.get("KeyCount", 0) == 0  # nothing published
