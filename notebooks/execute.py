"""Run the notebooks top to bottom and save them with their outputs (what a reader sees on GitHub).

    .venv/bin/python notebooks/execute.py                 # every notebook, at the sizes a reader gets
    .venv/bin/python notebooks/execute.py quickstart.ipynb

Each notebook runs in a fresh kernel from this folder, as `jupyter nbconvert --execute --inplace` would,
and starts (and stops) its own small local Ray unless $RAY_ADDRESS names a cluster. The saved outputs
carry no path of the machine that ran them: temporary folders print as `<tmp>/...`. The test suite
(tests/test_notebooks.py) checks the saved outputs and runs every notebook again on smaller inputs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# stderr lines of the environment, not of the notebook: Jupyter without ipywidgets (tqdm, Ray's hint),
# and Ray core's line about Ray Data's map actors (ray-project/ray#57733); dropped from the saved copy
NOISE = (re.compile(r"TqdmWarning: IProgress not found|from \.autonotebook import tqdm"),
         re.compile(r"Missing packages: \['ipywidgets'\]"),
         re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"))


def scrub(text: str) -> str:
    """Machine paths in an output -> placeholders: the repository root and the temporary directory."""
    text = text.replace(str(ROOT), "<repo>")
    tmp = re.escape(tempfile.gettempdir().rstrip("/"))
    return re.sub(tmp + r"/[^\s'\"]*", lambda m: "<tmp>/" + m.group(0).rsplit("/", 1)[-1], text)


def execute(path: Path, timeout: int = 1800) -> None:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        cell.metadata.pop("execution", None)
        for out in cell.outputs:
            if out.get("output_type") == "stream":
                lines = out["text"].splitlines(keepends=True)
                if out.get("name") == "stderr":
                    lines = [x for x in lines if not any(p.search(x) for p in NOISE)]
                out["text"] = scrub("".join(lines))
            elif "text/plain" in out.get("data", {}):
                out["data"]["text/plain"] = scrub(out["data"]["text/plain"])
        cell.outputs = [o for o in cell.outputs if o.get("output_type") != "stream" or o["text"]]
    nbformat.write(nb, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook file names (default: all in notebooks/)")
    args = ap.parse_args()
    paths = [HERE / n for n in args.names] if args.names else sorted(HERE.glob("*.ipynb"))
    for p in paths:
        print(f"executing {p.name}", file=sys.stderr, flush=True)
        execute(p)


if __name__ == "__main__":
    main()
