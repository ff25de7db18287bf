"""Build progress through Ray's GCS key-value store: actor-side sinks, the driver-side reporter."""

from __future__ import annotations

import time

import ray
from ray.experimental import internal_kv

from embindex.embed.progress import NAMESPACE, ProgressReporter, ProgressSink, read_progress


@ray.remote(num_cpus=0)
def _embed_somewhere(prefix: str, rows: int) -> float:
    """A Ray worker reporting like an embed actor: first batch, rows, final flush."""
    sink = ProgressSink(prefix, every=3600)
    sink.started()
    sink.add(rows)  # below the write interval: only flush() writes it
    sink.flush()
    return time.time()


def test_workers_report_rows_and_first_batch_and_the_reporter_cleans_up(ray_cluster):
    lines: list[str] = []
    before = time.time()
    with ProgressReporter(total=100, log=lines.append, every=0.05) as rep:
        assert read_progress(rep.prefix) == (0, None)
        ends = ray.get([_embed_somewhere.remote(rep.prefix, n) for n in (30, 12)])
        assert read_progress(rep.prefix)[0] == 42
        deadline = time.time() + 10
        while not any("embedded 42/100 documents" in line for line in lines) and time.time() < deadline:
            time.sleep(0.05)
    assert any("embedded 42/100 documents" in line for line in lines), lines
    assert rep.first_batch_at is not None and before <= rep.first_batch_at <= max(ends)
    assert read_progress(rep.prefix) == (0, None)  # keys deleted on exit


def test_sink_throttles_writes_and_counts_every_row(ray_cluster):
    prefix = "test-throttle"
    sink = ProgressSink(prefix, every=3600)
    sink.add(5)
    sink.add(6)
    assert read_progress(prefix)[0] == 0  # nothing written yet inside the interval
    sink.flush()
    assert read_progress(prefix) == (11, None)  # no first batch recorded by this sink
    fast = ProgressSink(prefix, every=0)
    fast.add(4)
    assert read_progress(prefix)[0] == 15
    internal_kv._internal_kv_del(prefix + "/", del_by_prefix=True, namespace=NAMESPACE)
