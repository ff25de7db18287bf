"""Ray job entrypoint: export a version of an index to a serving engine, one Ray task per shard.

    ray job submit --working-dir . -- python pipelines/export_index.py s3://bucket/indexes/docs \
        --to postgresql://app@db.internal:5432/search?table=docs --tier 256

Takes the arguments of `embindex export` (see README, "Serve it"). Inside a Ray job the tasks run on the
job's cluster (RAY_ADDRESS is set by Ray); credentials come from the job's environment (PGPASSWORD,
ELASTIC_API_KEY, AWS_*), not from the command line, so they stay out of the job's recorded entrypoint.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embindex.cli import app

    args = list(sys.argv[1:] if argv is None else argv)
    try:  # not standalone: an error comes back as its exit code (1, message printed) instead of exiting
        code = app(["export", *args, "--ray"], standalone_mode=False)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    return int(code) if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
