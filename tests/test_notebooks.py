"""Notebooks in notebooks/ are saved with the outputs of a full run (notebooks/execute.py), and execute top to
bottom again here on smaller inputs, producing their figures and results."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# notebook -> figures (image/png outputs) it must produce; any other notebook in notebooks/ must produce one
EXPECTED_FIGURES = {
    "quickstart.ipynb": 1,
    "matryoshka_tradeoffs.ipynb": 2,   # recall vs width / vs bytes; latency per tier
    "late_chunking.ipynb": 1,          # MRR@10, recall@1, recall@10 per system
    "multivector_maxsim.ipynb": 2,     # token counts per document; candidates vs exact as token_k grows
    "web_pages_readerlm.ipynb": 1,     # characters kept by pre-cleaning; prompt vs generated tokens per page
}
# notebook -> strings its printed output must contain (it did the work, not only drew something)
EXPECTED_TEXT = {
    "quickstart.ipynb": ["published v000001", "bz2.open"],  # built; the compressed-file query finds bz2
    "matryoshka_tradeoffs.ipynb": ["published v000001", "held-out, 100 queries", "sign bits"],
    "late_chunking.ipynb": ["no chunking", "naive chunking", "late chunking", "MRR@10", "text["],
    "multivector_maxsim.ipynb": ["same top-5 ids: True, same scores: True", "token_k  256"],
    "web_pages_readerlm.ipynb": ["5 pages:", "stage fingerprint: sha256:", "of the HTML after pre-cleaning"],
}

# notebook -> environment its kernel runs with: smaller inputs than a reader gets by default. Each notebook
# reads its size from the variable (default: the full size) and the checks above do not depend on it:
# quickstart's first 120 documents hold bz2.open (row 89); the matryoshka notebook keeps its 100 held-out
# queries (not indexed: they come after the indexed slice of its shuffled order); the multivector
# notebook's token_k sweep samples 60 of its documents; the late-chunking notebook indexes 6 long topics
# (with their queries) and 6 distractors.
NOTEBOOK_ENV = {
    "quickstart.ipynb": {"EMBINDEX_NOTEBOOK_DOCS": "120"},              # of 300
    "matryoshka_tradeoffs.ipynb": {"EMBINDEX_NOTEBOOK_DOCS": "150"},    # of 400
    "multivector_maxsim.ipynb": {"EMBINDEX_NOTEBOOK_DOCS": "100"},      # of 300
    "late_chunking.ipynb": {"EMBINDEX_NOTEBOOK_TOPICS": "6"},           # of all (12 + 19 on Python 3.11)
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_notebooks_present():
    assert {p.name for p in NOTEBOOKS} >= set(EXPECTED_FIGURES)


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _check_outputs(name: str, outputs: list) -> str:
    """No error; the figures and the printed results the notebook must produce. Returns the printed text."""
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o.data["image/png"] for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) >= EXPECTED_FIGURES.get(name, 1), f"{name}: expected figures, got {len(pngs)}"
    for png in pngs:
        raw = base64.b64decode(png)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 20_000, "a real figure, not an empty canvas"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for expected in EXPECTED_TEXT.get(name, []):
        assert expected in text, f"{name}: {expected!r} not in its output"
    return text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_with_the_outputs_of_a_full_run(path: Path):
    """What a reader sees without running anything: every code cell ran once, in order, and the saved
    outputs hold the figures and results, without paths of the machine that ran them."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run notebooks/execute.py"
    outputs = _outputs(nb)
    _check_outputs(path.name, outputs)
    saved = json.dumps([o for o in outputs if o.output_type != "display_data"])
    assert str(REPO) not in saved and tempfile.gettempdir() + "/" not in saved


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, tmp_path: Path, ray_cluster):
    """Run in a fresh kernel (this interpreter) from the notebook's folder. The kernel joins the session's
    Ray through $RAY_ADDRESS, as a notebook on a cluster joins it (without it, a notebook starts and
    stops a small local Ray of its own)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # what this run produces, not the saved outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {**NOTEBOOK_ENV.get(path.name, {}), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env_keep = {k: os.environ.get(k) for k in ("MPLBACKEND", *env)}
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        for k, v in env_keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = _outputs(nb)
    text = _check_outputs(path.name, outputs)
    for i, o in enumerate(o for o in outputs if o.output_type == "display_data" and "image/png" in o.data):
        (tmp_path / f"{path.stem}-{i}.png").write_bytes(base64.b64decode(o.data["image/png"]))
    if path.name == "multivector_maxsim.ipynb":  # search over token candidates == brute-force MaxSim, per query
        assert text.count("same top-5 ids: True, same scores: True") == 5
