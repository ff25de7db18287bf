"""Device failures end to end: a real `embindex.build` whose embed actors run out of memory on long
batches and get NaN outputs for some documents (`embed/faults.py` switches) still publishes, with those
documents as rejects and every other one searchable.

The build runs in a subprocess with the switches in its environment: it starts its own local Ray (the
session cluster's workers would not see them), whose workers inherit that environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embindex
from conftest import SESSION_WORKERS_KEPT, job_config, sample_docs
from embindex.embed.faults import NAN_ENV, OOM_ENV
from embindex.models import ModelSpec, load_family
from embindex.sources.normalize import Reasons

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OOM_ABOVE = 100  # tokens; MiniLM truncates at 128, so the longest documents cannot fit even alone
BUILD = "import json, sys, embindex; r = embindex.build(json.loads(sys.argv[1]), log=None); print(json.dumps(r.counts))"


def test_build_rejects_what_the_device_cannot_embed(tmp_path, minilm_path):
    docs = sample_docs(30)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok = load_family(ModelSpec(name="hf-encoder", path=minilm_path, dtype="float32", max_length=128)).load_tokenizer()
    n_tokens = dict(zip((d["id"] for d in docs), map(len, tok([d["text"] for d in docs], "document"))))
    too_large = {i for i, n in n_tokens.items() if n > OOM_ABOVE}
    nan_ids = [i for i, n in n_tokens.items() if n <= OOM_ABOVE][1:3]
    assert 3 <= len(too_large) <= 20

    index_uri = str(tmp_path / "index")
    cfg = job_config(str(corpus), index_uri)
    env = {**os.environ, OOM_ENV: str(OOM_ABOVE), NAN_ENV: ",".join(nan_ids), "RAY_ADDRESS": "local",
           "RAY_num_workers_soft_limit": str(SESSION_WORKERS_KEPT)}  # idle workers kept, as in conftest
    run = subprocess.run([sys.executable, "-c", BUILD, json.dumps(cfg)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert counts["rows_in"] == 30 == counts["documents"] + counts["rejected"]
    assert counts["rejected"] == len(too_large) + 2

    reader = embindex.open_index(index_uri)  # published
    rejects = pa.concat_tables([pq.read_table(os.path.join(index_uri, r.path)) for r in reader.manifest.rejects])
    reasons = dict(zip(rejects.column("id").to_pylist(), rejects.column("reject").to_pylist()))
    assert reasons == {**{i: Reasons.TOO_LARGE_FOR_DEVICE for i in too_large},
                       **{i: Reasons.NON_FINITE for i in nan_ids}}
    details = dict(zip(rejects.column("id").to_pylist(), rejects.column("reject_detail").to_pylist()))
    assert all(f"{n_tokens[i]} tokens" in details[i] and "float32" in details[i] for i in too_large)

    kept = [d for d in docs if d["id"] not in reasons]
    assert sorted(reader.ids) == sorted(d["id"] for d in kept) and np.isfinite(reader.vectors).all()
    hits = reader.search([d["text"] for d in kept], k=1, tier=384)
    assert [h[0].id for h in hits] == [d["id"] for d in kept]
