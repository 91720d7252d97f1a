"""Checkpoints of the learned pipeline: atomic writes, safe reads, content hash.

A checkpoint is a plain dict of tensors, dicts, lists, numbers and strings (configurations as
TOML strings), so it loads with ``torch.load(weights_only=True)`` and no code runs on load::

    format, version          "risloc-learned", 1
    config, scenario         TOML strings (TrainConfig.to_toml(), Scenario.to_toml())
    model, ema               state dicts (ema: the EMA weights, used for validation/inference)
    objective                the loss module's state (running term magnitudes)
    optimizer, scheduler     AdamW state dict, {"step": optimiser steps taken}
    rng                      {"torch": CPU generator state}
    progress                 {"epoch": next epoch, "step": next global step, "best": ..., "bad_epochs": ...}
    metrics                  the last validation metrics (dict of numbers)
    calibration              {"temperature": T, "threshold": tau, "order_rule": rule}
    beta                     the hybrid blend weight used at inference
    seed, git                the training seed and the git commit of the code
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import torch

from .._files import InputError

FORMAT = "risloc-learned"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary name in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; refuse anything else.

    Raises :class:`~risloc._files.InputError` (a ValueError) naming the file when it is not a
    torch zip archive (truncated, or another kind of file), holds arbitrary pickled objects
    (which could run code on load), is not a risloc checkpoint, or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise InputError(f"checkpoint {path}: not a torch checkpoint (no zip archive: the file is truncated or of another kind)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"checkpoint {path}: refused to load — it holds objects other than tensors, dicts, lists, "
            f"numbers and strings (torch.load(weights_only=True): {first}). risloc checkpoints never do; "
            "this file was not written by risloc or has been tampered with"
        ) from None
    except (RuntimeError, AttributeError, TypeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"checkpoint {path}: damaged torch archive ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"checkpoint {path}: not a risloc learned-model checkpoint (format != {FORMAT!r})")
    if state.get("version") != VERSION:
        raise InputError(f"checkpoint {path}: format version {state.get('version')!r}, this risloc reads {VERSION}")
    return state


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The git commit of the risloc source tree (with '+dirty' when it has local changes), or 'unknown'.

    ``RISLOC_GIT_COMMIT`` in the environment wins (for copies of the tree without ``.git``,
    e.g. a training machine that received a checkout of a known commit)."""
    if os.environ.get("RISLOC_GIT_COMMIT"):
        return os.environ["RISLOC_GIT_COMMIT"]
    here = Path(__file__).resolve().parent.parent  # the risloc package
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


INFERENCE_KEYS = ("format", "version", "config", "scenario", "metrics", "calibration", "beta", "seed", "git", "progress", "distributed")


def export_weights(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the inference-only part of checkpoint ``src`` to ``dst`` (atomically): the EMA
    weights (or the raw ones without EMA) as ``model``, the configuration, calibration, metrics,
    seed and commit; no optimiser, objective or RNG state. This is the shipped file's form
    (``src/risloc/weights/default.pt``); it loads like any checkpoint. Returns the written dict."""
    state = load_checkpoint(src)
    out = {k: state[k] for k in INFERENCE_KEYS if k in state}
    out["model"] = state["ema"] if state.get("ema") is not None else state["model"]
    out["ema"] = None
    out["exported_from"] = {"file": Path(src).name, "sha256": file_sha256(src)}
    save_checkpoint(dst, out)
    return out
