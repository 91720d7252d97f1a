"""Devices: the one a user names (``--device``, ``TrainConfig.device``), checked once before any
work, and the library torch's batched factorisations use on CUDA while risloc's estimators run."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator

import torch


def check_device(text: str, field: str = "--device") -> torch.device:
    """The torch device ``text`` (``cpu``, ``cuda``, ``cuda:1``) when this machine has it, else a
    ValueError naming ``field``: a name that is no device (``gpu``), CUDA on a machine without it,
    a CUDA index beyond its devices, or another kind of device (risloc runs on cpu and cuda)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{field} {text!r} is not a device: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field} {text}: no CUDA device is available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"{field} {text}: risloc runs on cpu or cuda")
    return device


@contextlib.contextmanager
def cuda_factorisations(device: torch.device) -> Iterator[None]:
    """On CUDA: torch's batched factorisations and solves (``linalg.solve_ex``, ``inv_ex``,
    ``lu_factor_ex``, ``cholesky_solve``, ...) through cuSOLVER and cuBLAS for the body, the choice
    restored after (``torch.backends.cuda.preferred_linalg_library``); elsewhere nothing changes.

    By default torch sends batches of more than 16 matrices larger than 16 x 16 to MAGMA. The
    estimators' answers are the same either way, but on one H100 ``learned`` and ``learned+ml`` run
    3-13 % more scenes/s in batches of 1 024-2 048 with cuSOLVER and cuBLAS, ``ml`` up to 19 % (one
    of its three passes 2 % fewer)
    (benchmarks/results/h100/linalg-backend-db6f74f), and MAGMA's batched routines cannot be
    captured in a CUDA graph (:mod:`risloc.cuda_graphs`). The estimator registry runs every
    CUDA batch inside this (:meth:`risloc.estimators.Estimator.__call__`).

    torch calls the setting experimental and, the first time it is set in a process, prints a
    line saying so to the standard error from C++; that one call's output is not passed on
    (:func:`_without_stderr`), so a user's first CUDA call shows no warning about risloc's own
    choice. A choice the user made (``preferred_linalg_library("magma")``) is kept."""
    before = torch.backends.cuda.preferred_linalg_library() if device.type == "cuda" else None
    if before != torch._C._LinalgBackend.Default:  # not CUDA, or the user's own choice
        yield
        return
    global _cusolver_set
    with _without_stderr(not _cusolver_set), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*preferred_linalg_library is an experimental feature.*")
        torch.backends.cuda.preferred_linalg_library("cusolver")
    _cusolver_set = True
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(before)


_cusolver_set = False
"""Whether :func:`cuda_factorisations` has set cuSOLVER in this process (torch warns only the first time)."""


@contextlib.contextmanager
def _without_stderr(active: bool = True) -> Iterator[None]:
    """The process's standard error (file descriptor 2, where torch's C++ warnings go) sent to
    the null device for the body where ``active`` (and where the process has a descriptor 2 to
    redirect; where it has none, the body runs as it is)."""
    saved = None
    if active:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            saved = None
    if saved is None:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
