"""Ray job entrypoint: incremental re-index (embed only new or changed documents, publish a new version).

    ray job submit --working-dir . -- python pipelines/reindex_index.py --config configs/quickstart.yaml \
        --set index.uri=s3://bucket/indexes/docs

Scheduled nightly by cluster/reindex-cronjob.yaml. The first run (no published version) is a full build.
"""

from __future__ import annotations

import sys

from build_index import main

if __name__ == "__main__":
    sys.exit(main(mode="reindex"))
