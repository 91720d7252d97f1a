"""The device a user names (``--device``, ``TrainConfig.device``), checked once, before any work."""

from __future__ import annotations

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
