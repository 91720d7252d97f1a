"""MVDR / Capon beamformer spectrum (Capon 1969) with K-free peak detection.

For ``R = U U^H + c I`` (a :class:`~risloc.covariance.LowRankCovariance`, ``c > 0``) the
Capon power at (phi, theta, r), with the unit-norm steering ``a_hat = a / |a|``, is::

    P(phi, theta, r) = 1 / (a_hat^H R^-1 a_hat).

R^-1 comes from the low-rank structure (Woodbury):
``(U U^H + c I)^-1 = (I - U (c I + U^H U)^-1 U^H) / c``; in terms of the Gram eigenpairs
``(lam_i, e_i)`` of R (:meth:`LowRankCovariance.eigh`)::

    c a_hat^H R^-1 a_hat = 1 - sum_i (1 - c / lam_i) |e_i^H a_hat|^2  =:  q,

so ``P / c = 1 / q`` is the Capon power relative to the noise floor c, and the search is
the shared weighted-subspace search with weights ``w_i = 1 - c / lam_i``
(:mod:`risloc.estimators.search`, joint peak picking, same grid and refinement).

Detection (no K needed). The Capon power of a source over the loading floor c depends
strongly on the SNR (through the shrinkage) and the noise eigenvalues of a 16-snapshot
sample covariance are not flat, so the reference is the spectrum's own floor
``P_0 = median of P over the coarse grid``. With ``x = P / P_0``, a refined peak is a
source when

    x >= floor_threshold      and      x - 1 >= rel_threshold (x_max - 1),

at most ``k_max`` of them, deepest first, and at least ``k_min`` (default 1: the
scenario always has a source, the strongest peak is kept) where the covariance has any
eigenvalue above its noise floor c. A white covariance (every Capon weight zero, e.g. the
loading alone when the measurements are all zero) has a flat spectrum and no source: K-hat = 0. The defaults were tuned on
simulated scenes with :func:`tune_thresholds` (see docs/estimators.md for the sweep and
the command).

J. Capon, "High-resolution frequency-wavenumber spectrum analysis", Proc. IEEE 57(8),
1408-1418, 1969.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..covariance import CovarianceOptions, LowRankCovariance, as_low_rank, scene_covariance
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from . import register
from .music import estimates_from_search
from .search import GridSpec, NullSpectrum, SearchResult, subspace_search

__all__ = ["mvdr_peaks", "detect", "mvdr_from_covariance", "estimate", "tune_thresholds", "FLOOR_THRESHOLD", "REL_THRESHOLD"]

FLOOR_THRESHOLD = 1.2
"""Default minimum Capon power over the spectrum's floor, P / P_0 (linear); tuned on 200
default scenes (seed 7) with :func:`tune_thresholds` (best success, 0.14; K_acc 0.43)."""
REL_THRESHOLD = 0.2
"""Default minimum excess power relative to the scene's strongest peak, (x - 1) / (x_max - 1)."""


def _capon_spectrum(R: LowRankCovariance) -> NullSpectrum:
    values, vectors = R.eigh()
    c = R.diag.to(values.dtype)
    floor = 1e-6 * (R.trace() / R.n).to(values.dtype)
    c = torch.maximum(c, floor.clamp(min=torch.finfo(values.dtype).tiny))  # c > 0 (loading normally guarantees it)
    w = (1.0 - c.unsqueeze(-1) / torch.maximum(values, c.unsqueeze(-1))).clamp(0.0, 1.0)
    w = torch.where((vectors.abs().sum(-2) > 0), w, torch.zeros_like(w))
    return NullSpectrum.weighted(vectors, w)


def mvdr_peaks(
    R: LowRankCovariance | Tensor,
    scenario: Scenario,
    *,
    k_max: int | None = None,
    grid: GridSpec = GridSpec(),
    n_candidates: int | None = None,
    refine_iterations: int = 12,
    min_separation: float | None = None,
    chunk: int = 1024,
    spectrum: NullSpectrum | None = None,
) -> SearchResult:
    """Refined Capon peaks ``[B, n_candidates]`` (kept ones first, strongest first); ``1 / q`` is P/c.
    ``spectrum``: R's Capon null spectrum when the caller has it already."""
    R = as_low_rank(R)
    k_max = scenario.k_max if k_max is None else k_max
    if R.n != scenario.n_elements:
        raise ValueError(f"mvdr: R is {R.n} x {R.n}, the scenario has {scenario.n_elements} elements")
    return subspace_search(
        _capon_spectrum(R) if spectrum is None else spectrum, scenario, n_candidates=n_candidates or (k_max + 3), grid=grid,
        refine_iterations=refine_iterations, min_separation=min_separation, chunk=chunk,
    )


def detect(
    res: SearchResult,
    *,
    floor_threshold: float = FLOOR_THRESHOLD,
    rel_threshold: float = REL_THRESHOLD,
    k_max: int = 5,
    k_min: int = 1,
    signal: Tensor | None = None,
) -> Tensor:
    """``K_hat`` ``[B]`` from refined Capon peaks (kept ones first, strongest first).

    With ``P_0 = 1 / median_grid(q)`` the spectrum's floor (the median Capon power over the
    coarse grid) and ``x = P / P_0`` per peak, a peak is a source when
    ``x >= floor_threshold`` and ``x - 1 >= rel_threshold (x_max - 1)``. ``K_hat`` is the
    length of the passing prefix, clipped to ``[min(k_min, peaks found), k_max]``; ``signal``
    ``[B]`` (bool): the scenes whose spectrum is not flat (some Capon weight above zero), the
    only ones ``k_min`` applies to (a flat spectrum has no source: K-hat = 0).
    """
    q0 = res.q_median if res.q_median is not None else torch.ones_like(res.q[:, 0])
    x = q0.unsqueeze(1) / res.q.clamp(min=1e-300)
    xmax = x[:, :1]
    ok = res.kept & (x >= floor_threshold) & (x - 1 >= rel_threshold * (xmax - 1))
    prefix = torch.cumprod(ok.to(torch.int64), dim=1).sum(1)
    K = prefix.clamp(max=k_max)
    floor = torch.minimum(res.count.to(K.dtype), torch.full_like(K, k_min))
    if signal is not None:
        floor = torch.where(signal.to(K.device), floor, torch.zeros_like(floor))
        K = torch.where(signal.to(K.device), K, torch.zeros_like(K))
    return torch.maximum(K, floor)


def mvdr_from_covariance(
    R: LowRankCovariance | Tensor,
    scenario: Scenario,
    *,
    floor_threshold: float = FLOOR_THRESHOLD,
    rel_threshold: float = REL_THRESHOLD,
    k_max: int | None = None,
    k_min: int = 1,
    K: Tensor | None = None,
    method: str = "mvdr",
    **search_options,
) -> Estimates:
    """MVDR estimates from covariances: :func:`mvdr_peaks` then :func:`detect`, or, with a
    known ``K`` ``[B]``, the K strongest refined Capon peaks of each scene (exactly K)."""
    k_max = scenario.k_max if k_max is None else k_max
    R = as_low_rank(R)
    if R.factor.shape[0] == 0:
        return Estimates.empty(0, k_max, method=method, device=R.factor.device)
    spectrum = _capon_spectrum(R)
    res = mvdr_peaks(R, scenario, k_max=k_max, spectrum=spectrum, **search_options)
    if K is not None:
        K = torch.as_tensor(K, device=res.phi.device).reshape(-1).to(torch.int64)
        if K.shape[0] != R.factor.shape[0]:
            raise ValueError(f"mvdr_from_covariance: K has {K.shape[0]} entries for {R.factor.shape[0]} scenes")
        return estimates_from_search(res, K, k_max, method, exact=True)
    signal = (spectrum.d > 0).any(-1)  # not white: some eigenvalue above the noise floor c
    K = detect(res, floor_threshold=floor_threshold, rel_threshold=rel_threshold, k_max=k_max, k_min=k_min, signal=signal)
    return estimates_from_search(res, K, k_max, method)


@register("mvdr")
def estimate(
    scenes: Scenes,
    *,
    use_snr: bool = True,
    options: CovarianceOptions = CovarianceOptions(),
    K: Tensor | None = None,
    **kw,
) -> Estimates:
    """MVDR on :func:`risloc.covariance.scene_covariance` (as MUSIC) for one batch of scenes
    (the registry chunks: ``risloc.locate``); ``K`` ``[S]``: the K strongest Capon peaks
    instead of the detection rule. Keywords go to :func:`mvdr_from_covariance`.
    ``order_rule`` is accepted and ignored (K-free)."""
    kw.pop("order_rule", None)
    R = scene_covariance(scenes, options=options, use_snr=use_snr, K=K)  # a known K also sets the estimate's rank
    return mvdr_from_covariance(R, scenes.scenario, K=K, **kw)


def tune_thresholds(
    scenes: Scenes,
    *,
    floors=(1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 1.7),
    rels=(0.0, 0.1, 0.2, 0.3, 0.5),
    use_snr: bool = True,
    options: CovarianceOptions = CovarianceOptions(),
    objective: str = "success",
) -> list[dict]:
    """Sweep (floor_threshold, rel_threshold) on simulated ``scenes`` (with truth): the peaks
    are searched once, detection is re-run per pair and scored with :func:`risloc.metrics.score`.
    Returns rows ``{floor, rel, success, K_acc, f1}`` sorted best first by ``objective``."""
    from .. import metrics

    if scenes.truth is None:
        raise ValueError("tune_thresholds: the scenes need a truth")
    sc = scenes.scenario
    res = mvdr_peaks(scene_covariance(scenes, options=options, use_snr=use_snr), sc)
    rows = []
    for f in floors:
        for r in rels:
            K = detect(res, floor_threshold=f, rel_threshold=r, k_max=sc.k_max)
            est = estimates_from_search(res, K, sc.k_max, "mvdr")
            o = metrics.score(scenes.truth, est, snr_db=scenes.snr_db).overall
            rows.append({"floor": f, "rel": r, "success": o.success, "K_acc": o.K_acc, "f1": o.f1})
    rows.sort(key=lambda d: -d[objective])
    return rows
