"""Failures of a run: which ones another attempt can fix (lost workers, storage I/O) and which fail at once
with one readable line (what the code or the data raised)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import job_config, sample_docs
from embindex.ray_runtime import classify_failure

pytestmark = [pytest.mark.timeout(300)]


def _failure_of(ds):
    try:
        list(ds.iter_rows())
    except BaseException as e:  # noqa: BLE001 - the exception Ray Data raises is what is classified
        return classify_failure(e)
    raise AssertionError("the dataset did not fail")


def _raise(exc):
    def fn(batch):
        raise exc
    return fn


def test_ray_data_failures_are_classified(ray_cluster):
    import ray.data

    class BrokenActor:  # defined here: pickled by value (workers cannot import this test module)
        def __init__(self):
            raise NotImplementedError("this family has no multi-vector output")

        def __call__(self, batch):
            return batch

    ds = ray.data.range(4)
    bad = _failure_of(ds.map_batches(_raise(ValueError("tensor a (7) must match tensor b (8)"))))
    assert not bad.retryable and bad.message == "ValueError: tensor a (7) must match tensor b (8)"
    io = _failure_of(ds.map_batches(_raise(ConnectionResetError("peer reset"))))
    assert io.retryable and io.message.startswith("ConnectionResetError: peer reset")
    ctor = _failure_of(ds.map_batches(BrokenActor, compute=ray.data.ActorPoolStrategy(size=1)))
    assert not ctor.retryable and ctor.message == "NotImplementedError: this family has no multi-vector output"
    assert classify_failure(OSError("SlowDown")).retryable


def test_a_deterministic_error_fails_the_build_once_with_one_line(ray_cluster, tmp_path, minilm_path):
    """A checkpoint whose weights are cut short passes the driver's checks but fails in every embed actor:
    one attempt, exit code 1, nothing published, and one readable line: no traceback of Ray's (the raylet's
    report of each task pending on an actor whose constructor raised, on stdout) and no Ray Data narrative
    of the failure. The CLI runs as its own process, so everything it writes to fd 1 and 2 is seen."""
    import subprocess
    import sys

    import ray

    broken = tmp_path / "minilm"
    shutil.copytree(minilm_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in sample_docs(20)))
    cfg = job_config(str(corpus), str(tmp_path / "ix"), model={"path": str(broken)}, run={"max_attempts": 3})
    (tmp_path / "job.yaml").write_text(json.dumps(cfg))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = subprocess.run([sys.executable, "-m", "embindex.cli", "build", str(tmp_path / "job.yaml")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "embedding failed" in errors[0] and "SafetensorError" in errors[0], out.stderr
    assert "retrying the uncommitted" not in out.stderr  # one attempt
    assert "Traceback" not in out.stdout + out.stderr
    others = [line for line in out.stderr.splitlines() if not line.startswith(("[embindex]", "error:"))
              and "\tINFO " not in line  # Ray's "Connecting to existing Ray cluster" and "Connected"
              and "has constructor arguments in the object store" not in line]  # README: upstream, harmless
    assert not others, others
    assert not os.path.exists(tmp_path / "ix" / "_latest")


def test_cli_build_joins_the_cluster_named_by_ray_address(ray_cluster, tmp_path):
    """Inside `ray job submit` the CLI finds $RAY_ADDRESS: it joins that cluster (asking it for no CPUs of its
    own) instead of failing to start a local Ray with num_cpus."""
    import subprocess
    import sys

    import ray

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in sample_docs(20)))
    (tmp_path / "job.yaml").write_text(json.dumps(job_config(str(corpus), str(tmp_path / "ix"),
                                                             resources={"num_cpus": 64})))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = subprocess.run([sys.executable, "-m", "embindex.cli", "build", str(tmp_path / "job.yaml"), "-q"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "published v000001" in out.stdout and (tmp_path / "ix" / "_latest").exists()


def test_accelerator_gpu_asks_for_gpus_on_a_cluster_without_them(ray_cluster, tmp_path):
    """`accelerator: gpu` on a CPU-only cluster: the embed actor waits for a GPU (a demand an autoscaler
    serves), it does not fall back to CPU; an actor range maps to an autoscaling pool."""
    import subprocess
    import sys
    import time

    import ray
    from ray._private.state import actors  # the GCS actor table (the state API needs the dashboard)

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in sample_docs(10)))
    cfg = job_config(str(corpus), str(tmp_path / "ix"),
                     resources={"accelerator": "gpu", "actors": {"min": 1, "max": 2}})
    (tmp_path / "job.yaml").write_text(json.dumps(cfg))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, "-m", "embindex.cli", "build", str(tmp_path / "job.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def waiting() -> list[dict]:
            return [a for a in actors().values()
                    if a["State"] == "PENDING_CREATION" and a["ActorClassName"].startswith("MapWorker")]

        deadline = time.time() + 120
        while time.time() < deadline and not waiting():
            time.sleep(0.2)
        assert waiting(), "no embed actor waiting"
        time.sleep(5)  # CPUs are free: a CPU actor would have started (and the 10 documents been embedded)
        assert waiting() and proc.poll() is None
        assert not (tmp_path / "ix" / "_latest").exists()
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert "embed actors: 1..2 x (1 CPU, 1 GPU" in out


@pytest.mark.parametrize("groups,want", [
    ([("gpu-workers", {"CPU": 8, "GPU": 1}, 0, 4)], (1.0, 1.0)),  # a GPU group scaled to zero: ask for a GPU
    ([("cpu-workers", {"CPU": 16}, 0, 10)], (0.0, 15.0)),  # CPU only: the largest node type's cores but one
    ([("gpu-off", {"CPU": 8, "GPU": 1}, 0, 0)], (0.0, None)),  # a node type that can never start: ignored
])
def test_accelerator_auto_reads_the_autoscaler_node_types(ray_cluster, groups, want):
    """`accelerator: auto` on a cluster whose autoscaler can start GPU nodes (none up yet) asks for GPUs; a
    CPU actor is sized from the largest node type, not only the nodes alive now. The node types are the
    cluster config an autoscaler (KubeRay, `ray up`) reports to the GCS, written here as it writes it."""
    import ray
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from embindex.config import ActorResources
    from embindex.ray_runtime import actor_resources

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, lo, hi in groups:
        g = config.node_group_configs.add(name=name, min_count=lo, max_count=hi)
        for k, v in resources.items():
            g.resources[k] = v
    alive_cpus = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    assert ray.cluster_resources().get("GPU", 0) == 0
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                     namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        cpus, gpus, _ = actor_resources(ActorResources(accelerator="auto"))
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    assert gpus == want[0]
    assert cpus == (want[1] if want[1] is not None else max(1.0, alive_cpus - 1))
    assert actor_resources(ActorResources(accelerator="auto"))[1] == 0.0  # config gone: back to what is up
