"""Progress messages of the driver: a `Log` is any callable taking one line (None: silent)."""

from __future__ import annotations

import sys
from typing import Callable

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    """The default log of the CLI and library entry points: one line to stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)
