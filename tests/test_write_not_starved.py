"""The write stage commits fragments while the embed stage runs, even when the read stage is held back by
backpressure for the whole run and the embed actor leaves one CPU for tasks (at 10M rows in 160
fragments the write tasks once waited until the last read was scheduled: 38 minutes with nothing
committed, nothing a resume could keep)."""

from __future__ import annotations

import json
import re

import pytest

import embindex
from conftest import job_config, sample_docs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_fragments_are_committed_while_embedding_goes_on(ray_cluster, tmp_path):
    import ray.data

    docs = sample_docs(400)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    # a small object store budget: the read stage is throttled to the embed stage's pace throughout
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=4 * 2**20)
    events: list[tuple[str, int]] = []

    def log(msg: str) -> None:
        m = re.search(r"embedded (\d+)/", msg)
        if m:
            events.append(("embedded", int(m.group(1))))
        elif "rows written this pass" in msg:
            events.append(("written", int(msg.split()[1])))

    try:
        cfg = job_config(str(corpus), str(tmp_path / "idx"), source={"fragment_bytes": corpus.stat().st_size // 40},
                         resources={"cpus_per_actor": 2}, run={"progress_seconds": 0.2})
        result = embindex.build(cfg, log=log)
    finally:
        ctx.execution_options.resource_limits = limits
    assert result.counts["documents"] == 400 and result.manifest.fragments["total"] >= 35
    embedded_before_first_write = max((n for kind, n in events[:next(
        i for i, (kind, _) in enumerate(events) if kind == "written")] if kind == "embedded"), default=0)
    assert embedded_before_first_write < 200, events[:60]  # not after the last fragment was read
