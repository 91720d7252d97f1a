"""Checkpoints of the learned pipeline: atomic writes, safe reads, content hash.

A checkpoint is a plain dict of tensors, dicts, lists, numbers and strings (configurations as
TOML strings), so it loads with ``torch.load(weights_only=True)`` and no code runs on load::

    format, version          "risloc-learned", 1
    config, scenario         TOML strings (TrainConfig.to_toml(), Scenario.to_toml())
    model, ema               state dicts (ema: the EMA weights, used for validation/inference)
    objective                the loss module's state (running term magnitudes)
    optimizer, scheduler     AdamW state dict, {"step": the next global step}
    scaler                   the fp16 GradScaler's state (None without fp16)
    rng                      {"torch": CPU generator state, "cuda": the device's generator state (CUDA runs)}
    progress                 {"epoch": next epoch, "step": next global step, "best": ..., "bad_epochs": ...};
                             a checkpoint written inside an epoch also holds that epoch's running
                             sums (epoch_sums, epoch_counts, epoch_skipped, epoch_time)
    metrics                  the last validation metrics (dict of numbers)
    calibration              {"temperature": T, "threshold": tau, "order_rule": rule}
    beta                     the hybrid blend weight used at inference
    seed, git                the training seed and the git commit of the code
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .._files import atomic_path
from .._files import InputError

FORMAT = "risloc-learned"
VERSION = 1

PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "weights"
"""The folder of the packaged models: ``<name>.pt`` is the packaged model ``name``."""


def packaged_models() -> list[str]:
    """The names of the packaged models (the stems of ``PACKAGED_MODELS/*.pt``), sorted."""
    return sorted(p.stem for p in PACKAGED_MODELS.glob("*.pt"))


def named_checkpoint(checkpoint, what: str):
    """``checkpoint`` as given, or for a bare name (a string with no folder and no suffix that is
    not a file here), e.g. ``"mixed"``, the packaged model ``PACKAGED_MODELS/<name>.pt``.

    The one rule for naming a packaged model, wherever a checkpoint is given. An unknown bare
    name is a ValueError that starts with ``what`` (e.g. ``"--checkpoint"``) and lists the
    packaged models; a path is returned unchanged (whether it exists is the caller's check)."""
    if not isinstance(checkpoint, str):
        return checkpoint
    bare = "/" not in checkpoint and "\\" not in checkpoint and "." not in checkpoint
    if not bare or Path(checkpoint).exists():
        return checkpoint
    packaged = PACKAGED_MODELS / f"{checkpoint}.pt"
    if not packaged.is_file():
        raise ValueError(f"{what} {checkpoint!r} is neither a file nor a packaged model (packaged: {packaged_models()})")
    return packaged


def network_weights(state: dict) -> dict:
    """The network weights of a checkpoint ``state``: its EMA weights where it has them, else the raw ones."""
    return state["ema"] if state.get("ema") is not None else state["model"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`risloc._files.atomic_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


INFERENCE_KEYS = ("format", "version", "config", "scenario", "metrics", "calibration", "beta", "seed", "git", "progress", "distributed")


def export_weights(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the inference-only part of checkpoint ``src`` to ``dst`` (atomically): the EMA
    weights (or the raw ones without EMA) as ``model``, the configuration, calibration, metrics,
    seed and commit; no optimiser, objective or RNG state. This is the shipped file's form
    (``src/risloc/weights/default.pt``); it loads like any checkpoint. Returns the written dict."""
    state = load_checkpoint(src)
    out = {k: state[k] for k in INFERENCE_KEYS if k in state}
    out["model"] = network_weights(state)
    out["ema"] = None
    out["exported_from"] = {"file": Path(src).name, "sha256": file_sha256(src)}
    save_checkpoint(dst, out)
    return out
