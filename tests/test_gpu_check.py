"""benchmarks/gpu_check.py (the one-shot GPU check) runs end to end without a GPU: `--device cpu --quick`.

The dry run goes through a subprocess, which starts its own Ray if a section needs one (never the session's).
To stay near a minute on 2 cores it runs a representative subset of the sections: `oom` (the Embedder's
out-of-memory recovery on a v3-layout checkpoint written by benchmarks/model_speed.py, against a simulated OOM),
`faiss` (embindex's IVF-PQ training; the GPU half recorded as skipped) and `stages` (benchmarks/stages.py's
generator tokens/s, or skipped when that module is absent). The other sections (`goldens`, `build`, `throughput`)
take minutes on this CPU; run them all with `GPU_CHECK_ARGS="--device cpu --quick" bash benchmarks/gpu_check.sh DIR`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SUBSET = ["oom", "faiss", "stages"]

pytestmark = [pytest.mark.timeout(600)]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # its own Ray, not the test session's
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_cpu_quick_dry_run_of_a_section_subset(tmp_path):
    out = tmp_path / "report"
    proc = _run(["--device", "cpu", "--quick", "--out", str(out), "--sections", ",".join(SUBSET)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["result"] == "OK" and report["device"] == "cpu" and report["quick"] is True
    sections = report["sections"]
    assert list(sections) == SUBSET
    for name, s in sections.items():
        assert s["status"] in ("ok", "skipped"), (name, s)
        assert isinstance(s["seconds"], (int, float))
        assert s["status"] == "ok" or s.get("reason"), (name, s)
    # what the CPU can prove of the CUDA-only sections is recorded, with why the rest was skipped
    oom = sections["oom"]
    assert oom["status"] == "skipped" and "no CUDA" in oom["reason"]
    assert oom["result"]["problems"] == [] and oom["result"]["ooms"] >= 1
    assert list(oom["result"]["rejects"]) == [str(32)]  # only the row that does not fit alone
    assert oom["result"]["normal_rows_embedded"] == "32/32"
    assert sections["faiss"]["status"] == "skipped" and "no CUDA" in sections["faiss"]["reason"]
    md = (out / "report.md").read_text()
    for name in SUBSET:
        assert f"## {name}: " in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_default_device_fails_fast(tmp_path):
    proc = _run(["--out", str(tmp_path)], timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert json.loads((tmp_path / "report.json").read_text())["result"].startswith("FAILED: no CUDA device")


def test_wrapper_needs_an_artifact_dir():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_padded_flops_counts_the_batches_the_embedder_cuts():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # budget 8 tokens: [4, 4] padded to 4 (8 tokens), then [2, 1] padded to 2 (4 tokens)
    fl = gpu_check.padded_flops([4, 2, 4, 1], 8, linear_per_token=10.0, attn_per_token_per_len=1.0)
    assert fl["real_tokens"] == 11 and fl["padded_tokens"] == 12
    assert fl["padding_share"] == pytest.approx(1 / 12)
    assert fl["flops"] == 2 * 4 * (10 + 4) + 2 * 2 * (10 + 2)
