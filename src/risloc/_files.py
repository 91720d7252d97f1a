"""File helpers shared by the modules that read inputs and write results: the error an input
file raises when risloc refuses it, atomic replacement of a file and strict-JSON cleaning
(TOML lives in :mod:`risloc._toml`).

Atomic writes go through a temporary file ``.<name>.<random>.tmp`` in the destination
folder (:func:`temporary_sibling`) that is renamed onto the destination (``os.replace``)
only when the write completed, and removed in every case, so a reader never sees a
half-written file. Every writer of results, reports, figures, scene files and checkpoints
goes through it.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A new, empty, uniquely named file ``.<name>.<random>.tmp`` in ``path``'s folder, with the
    permissions a new file gets (``0666 & ~umask``; ``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)
class InputError(ValueError):
    """An input that risloc refuses: a file that is not what it should be (not HDF5, truncated,
    a dataset missing, a foreign checkpoint, malformed TOML) or an option out of range.

    The message is one line that names the file (or the option) and what is wrong; the
    ``risloc`` command prints it and exits with status 2. A ``ValueError``, so code that
    catches those keeps working.
    """


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (:func:`temporary_sibling`); on normal exit it
    replaces ``path``. Whatever happens, the temporary file does not survive the block.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
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


def require_folder(path: str | os.PathLike, flag: str = "") -> None:
    """FileNotFoundError when the folder an output file ``path`` goes into does not exist (checked
    before any work, so that a run is not lost at its end); ``flag`` names the option it came from."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}folder {folder} does not exist (for {path})")


def refuse_overwriting(out: str | os.PathLike, inputs: dict[str, str | os.PathLike], *, flag: str = "--out") -> None:
    """ValueError when the output path ``out`` is one of the command's input files (``inputs``:
    what each is called -> its path), which the atomic replacement would otherwise destroy."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if Path(path).resolve() == target:
            raise ValueError(f"{flag} {out} is the {what} itself: writing it would replace the {what}; choose another file")


def nan_to_none(o: Any) -> Any:
    """NaN/inf floats -> None, recursively through dicts and lists (for strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [nan_to_none(v) for v in o]
    return o
