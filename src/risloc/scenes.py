"""Containers for scenes and estimates (batched tensors), shared by every module.

Shapes (S scenes, L snapshots, M BS antennas, N RIS elements, K_max sources):

* ``Scenes.y`` ``[S, L, M]``, ``Scenes.H`` ``[S, M, N]``, ``Scenes.codes`` ``[S, L, N]`` (complex),
  ``Scenes.snr_db`` ``[S]`` (optional nominal SNR, dB);
* ``Truth.K`` ``[S]`` (int64), ``Truth.phi/theta/r/power`` ``[S, K_max]`` NaN after the first K,
  ``Truth.noise_var`` ``[S]``; optional ``Truth.H`` ``[S, M, N]`` and ``Truth.codes`` ``[S, L, N]``
  (the true channel and the realised codes, where they differ from what the receiver knows);
* ``Estimates.K`` ``[S]`` and ``Estimates.phi/theta/r`` ``[S, K_max]`` NaN after the first K-hat.

Radians and metres throughout. The HDF5 reader and writer live in :mod:`risloc.io`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .scenario import Scenario


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor field of a dataclass (recursing into nested dataclasses)."""
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            changes[f.name] = fn(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, Scenario):
            changes[f.name] = _map_tensors(v, fn)
    return dataclasses.replace(obj, **changes)


def _cat(items: Sequence, cls):
    first = items[0]
    changes = {}
    for f in dataclasses.fields(cls):
        v = getattr(first, f.name)
        if len({getattr(it, f.name) is None for it in items}) > 1:
            raise ValueError(f"{cls.__name__}.cat: field {f.name!r} is None in some items and set in others")
        if isinstance(v, Tensor):
            changes[f.name] = torch.cat([getattr(it, f.name) for it in items])
        elif dataclasses.is_dataclass(v) and not isinstance(v, Scenario):
            changes[f.name] = _cat([getattr(it, f.name) for it in items], type(v))
        else:
            changes[f.name] = v
    return dataclasses.replace(first, **changes)


class _Batched:
    """Indexing, device moves and concatenation shared by the batched containers."""

    def __getitem__(self, index):
        if isinstance(index, int):
            index = slice(index, index + 1)
        return _map_tensors(self, lambda t: t[index])

    def to(self, device=None, **kwargs):
        return _map_tensors(self, lambda t: t.to(device, **kwargs))

    @classmethod
    def cat(cls, items: Sequence):
        if not items:
            raise ValueError(f"{cls.__name__}.cat needs at least one item")
        return _cat(list(items), cls)


@dataclass
class Truth(_Batched):
    """Ground truth of a batch of scenes (absent for real measurements)."""

    K: Tensor
    phi: Tensor
    theta: Tensor
    r: Tensor
    power: Tensor
    noise_var: Tensor
    covariance: Tensor | None = None
    """Optional learning target R = sum_k p_k a_k a_k^H, ``[S, N, N]`` (on request only)."""
    H: Tensor | None = None
    """Optional true channel ``[S, M, N]`` where the receiver's ``Scenes.H`` is an estimate
    (``Scenario.csi_nmse_db`` set); None where the receiver's H is the true one."""
    codes: Tensor | None = None
    """Optional realised RIS codes ``[S, L, N]`` where they differ from the commanded
    ``Scenes.codes`` (RIS impairments on); None where the commanded codes are the realised ones."""

    def __len__(self) -> int:
        return self.K.shape[0]


@dataclass
class Scenes(_Batched):
    """What a receiver is given (y, H, codes, optional SNR) and, for simulated data, the truth."""

    y: Tensor
    H: Tensor
    codes: Tensor
    scenario: Scenario = field(default_factory=Scenario)
    snr_db: Tensor | None = None
    truth: Truth | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def device(self) -> torch.device:
        return self.y.device


@dataclass
class Estimates(_Batched):
    """What an estimator returns: K-hat and one (phi, theta, r) per detected source."""

    K: Tensor
    phi: Tensor
    theta: Tensor
    r: Tensor
    method: str = ""

    def __len__(self) -> int:
        return self.K.shape[0]

    @classmethod
    def empty(cls, n_scenes: int, k_max: int, *, method: str = "", device=None) -> "Estimates":
        """K-hat = 0 and all-NaN positions for ``n_scenes`` scenes."""
        nan = torch.full((n_scenes, k_max), float("nan"), device=device)
        return cls(torch.zeros(n_scenes, dtype=torch.int64, device=device), nan, nan.clone(), nan.clone(), method)
