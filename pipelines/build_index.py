"""Ray job entrypoint: build an index from a job config.

    ray job submit --working-dir . -- python pipelines/build_index.py --config configs/quickstart.yaml \
        --set index.uri=s3://bucket/indexes/docs

Inside a Ray job, `ray.init()` connects to the job's cluster (RAY_ADDRESS is set by Ray).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None, mode: str = "build") -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job (or retrieve) config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import embindex
    from embindex.config import parse_override

    overrides = dict(parse_override(s) for s in args.set)
    if os.environ.get("RAY_ADDRESS") and "resources.ray_address" not in overrides:
        overrides["resources.ray_address"] = "auto"
    if mode == "retrieve":
        from embindex.retrieve.job import retrieve

        result = retrieve(args.config, overrides)
        print(f"{result.queries} queries ({result.rejected} rejected) -> {result.output}", flush=True)
        if result.metrics:
            print(result.table(), flush=True)
        return 0
    if mode == "reindex":
        from embindex.reindex import reindex

        result = reindex(args.config, overrides)
    else:
        result = embindex.build(args.config, overrides)
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
