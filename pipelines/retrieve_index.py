"""Ray job entrypoint: run `embindex retrieve` (queries -> search -> rerank -> results and metrics).

    ray job submit --working-dir . -- python pipelines/retrieve_index.py --config configs/retrieve-quickstart.yaml \
        --set output=s3://bucket/retrieval/run1

Inside a Ray job, `ray.init()` connects to the job's cluster (RAY_ADDRESS is set by Ray).
"""

from __future__ import annotations

import sys

from build_index import main as run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, mode="retrieve")


if __name__ == "__main__":
    sys.exit(main())
