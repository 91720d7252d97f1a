"""File helpers shared by the modules that read inputs and write results: the error an input
file raises when risloc refuses it, TOML reading, atomic replacement of a file and strict-JSON
cleaning.

Atomic writes go through a temporary name ``.<name>.tmp<pid>`` in the destination folder
that is renamed onto the destination (``os.replace``) only when the write completed, and
removed in every case, so a reader never sees a half-written file.
"""

from __future__ import annotations

import math
import os
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """An input that risloc refuses: a file that is not what it should be (not HDF5, truncated,
    a dataset missing, a foreign checkpoint, malformed TOML) or an option out of range.

    The message is one line that names the file (or the option) and what is wrong; the
    ``risloc`` command prints it and exits with status 2. A ``ValueError``, so code that
    catches those keeps working.
    """


def read_toml(path: str | os.PathLike) -> dict:
    """The table of a TOML file; :class:`InputError` naming the file and the line if it is not TOML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TOML file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid TOML (not UTF-8 text: {exc.reason} at byte {exc.start})") from None


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
