"""One provenance stamp for everything risloc writes as a result: the benchmark's
results.json, the trainer's checkpoints and the scripts under benchmarks/.

:func:`stamp` records what is needed to reproduce a number: the risloc version and git
commit of the code, the seed, the device that ran it (GPU name, or CPU model and torch
threads), the configuration, and the versions of torch, numpy and Python::

    {"risloc": "0.1.0", "git": {"commit": "a1b78a2...", "dirty": False}, "seed": 7,
     "device": {...}, "config": {...}, "versions": {"torch": ..., "numpy": ..., ...},
     "created": "2026-11-27T09:00:00+00:00"}

The commit is ``git rev-parse HEAD`` of the source tree; ``RISLOC_GIT_COMMIT`` in the
environment wins (a copy of a known commit without ``.git``, e.g. a machine that received a
checkout). Outside a checkout it is ``"unknown"``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["stamp", "git_info", "git_commit", "device_info", "versions", "now"]


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_info() -> dict[str, Any]:
    """``{"commit": ..., "dirty": bool | None}`` of the risloc source tree (``"unknown"`` outside a
    checkout; ``RISLOC_GIT_COMMIT`` in the environment wins, with ``dirty`` None)."""
    if os.environ.get("RISLOC_GIT_COMMIT"):
        return {"commit": os.environ["RISLOC_GIT_COMMIT"], "dirty": None, "source": "RISLOC_GIT_COMMIT"}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0 or not commit.stdout.strip():
            return {"commit": "unknown", "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def git_commit() -> str:
    """The commit as one string: ``<sha>``, ``<sha>+dirty`` with local changes, or ``"unknown"``."""
    g = git_info()
    return g["commit"] + ("+dirty" if g.get("dirty") else "")


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine that ran the work: the GPU's name on CUDA, else the CPU model, its core count
    and torch's thread count."""
    device = torch.device(device if device is not None else "cpu")
    info: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.lower().startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu_model"] = model
        info["cpu_count"] = os.cpu_count()
        info["name"] = f"{model} ({torch.get_num_threads()} torch threads)"
    return info


def versions() -> dict[str, str]:
    """Versions of risloc, torch, numpy and Python, and the platform string."""
    from . import __version__

    return {"risloc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def stamp(*, seed: int | None = None, device: torch.device | str | None = None, config: Any = None) -> dict[str, Any]:
    """The provenance record of one result (see the module docstring); ``config`` is stored as
    given (a dict, or a TOML string)."""
    v = versions()
    return {"risloc": v["risloc"], "git": git_info(), "seed": seed, "device": device_info(device), "config": config,
            "versions": v, "created": now()}
