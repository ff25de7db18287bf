"""Ray job entrypoint: run `embindex retrieve` (queries -> search -> rerank -> results and metrics).

    ray job submit --working-dir . -- python pipelines/retrieve_index.py --config configs/retrieve-quickstart.yaml \
        --set output=s3://bucket/retrieval/run1

Inside a Ray job, `ray.init()` connects to the job's cluster (RAY_ADDRESS is set by Ray).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="retrieve config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embindex.config import parse_override
    from embindex.retrieve.job import retrieve

    overrides = dict(parse_override(s) for s in args.set)
    if os.environ.get("RAY_ADDRESS") and "resources.ray_address" not in overrides:
        overrides["resources.ray_address"] = "auto"
    result = retrieve(args.config, overrides)
    print(f"{result.queries} queries ({result.rejected} rejected) -> {result.output}", flush=True)
    if result.metrics:
        print(result.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
