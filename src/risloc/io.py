"""Scene and estimates files: HDF5 exactly per docs/scene-files.md (format version 1).

Layout of a scene file (S scenes; L snapshots, M BS antennas, N RIS elements, K_max)::

    attrs: format = "risloc-scenes", version = 1, scenario = <JSON of every Scenario field>
    y [S, L, M] complex64     H [S, M, N] complex64     codes [S, L, N] complex64
    snr_db [S] float32 (optional)
    truth/ (optional): K [S] int32; phi, theta, r, power [S, K_max] float32 (NaN after the
                       first K); noise_var [S] float32; optional H [S, M, N] and codes [S, L, N]
                       complex64 (the true channel and the realised codes, where the root
                       H and codes are what the receiver knows and differ from them)

An estimates file has ``format = "risloc-estimates"``, the same ``version`` and ``scenario``,
a root attribute ``method`` and ``est/K`` [S] int32, ``est/phi``, ``est/theta``, ``est/r``
[S, K_max] float32 (NaN after the first K-hat).

Complex numbers are the HDF5 compound ``{r, i}`` that h5py writes for numpy complex64.
Datasets are chunked along the scene axis and resizable, so files of 10^6 scenes are
written and read chunk by chunk.

A CRB file (``risloc crb``, :func:`crb_file`, :func:`load_crb`) carries the scene file's
``format``, ``version`` and ``scenario`` attributes plus ``content = "crb"``, ``signal`` and
``scenes``, and ``crb/phi``, ``crb/theta``, ``crb/r`` [S, K_max] float32 (sqrt(CRB) in rad / m,
NaN padded, inf where unidentifiable) and ``crb/regular`` [S] int8.

Writers (:class:`ScenesWriter`, :func:`save_scenes`, :func:`save_estimates`) write to a
temporary name in the destination folder and rename on success; after an exception the
temporary file is deleted, so no truncated file ever carries the final name.

Readers validate first (:func:`validate_scenes_file`, :func:`validate_estimates_file`),
streaming through the file, and refuse with a ``ValueError`` that names the dataset and,
where it applies, the scene index.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from ._files import InputError, atomic_path, require_folder, temporary_sibling
from .crb import POSITION_PARAMS, CRBResult, crb_for_scenes
from .scenario import SIGNAL_MODELS, Scenario
from .scenes import Estimates, Scenes, Truth

SCENES_FORMAT = "risloc-scenes"
ESTIMATES_FORMAT = "risloc-estimates"
VERSION = 1

INPUTS = ("y", "H", "codes")
TRUTH_PER_SOURCE = ("phi", "theta", "r", "power")
TRUTH_INPUTS = ("H", "codes")
"""Optional truth datasets ``truth/H`` and ``truth/codes``, shaped like the root inputs of the same name."""
EST_PER_SOURCE = ("phi", "theta", "r")

CHUNK_BYTES = 1 << 20
"""Target size of one HDF5 chunk (scenes per chunk = CHUNK_BYTES / bytes per scene of the dataset)."""

READ_CHUNK = 4096
"""Scenes per read when validating or streaming."""


# ------------------------------------------------------------------------------------------------
# Expected layout
# ------------------------------------------------------------------------------------------------
def _input_shapes(sc: Scenario) -> dict[str, tuple[int, ...]]:
    """Per-scene shape of each input dataset."""
    return {"y": (sc.snapshots, sc.m_bs), "H": (sc.m_bs, sc.n_elements), "codes": (sc.snapshots, sc.n_elements)}


def _rows_per_chunk(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Scenes per HDF5 chunk: the largest power of two that keeps a chunk within CHUNK_BYTES
    (powers of two keep writes of RNG-block-aligned chunks aligned to HDF5 chunks)."""
    rows = max(1, CHUNK_BYTES // max(1, itemsize * math.prod(row_shape)))
    return 1 << (rows.bit_length() - 1)


@dataclass
class FileInfo:
    """What validation learnt about a file: its scenario, scene count and optional parts."""

    path: Path
    scenario: Scenario
    n_scenes: int
    has_snr: bool = False
    has_truth: bool = False
    method: str = ""
    truth_inputs: tuple[str, ...] = ()
    """Which of the optional ``truth/H``, ``truth/codes`` the file has (names of :data:`TRUTH_INPUTS`)."""


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------
class _AtomicH5:
    """An HDF5 file opened under a temporary name in the destination folder, renamed on commit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        require_folder(self.path)
        self.tmp = temporary_sibling(self.path)
        try:
            self.file = h5py.File(self.tmp, "w")
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().to("cpu").numpy().astype(dtype, copy=False)


class ScenesWriter:
    """Append :class:`~risloc.scenes.Scenes` chunks to a scene file, atomically.

    >>> with ScenesWriter("scenes.h5", scenario) as w:          # doctest: +SKIP
    ...     for chunk in simulate_chunks(scenario, 10**6, chunk=8192):
    ...         w.write(chunk)

    The file lives under a temporary name (``.<name>.<random>.tmp`` in the same folder)
    until the ``with`` block ends normally; then it is renamed to ``path``. If the block
    raises, the temporary file is deleted and ``path`` is left as it was. Whether
    ``snr_db``, ``truth/`` and the optional ``truth/H``, ``truth/codes`` (``Truth.H``,
    ``Truth.codes`` not None) are written is fixed by the first chunk; later chunks must
    agree (and have the same scenario). ``expected`` (optional) pre-sizes the datasets and caps
    their HDF5 chunks at the power of two at or above it (a chunk is allocated whole; more scenes
    than expected are still written, in those smaller chunks).
    """

    def __init__(self, path: str | os.PathLike, scenario: Scenario | None = None, *, expected: int | None = None):
        self.path = Path(path)
        self.scenario = scenario
        self.expected = expected
        self.n_scenes = 0
        self._h5: _AtomicH5 | None = None
        self._has_snr: bool | None = None
        self._has_truth: bool | None = None
        self._truth_inputs: tuple[str, ...] = ()

    # --- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "ScenesWriter":
        self._h5 = _AtomicH5(self.path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        """Finish the file and give it its final name (writes an empty file if nothing was written)."""
        if self._h5 is None:
            return
        try:
            if self._has_snr is None:  # nothing written: an empty but valid file
                self._create(self.scenario or Scenario(), snr=False, truth=False)
            self._resize(self.n_scenes)
        except BaseException:
            self.abort()
            raise
        self._h5.commit()
        self._h5 = None

    def abort(self) -> None:
        """Drop the temporary file; the final name is not touched."""
        if self._h5 is not None:
            self._h5.abort()
            self._h5 = None

    # --- writing -------------------------------------------------------------------------------
    def _create(self, sc: Scenario, *, snr: bool, truth: bool, truth_inputs: tuple[str, ...] = ()) -> None:
        f = self._h5.file
        f.attrs["format"] = SCENES_FORMAT
        f.attrs["version"] = VERSION
        f.attrs["scenario"] = sc.to_json()
        size = self.expected or 0
        specs = {name: (shape, np.complex64) for name, shape in _input_shapes(sc).items()}
        if snr:
            specs["snr_db"] = ((), np.float32)
        if truth:
            specs["truth/K"] = ((), np.int32)
            specs.update({f"truth/{q}": ((sc.k_max,), np.float32) for q in TRUTH_PER_SOURCE})
            specs["truth/noise_var"] = ((), np.float32)
            specs.update({f"truth/{q}": (_input_shapes(sc)[q], np.complex64) for q in truth_inputs})
        for name, (shape, dtype) in specs.items():
            rows = _rows_per_chunk(shape, np.dtype(dtype).itemsize)
            if size:  # no chunk larger than the file will be: a chunk is allocated whole (1 scene took 8 MB)
                rows = min(rows, 1 << max(0, (size - 1).bit_length()))
            f.create_dataset(name, shape=(size, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(rows, *shape))
        self.scenario, self._has_snr, self._has_truth = sc, snr, truth
        self._truth_inputs = tuple(truth_inputs) if truth else ()

    def _resize(self, n: int) -> None:
        f = self._h5.file

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.shape[0] != n:
                obj.resize(n, axis=0)

        f.visititems(visit)

    def write(self, scenes: Scenes) -> None:
        """Append a chunk of scenes (any device, complex64/128; stored as complex64/float32/int32)."""
        if self._h5 is None:
            raise ValueError("ScenesWriter.write outside its 'with' block (or after close)")
        sc = scenes.scenario
        truth_inputs = tuple(q for q in TRUTH_INPUTS if scenes.truth is not None and getattr(scenes.truth, q) is not None)
        if self._has_snr is None:
            self._create(self.scenario or sc, snr=scenes.snr_db is not None, truth=scenes.truth is not None, truth_inputs=truth_inputs)
        if sc != self.scenario:
            raise ValueError(f"{self.path}: a chunk has a different scenario than the file ({sc} vs {self.scenario})")
        if (scenes.snr_db is not None) != self._has_snr or (scenes.truth is not None) != self._has_truth:
            raise ValueError(f"{self.path}: every chunk must have snr_db/truth if the first one has them, and only then")
        if truth_inputs != self._truth_inputs:
            raise ValueError(
                f"{self.path}: every chunk must have the true H/codes if the first one has them, and only then "
                f"(this chunk: {list(truth_inputs)}, the file: {list(self._truth_inputs)})"
            )
        n, a = len(scenes), self.n_scenes
        if n == 0:
            return
        f = self._h5.file
        if f["y"].shape[0] < a + n:
            self._resize(a + n)
        f["y"][a : a + n] = _np(scenes.y, np.complex64)
        f["H"][a : a + n] = _np(scenes.H, np.complex64)
        f["codes"][a : a + n] = _np(scenes.codes, np.complex64)
        if self._has_snr:
            f["snr_db"][a : a + n] = _np(scenes.snr_db, np.float32)
        if self._has_truth:
            t = scenes.truth
            f["truth/K"][a : a + n] = _np(t.K, np.int32)
            for q in TRUTH_PER_SOURCE:
                f[f"truth/{q}"][a : a + n] = _np(getattr(t, q), np.float32)
            f["truth/noise_var"][a : a + n] = _np(t.noise_var, np.float32)
            for q in self._truth_inputs:
                f[f"truth/{q}"][a : a + n] = _np(getattr(t, q), np.complex64)
        self.n_scenes = a + n


def save_scenes(scenes: Scenes, path: str | os.PathLike) -> None:
    """Write ``scenes`` (inputs, optional snr_db and truth) to ``path`` atomically."""
    with ScenesWriter(path, scenes.scenario, expected=len(scenes)) as w:
        w.write(scenes)


def save_estimates(est: Estimates, path: str | os.PathLike, scenario: Scenario) -> None:
    """Write an estimates file (``est/K``, ``est/phi|theta|r``, attribute ``method``) atomically.

    Position arrays narrower than ``scenario.k_max`` are NaN-padded; wider ones are accepted
    only if the extra columns are all NaN.
    """
    K_max = scenario.k_max
    K = _np(est.K, np.int32)
    if K.ndim != 1:
        raise ValueError(f"est/K: expected shape [S], got {list(K.shape)}")
    S = len(K)
    bad = np.nonzero((K < 0) | (K > K_max))[0]
    if len(bad):
        raise ValueError(f"est/K: scene {bad[0]} has K-hat = {K[bad[0]]}, outside 0..k_max={K_max}")
    arrays = {}
    for q in EST_PER_SOURCE:
        a = _np(getattr(est, q), np.float32)
        if a.ndim != 2 or a.shape[0] != S:
            raise ValueError(f"est/{q}: expected shape [{S}, k], got {list(a.shape)}")
        if a.shape[1] > K_max:
            extra = np.nonzero(~np.isnan(a[:, K_max:]).all(1))[0]
            if len(extra):
                raise ValueError(f"est/{q}: scene {extra[0]} has more than k_max={K_max} positions")
            a = a[:, :K_max]
        elif a.shape[1] < K_max:
            a = np.concatenate([a, np.full((S, K_max - a.shape[1]), np.nan, np.float32)], axis=1)
        arrays[q] = np.ascontiguousarray(a)
    h5 = _AtomicH5(path)
    try:
        f = h5.file
        f.attrs["format"] = ESTIMATES_FORMAT
        f.attrs["version"] = VERSION
        f.attrs["scenario"] = scenario.to_json()
        f.attrs["method"] = est.method or ""
        rows = _rows_per_chunk((K_max,), 4)
        f.create_dataset("est/K", data=K, maxshape=(None,), chunks=(max(1, min(S, rows * K_max)),))
        for q, a in arrays.items():
            f.create_dataset(f"est/{q}", data=a, maxshape=(None, K_max), chunks=(max(1, min(S, rows)), K_max))
    except BaseException:
        h5.abort()
        raise
    h5.commit()


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def open_h5(path: str | os.PathLike, what: str) -> h5py.File:
    """Open the HDF5 file ``path`` (a ``what``, e.g. "scene file") for reading.

    ``FileNotFoundError`` if there is no such file, :class:`InputError` naming the file if it
    is not HDF5 or is truncated (h5py's reason in parentheses)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        text = str(exc)
        reason = text[text.find("(") + 1 : text.rfind(")")] if "(" in text and text.endswith(")") else text
        raise InputError(f"{path}: not a readable {what} (not HDF5, or damaged: {reason})") from None


def _header(f: h5py.File, path: Path, fmt: str) -> Scenario:
    """Check the root attributes and return the scenario."""

    def attr(name):
        if name not in f.attrs:
            raise InputError(f"{path}: root attribute '{name}' is missing (not a {fmt} file)")
        v = f.attrs[name]
        v = v.item() if isinstance(v, np.generic) else v
        return v.decode() if isinstance(v, bytes) else v

    got = attr("format")
    if got != fmt:
        raise InputError(f"{path}: attribute 'format' is {got!r}, expected {fmt!r}")
    version = attr("version")
    try:
        ok = int(version) == VERSION and float(version) == VERSION
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{path}: attribute 'version' is {version!r}; this reader knows version {VERSION}")
    text = attr("scenario")
    try:
        return Scenario.from_json(str(text))
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise InputError(f"{path}: attribute 'scenario' is not a valid scenario: {exc}") from None


def _dataset(f: h5py.File, path: Path, name: str, row_shape: tuple[int, ...], kind: str, n: int | None) -> h5py.Dataset:
    """The dataset ``name`` with shape ``[n, *row_shape]`` and dtype kind ``kind`` ('c', 'f' or 'i')."""
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise InputError(f"{path}: dataset '{name}' is missing")
    ds = f[name]
    want = ("S" if n is None else str(n), *map(str, row_shape))
    if ds.ndim != len(want) or tuple(ds.shape[1:]) != row_shape or (n is not None and ds.shape[0] != n):
        raise InputError(f"{path}: dataset '{name}' has shape {list(ds.shape)}, expected [{', '.join(want)}] from the scenario and the other datasets")
    kinds = {"c": "complex", "f": "floating-point", "i": "integer"}
    if ds.dtype.kind != kind and not (kind == "f" and ds.dtype.kind in "iu") and not (kind == "i" and ds.dtype.kind == "u"):
        raise InputError(f"{path}: dataset '{name}' has dtype {ds.dtype}, expected {kinds[kind]}")
    return ds


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


def _check_padded(path: Path, name: str, a: np.ndarray, K: np.ndarray, offset: int, what: str) -> None:
    """Entries [0, K) finite, entries [K, K_max) NaN."""
    cols = np.arange(a.shape[1])
    want_finite = cols[None, :] < K[:, None]
    bad = _first(~(np.where(want_finite, np.isfinite(a), np.isnan(a))).all(1))
    if bad is not None:
        raise InputError(f"{path}: dataset '{name}', scene {offset + bad}: need finite values for the first {what} = {K[bad]} sources and NaN after, got {a[bad].tolist()}")


@contextmanager
def _open_scenes_file(path: str | os.PathLike) -> Iterator[tuple[h5py.File, Path, Scenario, dict[str, h5py.Dataset]]]:
    """Open a scene file for reading: ``(file, path, scenario, {y, H, codes datasets})`` with the
    root attributes checked and the input shapes checked against the scenario and each other."""
    path = Path(path)
    with open_h5(path, "scene file") as f:
        sc = _header(f, path, SCENES_FORMAT)
        shapes = _input_shapes(sc)
        S = _dataset(f, path, "y", shapes["y"], "c", None).shape[0]
        yield f, path, sc, {name: _dataset(f, path, name, shapes[name], "c", S) for name in INPUTS}


def validate_scenes_file(path: str | os.PathLike, *, chunk: int = READ_CHUNK) -> FileInfo:
    """Check a scene file against docs/scene-files.md, streaming ``chunk`` scenes at a time.

    Refuses (``ValueError`` naming the dataset and, for value errors, the first bad scene):
    wrong ``format``/``version``, a missing or unreadable ``scenario``, missing inputs, shapes
    that disagree with each other or with the scenario, non-finite inputs (y, H, codes,
    snr_db), a scene whose channel H or whose codes are all zero, and a malformed truth group
    (K outside 0..k_max, positions not finite for the first K sources and NaN after, noise
    variance negative or not finite, optional ``truth/H`` / ``truth/codes`` not shaped like
    ``H`` / ``codes`` or not finite, a true channel all zero). Returns a :class:`FileInfo`.
    """
    with _open_scenes_file(path) as (f, path, sc, inputs):
        S = inputs["y"].shape[0]
        if "snr_db" in f:
            inputs["snr_db"] = _dataset(f, path, "snr_db", (), "f", S)
        truth = None
        if "truth" in f:
            truth = {"K": _dataset(f, path, "truth/K", (), "i", S), "noise_var": _dataset(f, path, "truth/noise_var", (), "f", S)}
            truth.update({q: _dataset(f, path, f"truth/{q}", (sc.k_max,), "f", S) for q in TRUTH_PER_SOURCE})
            shapes = _input_shapes(sc)
            inputs.update({f"truth/{q}": _dataset(f, path, f"truth/{q}", shapes[q], "c", S) for q in _truth_inputs_in(f)})
        for a in range(0, S, chunk):
            b = min(S, a + chunk)
            for name, ds in inputs.items():
                x = ds[a:b]
                x = (x.view(x.real.dtype) if x.dtype.kind == "c" else x).reshape(b - a, -1)  # real and imaginary parts
                bad = _first(~np.isfinite(x).all(1))
                if bad is not None:
                    raise InputError(f"{path}: dataset '{name}', scene {a + bad}: non-finite values")
                if name in ("H", "codes", "truth/H"):  # realised codes may be all zero (failed elements)
                    bad = _first(~x.any(1))
                    if bad is not None:
                        what = "RIS codes are" if name == "codes" else "channel is"
                        raise InputError(f"{path}: dataset '{name}', scene {a + bad}: {what} all zero")
            if truth is not None:
                K = truth["K"][a:b]
                bad = _first((K < 0) | (K > sc.k_max))
                if bad is not None:
                    raise InputError(f"{path}: dataset 'truth/K', scene {a + bad}: K = {K[bad]} outside 0..k_max={sc.k_max}")
                for q in TRUTH_PER_SOURCE:
                    _check_padded(path, f"truth/{q}", truth[q][a:b], K, a, "K")
                nv = truth["noise_var"][a:b]
                bad = _first(~(np.isfinite(nv) & (nv >= 0)))
                if bad is not None:
                    raise InputError(f"{path}: dataset 'truth/noise_var', scene {a + bad}: {nv[bad]} is not a finite variance >= 0")
        return FileInfo(
            path, sc, S, has_snr="snr_db" in inputs, has_truth=truth is not None, truth_inputs=_truth_inputs_in(f) if truth is not None else ()
        )


def _truth_inputs_in(f: h5py.File) -> tuple[str, ...]:
    """Which of the optional ``truth/H``, ``truth/codes`` an open scene file has."""
    return tuple(q for q in TRUTH_INPUTS if f"truth/{q}" in f)


def validate_estimates_file(path: str | os.PathLike, *, chunk: int = READ_CHUNK * 16, scan: bool = True) -> FileInfo:
    """Check an estimates file: format/version/scenario, ``est/K`` in 0..k_max, positions
    ``[S, K_max]`` finite for the first K-hat and NaN after (``ValueError`` naming dataset and scene).
    ``scan=False``: header and layout only, without the value scan (:func:`estimates_file_info`)."""
    path = Path(path)
    with open_h5(path, "estimates file") as f:
        sc = _header(f, path, ESTIMATES_FORMAT)
        K_ds = _dataset(f, path, "est/K", (), "i", None)
        S = K_ds.shape[0]
        pos = {q: _dataset(f, path, f"est/{q}", (sc.k_max,), "f", S) for q in EST_PER_SOURCE}
        for a in range(0, S if scan else 0, chunk):
            b = min(S, a + chunk)
            K = K_ds[a:b]
            bad = _first((K < 0) | (K > sc.k_max))
            if bad is not None:
                raise InputError(f"{path}: dataset 'est/K', scene {a + bad}: K-hat = {K[bad]} outside 0..k_max={sc.k_max}")
            for q, ds in pos.items():
                _check_padded(path, f"est/{q}", ds[a:b], K, a, "K-hat")
        method = f.attrs.get("method", f["est"].attrs.get("method", ""))
        method = _attr_str(method)
        return FileInfo(path, sc, S, method=method)


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------
def _t(a: np.ndarray, device, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _read(f: h5py.File, info: FileInfo, sel: slice | list[int], device) -> Scenes:
    """The scenes ``sel`` (a slice, or a sorted list of distinct indices) of an open, validated scene file."""

    def get(name: str, dtype: torch.dtype) -> torch.Tensor:
        return _t(f[name][sel], device, dtype)

    truth = None
    if info.has_truth:
        truth = Truth(
            K=get("truth/K", torch.int64),
            **{q: get(f"truth/{q}", torch.float32) for q in TRUTH_PER_SOURCE},
            noise_var=get("truth/noise_var", torch.float32),
            **{q: get(f"truth/{q}", torch.complex64) for q in info.truth_inputs},
        )
    return Scenes(
        y=get("y", torch.complex64),
        H=get("H", torch.complex64),
        codes=get("codes", torch.complex64),
        scenario=info.scenario,
        snr_db=get("snr_db", torch.float32) if info.has_snr else None,
        truth=truth,
    )


def _range(info: FileInfo, start: int, stop: int | None) -> tuple[int, int]:
    S = info.n_scenes
    stop = S if stop is None else stop
    if not (0 <= start <= stop <= S):
        raise InputError(f"{info.path}: scene range [{start}, {stop}) is outside [0, {S}]")
    return start, stop


def load_scenes(path: str | os.PathLike, start: int = 0, stop: int | None = None, *, device="cpu", validate: bool = True) -> Scenes:
    """Scenes ``[start, stop)`` of a scene file (all by default) as one :class:`Scenes` on ``device``.

    The whole file is validated first (streaming) unless ``validate=False``. In memory: y, H,
    codes complex64; snr_db, truth floats float32; truth.K int64. For large files prefer
    :func:`iter_scenes` or :class:`risloc.data.SceneFileDataset`.
    """
    info = validate_scenes_file(path) if validate else scenes_file_info(path)
    a, b = _range(info, start, stop)
    with h5py.File(info.path, "r") as f:
        return _read(f, info, slice(a, b), device)


def iter_scenes(
    path: str | os.PathLike, chunk: int = 8192, *, start: int = 0, stop: int | None = None, device="cpu", validate: bool = True
) -> Iterator[Scenes]:
    """Stream scenes ``[start, stop)`` of a scene file in chunks of ``chunk`` (validated first, before
    the first chunk is yielded; ``validate=False`` skips that for a file already checked)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    info = validate_scenes_file(path) if validate else scenes_file_info(path)
    a0, b0 = _range(info, start, stop)

    def gen() -> Iterator[Scenes]:
        with h5py.File(info.path, "r") as f:
            for a in range(a0, b0, chunk):
                yield _read(f, info, slice(a, min(b0, a + chunk)), device)

    return gen()


def estimates_file_info(path: str | os.PathLike) -> FileInfo:
    """Header and layout of an estimates file without the value scan (shapes and format still checked)."""
    return validate_estimates_file(path, scan=False)


def scenes_file_info(path: str | os.PathLike) -> FileInfo:
    """Header and layout of a scene file without the value scan (shapes and format still checked)."""
    with _open_scenes_file(path) as (f, path, sc, inputs):
        S = inputs["y"].shape[0]
        truth_inputs = _truth_inputs_in(f) if "truth" in f else ()
        shapes = _input_shapes(sc)
        for q in truth_inputs:
            _dataset(f, path, f"truth/{q}", shapes[q], "c", S)
        return FileInfo(path, sc, S, has_snr="snr_db" in f, has_truth="truth" in f, truth_inputs=truth_inputs)


def load_estimates(path: str | os.PathLike, *, device="cpu") -> Estimates:
    """An estimates file (validated) as :class:`~risloc.scenes.Estimates` (K int64, positions float32)."""
    info = validate_estimates_file(path)
    with h5py.File(info.path, "r") as f:
        g = f["est"]
        return Estimates(
            K=_t(g["K"][:], device, torch.int64),
            phi=_t(g["phi"][:], device, torch.float32),
            theta=_t(g["theta"][:], device, torch.float32),
            r=_t(g["r"][:], device, torch.float32),
            method=info.method,
        )


# ---------------------------------------------------------------------------------------------
# CRB files (risloc crb)
# ---------------------------------------------------------------------------------------------
CRB_CONTENT = "crb"
"""Root attribute ``content`` of a CRB file (``format``/``version``/``scenario`` are the scene file's)."""


def crb_file(
    scenes_path,
    out_path,
    *,
    signal: str | None = None,
    device="cpu",
    batch: int = 4096,
    progress: bool = True,
    **options,
) -> int:
    """Compute the CRB of every scene of a scene file and write a CRB file; returns the scene count.

    Reads ``scenes_path`` in chunks of ``batch`` scenes with :func:`iter_scenes` (validated
    first; the ``truth/`` group is required) and writes ``crb/phi``, ``crb/theta``, ``crb/r``
    (float32 ``[S, K_max]``, standard deviations in rad / m, NaN padded, ``inf`` where
    unidentifiable) and ``crb/regular`` (int8 ``[S]``, 1 where the FIM was full rank). The root
    attributes ``format``, ``version`` and ``scenario`` are copied from the scene file, plus
    ``content = "crb"``, ``signal`` and ``scenes`` (the scene file's name). The file is written
    under a temporary name in the same folder and renamed when complete
    (:func:`risloc._files.atomic_path`). Options are passed to :func:`risloc.crb.crb`.
    """
    scenes_path, out_path = Path(scenes_path), Path(out_path)
    info = validate_scenes_file(scenes_path)  # refuses a bad file before any work
    if not info.has_truth:
        raise InputError(f"{scenes_path}: no truth/ group; the CRB needs the true positions, powers and noise_var")
    require_folder(out_path)
    with h5py.File(scenes_path, "r") as f:
        attrs = {k: f.attrs[k] for k in ("format", "version", "scenario") if k in f.attrs}
    S, K_max = info.n_scenes, info.scenario.k_max
    signal = signal or info.scenario.signal
    if signal not in SIGNAL_MODELS:
        raise ValueError(f"signal must be one of {SIGNAL_MODELS}, not {signal!r}")
    batch = max(1, int(batch))

    bar = None
    try:
        with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as out:
            for k, v in attrs.items():
                out.attrs[k] = v
            out.attrs["content"] = CRB_CONTENT
            out.attrs["signal"] = signal
            out.attrs["scenes"] = scenes_path.name
            chunks = (min(S, 4096), K_max) if S else None  # an empty dataset cannot be chunked
            ds = {q: out.create_dataset(f"crb/{q}", shape=(S, K_max), dtype="float32", chunks=chunks) for q in POSITION_PARAMS}
            ds_reg = out.create_dataset("crb/regular", shape=(S,), dtype="int8", chunks=(min(S, 65536),) if S else None)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=S, unit="scene", desc=f"crb ({signal})")
            start = 0
            for scenes in iter_scenes(scenes_path, batch, device=device, validate=False):
                n = len(scenes)
                res = crb_for_scenes(scenes, signal=signal, **options)
                for q in POSITION_PARAMS:
                    ds[q][start : start + n] = getattr(res, q).float().cpu().numpy()
                ds_reg[start : start + n] = res.regular.to(torch.int8).cpu().numpy()
                start += n
                if bar is not None:
                    bar.update(n)
            if start != S:
                raise ValueError(f"{scenes_path}: read {start} scenes, truth/phi has {S}")
    finally:
        if bar is not None:
            bar.close()
    return S


def load_crb(path, *, start: int = 0, stop: int | None = None, device=None) -> CRBResult:
    """Read a CRB file written by :func:`crb_file` (``risloc crb``) as a :class:`CRBResult`.

    Values are float32 as stored (rad / m, NaN padded); ``regular`` is all True when the file
    has no ``crb/regular``. ``start``/``stop`` select a range of scenes.
    """
    with open_h5(path, "CRB file") as f:
        if "crb" not in f:
            raise InputError(f"{path}: no 'crb' group (expected crb/phi, crb/theta, crb/r)")
        content = _attr_str(f.attrs.get("content", CRB_CONTENT))
        if content != CRB_CONTENT:
            raise InputError(f"{path}: attribute content = {content!r}, expected {CRB_CONTENT!r}")
        vals = {}
        shape = None
        for q in POSITION_PARAMS:
            if f"crb/{q}" not in f or not isinstance(f[f"crb/{q}"], h5py.Dataset):
                raise InputError(f"{path}: missing dataset crb/{q}")
            d = f[f"crb/{q}"]
            if d.ndim != 2 or (shape is not None and d.shape != shape) or d.dtype.kind != "f":
                raise InputError(f"{path}: crb/{q} has shape {list(d.shape)} and dtype {d.dtype}, expected floats [S, K_max] like crb/phi")
            shape = d.shape
            vals[q] = torch.from_numpy(d[start:stop]).to(device)
        n = vals["phi"].shape[0]
        if "crb/regular" in f:
            regular = torch.from_numpy(f["crb/regular"][start:stop]).to(device=device, dtype=torch.bool)
        else:
            regular = torch.ones(n, dtype=torch.bool, device=device)
        signal = _attr_str(f.attrs.get("signal", "stochastic"))
    return CRBResult(phi=vals["phi"], theta=vals["theta"], r=vals["r"], regular=regular, signal=signal)


def _attr_str(v) -> str:
    """A string HDF5 attribute (h5py returns bytes or str)."""
    return v.decode() if isinstance(v, bytes) else str(v)
