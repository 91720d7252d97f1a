"""PyTorch datasets over scene files and over freshly simulated scenes.

* :class:`SceneFileDataset` — map-style, over one scene file. ``ds[i]`` is scene i,
  ``ds[a:b]`` or ``ds[[i, j, ...]]`` a batch, always as a :class:`~risloc.scenes.Scenes`.
  Batches are read with one HDF5 read per dataset (a slice, or the bounding slice of the
  sorted indices when it is at most ``4 x`` the batch, else a sorted fancy read), so let
  the sampler produce *batches* of indices::

      from torch.utils.data import BatchSampler, DataLoader, RandomSampler
      ds = SceneFileDataset("scenes.h5")
      loader = DataLoader(ds, batch_size=None, num_workers=2,
                          sampler=BatchSampler(RandomSampler(ds), batch_size=256, drop_last=False))
      for scenes in loader: ...          # Scenes of 256 scenes each

  The file is validated once when the dataset is made (streaming); each worker opens its
  own read-only handle.

* :class:`SimulatedScenes` — an endless (or bounded) ``IterableDataset`` of freshly
  simulated batches: batch b holds scenes ``[start + b B, start + (b+1) B)`` of the
  stream ``seed``. To resume training, make a new one with ``start`` = the number of
  scenes already consumed (:attr:`SimulatedScenes.position` after iterating in the main
  process). With DataLoader workers, worker w takes batches w, w + W, w + 2W, ...; use
  ``batch_size=None`` on the DataLoader.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from . import io
from .scenario import Scenario
from .scenes import Scenes
from .simulate import RNG_BLOCK, simulate


class SceneFileDataset(Dataset):
    """Map-style dataset over a scene file; items and batches are :class:`Scenes` (see module doc)."""

    def __init__(self, path: str | os.PathLike, *, device="cpu", validate: bool = True):
        self.path = Path(path)
        self.info = io.validate_scenes_file(self.path) if validate else io.scenes_file_info(self.path)
        self.device = device
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @property
    def scenario(self) -> Scenario:
        return self.info.scenario

    def __len__(self) -> int:
        return self.info.n_scenes

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # one handle per process (DataLoader workers)
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None
        return state

    def __getitem__(self, index: int | slice | Sequence[int]) -> Scenes:
        S = len(self)
        if isinstance(index, slice):
            a, b, step = index.indices(S)
            if step != 1:
                return self[list(range(a, b, step))]
            return io._read(self._h5(), self.info, slice(a, b), self.device)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (S if index < 0 else 0)
            if not 0 <= i < S:
                raise IndexError(f"scene {index} out of range for {S} scenes in {self.path}")
            return io._read(self._h5(), self.info, slice(i, i + 1), self.device)
        return self._gather(index)

    def _gather(self, indices: Sequence[int]) -> Scenes:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        S = len(self)
        if len(idx) == 0:
            raise IndexError("empty index list")
        idx = np.where(idx < 0, idx + S, idx)
        if idx.min() < 0 or idx.max() >= S:
            raise IndexError(f"scene index out of range for {S} scenes in {self.path}")
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 4 * len(uniq):  # one contiguous read, then pick the rows
            block = io._read(self._h5(), self.info, slice(lo, hi), "cpu")
            rows = torch.from_numpy(uniq - lo)
        else:  # sorted fancy read
            block = io._read(self._h5(), self.info, uniq.tolist(), "cpu")
            rows = torch.arange(len(uniq))
        back = np.empty_like(order)
        back[order] = inverse  # position in `uniq` of each requested index, in request order
        return block[rows[torch.from_numpy(back)]].to(self.device)


class SimulatedScenes(IterableDataset):
    """Endless stream of simulated batches (see module doc). ``stop`` (a scene index) bounds it.

    Batches aligned to :data:`~risloc.simulate.RNG_BLOCK` (a ``batch_size`` that divides or is
    a multiple of it, with an aligned ``start``) simulate no scene twice.
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        batch_size: int = RNG_BLOCK,
        *,
        seed: int = 0,
        start: int = 0,
        stop: int | None = None,
        device="cpu",
        dtype: torch.dtype = torch.complex64,
        with_covariance: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        self.scenario = scenario if scenario is not None else Scenario()
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.device, self.dtype, self.with_covariance = device, dtype, with_covariance
        self.position = start
        """Index of the first scene not yet yielded (main-process iteration only)."""

    def __iter__(self) -> Iterator[Scenes]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = worker
        while True:
            a = self.start + b * self.batch_size
            n = self.batch_size if self.stop is None else min(self.batch_size, self.stop - a)
            if n <= 0:
                return
            scenes = simulate(
                self.scenario, n, seed=self.seed, start=a, device=self.device, dtype=self.dtype, with_covariance=self.with_covariance
            )
            self.position = a + n
            yield scenes
            b += workers


class ScenarioMixture:
    """Scenes drawn from several scenarios of one geometry, interleaved scene by scene.

    A mixture is a base :class:`~risloc.scenario.Scenario` and a specification of the form
    ``"FIELD=V1,V2,...;FIELD=V1,V2,..."``: the components are every combination of the listed
    values (the cross product, in the order written), each the base scenario with those fields
    set. Scene ``i`` of the mixture stream ``seed`` is scene ``i`` of the stream ``seed`` of
    component ``i mod C`` (``C`` components), so it is the same whatever the batch, and the
    positions, powers and channel of scene ``i`` are those the component draws for index ``i``.
    Components must share the shapes of the base (``n_h``, ``n_v``, ``m_bs``, ``snapshots``,
    ``k_max``); signal model, codebook, SNR range and the impairments are free.

    A term may also list alternatives separated by ``|``, each ``-`` (the base unchanged) or
    ``FIELD=VALUE[&FIELD=VALUE...]``: ``"- | csi_nmse_db=-15 | ris_phase_noise_deg=10"`` is three
    components, the ideal model and two impairments. A value listed twice weighs twice.

    Example: ``ScenarioMixture(Scenario(), "signal=stochastic,static;codebook=random,dft")``
    has four components, one scene in four from each.

    Cost: every distinct component simulates the whole requested range and keeps its own rows,
    so a batch costs as many batches of simulation as there are distinct components.
    """

    SHAPE_FIELDS = ("n_h", "n_v", "m_bs", "snapshots", "k_max")

    def __init__(self, base: Scenario, spec: str = ""):
        self.base, self.spec = base, spec.strip()
        combos = self.combinations(self.spec)
        self.components = [base.with_overrides(c) for c in combos]
        self.labels = [";".join(c) or "-" for c in combos]
        distinct = [comp for c, comp in enumerate(self.components) if comp not in self.components[:c]]
        self._groups = [(comp, torch.tensor([c for c, other in enumerate(self.components) if other == comp]))
                        for comp in distinct]
        """Each distinct scenario with the indices of the components that are it (a scenario
        listed twice is simulated once)."""
        for comp, label in zip(self.components, self.labels):
            for name in self.SHAPE_FIELDS:
                if getattr(comp, name) != getattr(base, name):
                    raise ValueError(f"scenario mixture component {label!r}: {name} = {getattr(comp, name)} differs from the base's "
                                     f"{getattr(base, name)}; components must share the scene shapes")

    @classmethod
    def combinations(cls, spec: str) -> list[list[str]]:
        """The ``FIELD=VALUE`` assignments of every component of ``spec`` (the cross product of its
        terms, in the order written; ``[[]]`` for an empty spec)."""
        terms = [cls._alternatives(t) for t in filter(None, (t.strip() for t in spec.split(";")))]
        combos: list[list[str]] = [[]]
        for term in terms:
            combos = [c + a for c in combos for a in term]
        return combos

    @staticmethod
    def _alternatives(term: str) -> list[list[str]]:
        """One term's alternatives, each a list of ``FIELD=VALUE`` assignments."""
        if "|" in term:  # "-" (the base) | "F=V" | "F=V&G=W"
            alternatives = [a.strip() for a in term.split("|")]
            for a in alternatives:
                if a != "-" and any("=" not in x for x in a.split("&")):
                    raise ValueError(f"scenario mixture alternative {a!r} of {term!r} is not '-' or FIELD=VALUE[&FIELD=VALUE...]")
            return [[] if a == "-" else [x.strip() for x in a.split("&")] for a in alternatives]
        if "=" not in term:
            raise ValueError(f"scenario mixture term {term!r} is not of the form FIELD=V1,V2,...")
        name, values = term.split("=", 1)
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not values:
            raise ValueError(f"scenario mixture term {term!r} lists no value")
        return [[f"{name.strip()}={v}"] for v in values]

    def __len__(self) -> int:
        return len(self.components)

    def component(self, index: Tensor) -> Tensor:
        """The component of each scene index (``index mod C``)."""
        return index % len(self.components)

    def simulate(self, n_scenes: int, *, seed: int = 0, start: int = 0, device="cpu", **kwargs) -> Scenes:
        """Scenes ``[start, start + n_scenes)`` of the mixture stream ``seed`` (the base scenario's
        :class:`~risloc.scenes.Scenes` fields; ``scenes.scenario`` is the base)."""
        if len(self.components) == 1:
            return simulate(self.components[0], n_scenes, seed=seed, start=start, device=device, **kwargs)
        rows = torch.arange(start, start + n_scenes)
        which = self.component(rows)
        parts, order = [], []
        for comp, same in self._groups:
            keep = torch.isin(which, same).nonzero().flatten()
            if len(keep) == 0:
                continue
            lo, hi = int(keep[0]), int(keep[-1]) + 1
            part = simulate(comp, hi - lo, seed=seed, start=start + lo, device=device, **kwargs)
            parts.append(part[(keep - lo).to(part.device)])
            order.append(keep)
        for name in ("H", "codes"):  # true channel / realised codes where any component has them
            if any(getattr(p.truth, name) is not None for p in parts):
                parts = [p if getattr(p.truth, name) is not None else
                         dataclasses.replace(p, truth=dataclasses.replace(p.truth, **{name: getattr(p, name)})) for p in parts]
        out = Scenes.cat(parts)[torch.argsort(torch.cat(order)).to(device)]
        return dataclasses.replace(out, scenario=self.base)


GEOMETRY_FIELDS = ("n_h", "n_v", "m_bs", "snapshots")
"""The fields of a :func:`geometry_family`: the shapes of a scene (K_max stays the base's)."""


def geometry_family(base: Scenario, spec: str = "") -> list[Scenario]:
    """The geometries of ``spec`` (the syntax of :class:`ScenarioMixture`, over the fields of
    :data:`GEOMETRY_FIELDS` only), each the ``base`` scenario with those fields set; ``[base]``
    for an empty spec. ``"n_h=8,12;m_bs=8,16"`` is four geometries. A scene batch has one
    geometry (the shapes of its arrays), so a training run over a family draws each batch from
    one of them (``TrainConfig.geometries``)."""
    combos = ScenarioMixture.combinations(spec.strip())
    for combo in combos:
        for item in combo:
            name = item.split("=", 1)[0].strip().replace("-", "_")
            if name not in GEOMETRY_FIELDS:
                raise ValueError(f"geometry family {spec!r}: {name!r} is not a geometry field; "
                                 f"only {', '.join(GEOMETRY_FIELDS)} may vary (other fields: a scenario mixture)")
    return [base.with_overrides(c) for c in combos]
