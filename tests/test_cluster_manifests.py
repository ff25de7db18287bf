"""cluster/: every manifest parses and has what a cluster needs (images, GPUs, autoscaling, entrypoints)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from embindex.config import load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path
    return docs


def _k8s_objects() -> list[tuple[str, dict]]:
    """(file name, object) for every Kubernetes object, including RayJobs kept in ConfigMaps."""
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            if "apiVersion" not in doc:
                continue
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        out += [(f"{path.name}:{key}", d) for d in yaml.safe_load_all(text) if d]
    return out


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(n, o) for n, o in _k8s_objects() if o["kind"] == kind]


def _dockerfile() -> dict:
    text = (CLUSTER / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    workdirs = [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")]
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    copies = [ln.split()[-2:] for ln in lines if ln.startswith("COPY ")]
    return {"text": text, "from": froms, "workdir": workdirs[-1], "runs": runs, "copies": copies}


def _image() -> str:
    """The one worker image every Ray pod and node runs (the head container of raycluster.yaml)."""
    (_, rc), = _of_kind("RayCluster")
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(n, o["spec"]) for n, o in _of_kind("RayCluster")]
    specs += [(n, o["spec"]["rayClusterSpec"]) for n, o in _of_kind("RayJob") if "rayClusterSpec" in o["spec"]]
    return specs


def test_every_manifest_parses():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-build.yaml", "reindex-cronjob.yaml", "ray-up.yaml",
            "runtime_env.yaml"} <= names
    for path in MANIFESTS:
        _docs(path)
    kinds = {o["kind"] for _, o in _k8s_objects()}
    assert {"RayCluster", "RayJob", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for name, obj in _k8s_objects():
        assert obj["apiVersion"] and (obj["metadata"].get("name") or obj["metadata"].get("generateName")), name
        if obj["kind"] in ("RayCluster", "RayJob"):
            assert obj["apiVersion"] == "ray.io/v1", name
    assert "Dockerfile" in {p.name for p in CLUSTER.iterdir()} and (CLUSTER / "README.md").exists()


def test_dockerfile_base_and_install():
    import ray

    df = _dockerfile()
    (base,) = df["from"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert m, f"base image {base!r} is not a Ray GPU image"
    assert m.group(1) == ray.__version__, "the image's Ray must be the Ray embindex is developed against"
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (int(m.group(2)), int(m.group(3))) >= tuple(int(x) for x in py["requires-python"][2:].split("."))
    install = [r for r in df["runs"] if "pip install" in r]
    assert install and re.search(r"pip install [^&]*embindex[^&]*\[[^\]]*\bgpu\b", install[0]), install
    assert "gpu" in py["optional-dependencies"]
    assert "constraints.txt" not in df["text"].split("# ")[0]  # the CPU torch pin stays off the GPU image
    copied = {dest.rstrip("/").split("/")[-1] for _, dest in df["copies"]}
    assert {"pipelines", "configs"} <= copied, df["copies"]
    for src, _ in df["copies"]:
        assert (REPO / src).exists(), src


def test_ray_versions_and_images_are_consistent():
    import ray

    image = _image()
    assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image) and not image.endswith(":latest")
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                assert c["image"] == image, (name, c["name"])
    for name, job in _of_kind("RayJob"):
        for c in job["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
            assert c["image"] == image, name
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert ray_up["docker"]["image"] == image


def test_gpu_worker_groups_and_autoscaling():
    for name, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", name
        ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert {6379, 8265} <= ports, name  # GCS and the job API
        assert spec.get("enableInTreeAutoscaling") is True, name
        gpu_groups = []
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1, g["groupName"]
            (c,) = g["template"]["spec"]["containers"]
            res = c["resources"]
            assert res["limits"]["cpu"] and res["limits"]["memory"], g["groupName"]
            gpus = res["limits"].get("nvidia.com/gpu")
            if gpus:
                gpu_groups.append(g)
                assert int(gpus) >= 1 and res["requests"].get("nvidia.com/gpu") == gpus
                tol = g["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tol), "GPU nodes are usually tainted"
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/dev/shm" in mounts, "the object store needs a memory-backed /dev/shm"
        assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
        # every pod gets S3 credentials from a Secret, never inline
        for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            env = {e["name"]: e for e in pod["spec"]["containers"][0].get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"], name


def _entrypoint_args(entrypoint: str) -> tuple[str, dict]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1] in ("pipelines/build_index.py", "pipelines/reindex_index.py"), argv
    assert (REPO / argv[1]).exists()
    config, sets, i = None, {}, 2
    while i < len(argv):
        if argv[i] == "--config":
            config = argv[i + 1]
        elif argv[i] == "--set":
            k, v = parse_override(argv[i + 1])
            sets[k] = v
        else:
            raise AssertionError(f"unknown argument {argv[i]!r} of {argv[1]}")
        i += 2
    assert config and config.startswith("configs/") and (REPO / config).exists(), config
    return config, sets


@pytest.mark.parametrize("name,job", _of_kind("RayJob"), ids=lambda x: x if isinstance(x, str) else "")
def test_rayjob_entrypoint_and_runtime_env(name, job):
    spec = job["spec"]
    config, sets = _entrypoint_args(spec["entrypoint"])
    cfg = load_config(REPO / config, sets)  # the job's config validates with its overrides
    assert cfg.source.uri.startswith("s3://") and cfg.index.uri.startswith("s3://")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})  # Ray accepts the fields
    assert env["working_dir"] == _dockerfile()["workdir"], "the image's copy of pipelines/ and configs/"
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    assert spec.get("activeDeadlineSeconds", 0) > 0
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a job gets its own cluster or a named one"
    if "clusterSelector" in spec:
        clusters = {o["metadata"]["name"] for _, o in _of_kind("RayCluster")}
        assert spec["clusterSelector"]["ray.io/cluster"] in clusters
        assert not spec.get("shutdownAfterJobFinishes"), "never shut down a shared cluster"
    else:
        assert spec["shutdownAfterJobFinishes"] is True
        gpu_max = sum(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"))
        assert cfg.resources.actors <= gpu_max, "more actors than GPUs the job's cluster can get"


_CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _valid_cron(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5:
        return False
    for f, (lo, hi) in zip(fields, _CRON_RANGES):
        if not re.fullmatch(_CRON_FIELD, f):
            return False
        if any(not lo <= int(n) <= hi for n in re.findall(r"(?<![/\d])\d+", f)):
            return False
    return True


def test_cron_syntax_checker():
    assert _valid_cron("30 2 * * *") and _valid_cron("*/15 0-6 1,15 * 1-5")
    assert not _valid_cron("61 2 * * *") and not _valid_cron("0 2 * *") and not _valid_cron("@daily x")


def test_nightly_reindex_cronjob():
    (_, cron), = _of_kind("CronJob")
    spec = cron["spec"]
    assert _valid_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    # the pod creates the RayJob held in the ConfigMap it mounts, as the ServiceAccount the Role allows
    (c,) = pod["containers"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm_names = {o["metadata"]["name"]: o for _, o in _of_kind("ConfigMap")}
    (vol,) = [n for n in mounts if "configMap" in volumes[n]]
    cm = cm_names[volumes[vol]["configMap"]["name"]]
    (key,) = cm["data"]
    assert f"kubectl create -f {mounts[vol]}/{key}" in script
    nested = yaml.safe_load(cm["data"][key])
    assert nested["kind"] == "RayJob" and nested["metadata"]["generateName"]
    sa = pod["serviceAccountName"]
    assert sa in {o["metadata"]["name"] for _, o in _of_kind("ServiceAccount")}
    (_, binding), = _of_kind("RoleBinding")
    (_, role), = _of_kind("Role")
    assert binding["subjects"][0]["name"] == sa and binding["roleRef"]["name"] == role["metadata"]["name"]
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and {"create", "get"} <= set(rules[0]["verbs"])
    # the nightly schedule runs the incremental reindex
    text = (CLUSTER / "reindex-cronjob.yaml").read_text()
    assert "embindex reindex" in text


def test_ray_up_autoscaler_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    validate_config(cfg)  # Ray's own ray-schema.json
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker node type"
    for t in gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env["env_vars"]), "no credentials in a runtime_env"


def test_no_inline_secrets():
    for path in MANIFESTS:
        text = path.read_text()
        assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S*[A-Za-z0-9/+]{20,}", text), path
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path
