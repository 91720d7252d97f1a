"""File-writing helpers shared by the modules that write results: atomic replacement of a
file and strict-JSON cleaning.

Atomic writes go through a temporary name ``.<name>.tmp<pid>`` in the destination folder
that is renamed onto the destination (``os.replace``) only when the write completed, and
removed in every case, so a reader never sees a half-written file.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``.

    Whatever happens, the temporary file does not survive the block.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def nan_to_none(o: Any) -> Any:
    """NaN/inf floats -> None, recursively through dicts and lists (for strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [nan_to_none(v) for v in o]
    return o
