"""MUSIC on the effective covariance (Schmidt 1986), with exact near-field steering.

For a covariance ``R`` (a :class:`~risloc.covariance.LowRankCovariance`, ``R = U U^H + c I``)
with eigenpairs ``(lam_i, e_i)`` (descending), the signal subspace is
``E_s = [e_1, ..., e_K]`` and the pseudo-spectrum over (phi, theta, r) is::

    P(phi, theta, r) = |a|^2 / (|a|^2 - |E_s^H a|^2),     a = a(phi, theta, r)  (docs/model.md)

K comes from the caller (e.g. the learned K head) or from an order rule on R's
eigenvalues (:mod:`risloc.estimators.order`). Per-scene K is handled by masking the
columns of E_s (no per-scene loop). The peaks are found by :mod:`risloc.estimators.search`:
by default one source at a time (RAP-MUSIC, Mosher & Leahy 1999), which resolves close
pairs that the joint peak picking of the coarse grid merges; ``search="joint"`` takes the
K deepest refined local minima of one scan instead.

The registered estimator (:func:`estimate`) then, by default, refines MUSIC's sources on the
likelihood of the measurements (``ml``'s joint refinement) and chooses K-hat by pruning them
with ``ml``'s penalised likelihood; ``refine="none"`` keeps MUSIC's own answer.

R. O. Schmidt, "Multiple emitter location and signal parameter estimation", IEEE Trans.
Antennas Propag. 34(3), 276-280, 1986.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import covariance as cv
from ..covariance import CovarianceOptions, LowRankCovariance, as_low_rank, scene_covariance
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from . import register
from .order import estimate_order
from .search import GridSpec, NullSpectrum, SearchResult, mask_columns, rap_search, refine_peaks, search_grid, subspace_search

__all__ = ["music_from_covariance", "estimate", "order_from_covariance", "estimates_from_search"]


def order_from_covariance(
    R: LowRankCovariance,
    scenario: Scenario,
    *,
    rule: str = "mdl",
    k_max: int | None = None,
    k_min: int = 1,
    n_snapshots: float | None = None,
    gap_threshold: float = 1.5,
) -> Tensor:
    """``K_hat`` ``[B]`` from R's eigenvalues with :func:`~risloc.estimators.order.estimate_order`.

    Uses the top ``p = max(rank(U), k_max + 1)`` eigenvalues (padded with ``c``) and, for
    MDL/AIC, ``n_snapshots = N`` by default (the dual form explained in
    :mod:`risloc.estimators.order`).
    """
    k_max = scenario.k_max if k_max is None else k_max
    p = max(R.factor.shape[-1], k_max + 1)
    lam = R.eigenvalues(p)
    n = float(R.n) if n_snapshots is None else float(n_snapshots)
    return estimate_order(lam, n, rule=rule, k_max=k_max, k_min=k_min, gap_threshold=gap_threshold)


def estimates_from_search(res: SearchResult, K: Tensor, k_max: int, method: str, *, exact: bool = False) -> Estimates:
    """Estimates with ``K_hat = min(K, peaks found)`` and NaN padding to ``k_max`` (float32).

    ``exact`` (a known K): ``K_hat = K`` in every scene; when fewer than K peaks survived the
    non-maximum suppression, the remaining sources are the next refined candidates in their
    order (suppressed peaks, close to a kept one), so the answer never has another K."""
    dev = res.phi.device
    B = res.phi.shape[0]
    width = res.phi.shape[1]
    cols = min(width, k_max)
    idx = torch.arange(cols, device=dev).view(1, -1)
    if exact:
        Kh = K.to(dev).to(torch.int64).clamp(min=0, max=k_max)
        if B and int(Kh.max()) > cols:
            raise ValueError(f"{method}: K reaches {int(Kh.max())} but the search returned {cols} candidates per scene")
        finite = torch.isfinite(res.phi) & torch.isfinite(res.theta) & torch.isfinite(res.r)
        # kept peaks first, then the suppressed ones, each in the search's order (stable sort)
        order = torch.argsort((~res.kept).to(torch.int8) + 2 * (~finite).to(torch.int8), dim=1, stable=True)
        res = SearchResult(*(t.gather(1, order) for t in (res.phi, res.theta, res.r, res.q)), kept=torch.ones_like(res.kept))
        take = idx < Kh.view(-1, 1)
    else:
        found = res.count.to(dev)
        Kh = torch.minimum(K.to(dev).to(torch.int64), found.to(torch.int64)).clamp(min=0, max=k_max)
        take = (idx < Kh.view(-1, 1)) & res.kept[:, :cols]
    out = []
    for t in (res.phi, res.theta, res.r):
        v = torch.full((B, k_max), math.nan, dtype=torch.float32, device=dev)
        v[:, :cols] = torch.where(take, t[:, :cols].to(torch.float32), torch.full_like(v[:, :cols], math.nan))
        out.append(v)
    return Estimates(Kh, *out, method=method)


def music_from_covariance(
    R: LowRankCovariance | Tensor,
    scenario: Scenario,
    *,
    K: Tensor | None = None,
    k_max: int | None = None,
    order_rule: str = "mdl",
    n_snapshots: float | None = None,
    k_min: int = 1,
    search: str = "rap",
    grid: GridSpec = GridSpec(),
    n_candidates: int | None = None,
    refine_iterations: int = 12,
    min_separation: float | None = None,
    chunk: int = 1024,
    method: str = "music",
    init: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Estimates:
    """MUSIC estimates from a batch of covariances.

    Args:
        R: ``LowRankCovariance`` (e.g. from :func:`risloc.covariance.effective_covariance`) or a
            factor ``[B, N, r]`` (R = F F^H).
        scenario: geometry, field of view and range interval (the search prior).
        K: sources per scene ``[B]`` (e.g. the learned K head); ``None``: the order rule. A
            given K is the answer's K in every scene (clipped to ``k_max`` only).
        k_max: largest K (default ``scenario.k_max``); the order rule's K is clipped to it and to rank(U).
        order_rule: 'mdl', 'aic' or 'eigengap' (used only when ``K is None``).
        n_snapshots: for MDL/AIC; default N (see :mod:`risloc.estimators.order`).
        k_min: smallest K the order rule returns (1: the scenario always has a source).
        search: 'rap' (one source at a time, default), 'joint' (one scan, K deepest peaks) or
            'local' (no scan: the MUSIC null spectrum is refined from ``init``, K sources per scene).
        grid, n_candidates, refine_iterations, min_separation, chunk: search options
            (:mod:`risloc.estimators.search`); ``n_candidates`` defaults to 2 per RAP pass,
            ``k_max + 3`` for the joint search.
        method: the ``Estimates.method`` string.
        init: ``(phi, theta, r)`` ``[B, >= K]`` start points of ``search = 'local'`` (e.g. the
            learned detector's positions, strongest first); the first K of each scene are refined.

    Returns :class:`~risloc.scenes.Estimates` on R's device: ``K_hat`` (<= K when fewer
    distinct peaks exist; never NaN) and NaN-padded ``[B, k_max]`` phi, theta, r.
    """
    R = as_low_rank(R)
    k_max = scenario.k_max if k_max is None else k_max
    B = R.factor.shape[0]
    dev = R.factor.device
    if R.n != scenario.n_elements:
        raise ValueError(f"music_from_covariance: R is {R.n} x {R.n}, the scenario has {scenario.n_elements} elements")
    if search not in ("rap", "joint", "local"):
        raise ValueError(f"music_from_covariance: search must be 'rap', 'joint' or 'local', not {search!r}")
    if (search == "local") != (init is not None):
        raise ValueError("music_from_covariance: init= is the start of search='local' and only of it")
    if B == 0:
        return Estimates.empty(0, k_max, method=method, device=dev)
    values, vectors = R.eigh()  # [B, r], [B, N, r]
    rank = (vectors.abs().sum(-2) > 0).sum(-1)  # non-trivial eigenvectors per scene
    given = K is not None
    if not given:
        K = order_from_covariance(R, scenario, rule=order_rule, k_max=k_max, k_min=k_min, n_snapshots=n_snapshots)
    else:
        K = torch.as_tensor(K, device=dev).reshape(-1).to(torch.int64)
        if K.shape[0] != B:
            raise ValueError(f"music_from_covariance: K has {K.shape[0]} entries for {B} scenes")
    K = K.to(dev).clamp(0, k_max)
    if not given:  # an order rule's K is at most the rank; a given K is kept as it is
        K = torch.minimum(K, rank)
    kk = min(k_max, vectors.shape[-1])
    Es = mask_columns(vectors[..., :kk], K)
    if int(K.max()) == 0:
        return Estimates.empty(B, k_max, method=method, device=dev)
    if search == "local":
        res = _local_search(Es, K, init, scenario, grid, refine_iterations, kk)
    elif search == "rap":
        res = rap_search(
            Es, K, scenario, n_candidates=n_candidates or 2, grid=grid, refine_iterations=refine_iterations, min_separation=min_separation, chunk=chunk
        )
    else:
        res = subspace_search(
            NullSpectrum.subspace(Es), scenario, n_candidates=n_candidates or (k_max + 3), grid=grid,
            refine_iterations=refine_iterations, min_separation=min_separation, chunk=chunk,
        )
    return estimates_from_search(res, K, k_max, method, exact=given)


def _local_search(Es: Tensor, K: Tensor, init, scenario: Scenario, grid: GridSpec, iterations: int, width: int) -> SearchResult:
    """Refine the MUSIC null spectrum of ``Es`` from ``init`` (no grid scan, no NMS): the first
    ``K[b]`` start points of scene b are kept, in their given order."""
    phi0, theta0, r0 = (torch.as_tensor(t, device=Es.device, dtype=torch.float64)[:, :width] for t in init)
    if phi0.shape[0] != Es.shape[0]:
        raise ValueError(f"music_from_covariance: init has {phi0.shape[0]} scenes, R has {Es.shape[0]}")
    if phi0.shape[1] < int(K.max()):
        raise ValueError(f"music_from_covariance: init has {phi0.shape[1]} points per scene, K-hat reaches {int(K.max())}")
    kept = torch.arange(phi0.shape[1], device=Es.device).view(1, -1) < K.view(-1, 1)
    kept = kept & torch.isfinite(phi0) & torch.isfinite(theta0) & torch.isfinite(r0)
    phi0, theta0, r0 = (torch.nan_to_num(t, nan=1.0) for t in (phi0, theta0, r0))
    g = search_grid(scenario, grid, device=Es.device, dtype=torch.complex128 if Es.dtype == torch.complex128 else torch.complex64)
    phi, theta, r, q = refine_peaks(NullSpectrum.subspace(Es), phi0, theta0, 1.0 / r0, scenario, g, iterations=iterations,
                                    approximation=grid.approximation)
    return SearchResult(phi, theta, r, q, kept)


MUSIC_REFINE_STEPS = 8
"""Fisher-scoring steps of ``music``'s last stage (``refine="likelihood"``). Chosen with
:data:`MUSIC_PROPOSE` on validation scenes (seeds 1000 and 2026) with
``benchmarks/bench_music.py`` (docs/estimators.md): 15 steps scored the same."""

MUSIC_PROPOSE = "rank_limit"
"""What MUSIC proposes to the likelihood refinement when K is estimated: ``"rank_limit"`` (the
sources of the rank-k_fit ML covariance, k_fit = :func:`risloc.covariance.ml_rank_limit`, 2 by
default, then k_fit - 1 backward pruning passes of ``ml``'s penalised likelihood choose K-hat)
or ``"order_rule"`` (the rank chosen by ``options.rank_rule`` on the covariance fits, then one
pruning pass). Chosen on validation scenes: the order rule under-counts two sources at
10-20 dB in about one scene in ten, and pruning cannot add a source back."""


@register("music")
def estimate(
    scenes: Scenes,
    *,
    order_rule: str = "mdl",
    use_snr: bool = True,
    options: CovarianceOptions = CovarianceOptions(),
    K: Tensor | None = None,
    refine: str = "likelihood",
    propose: str = MUSIC_PROPOSE,
    **kw,
) -> Estimates:
    """MUSIC on :func:`risloc.covariance.scene_covariance` (by default the maximum-likelihood
    low-rank covariance of the measurements; ``options.estimate='back_projection'``: the
    back-projected sample covariance; SNR-aware shrinkage with the SNR label when ``use_snr``
    and present, else estimated), then (default) a likelihood refinement of its sources on the
    measurements, for one batch of scenes (the registry chunks: ``risloc.locate``).

    ``refine="likelihood"`` (default): MUSIC's sources take :data:`MUSIC_REFINE_STEPS` joint
    Fisher-scoring steps of their positions, powers and sigma^2 on the exact likelihood of the
    measurements, y_l ~ CN(0, G_l R G_l^H + sigma^2 I) with R = sum_k p_k a_k a_k^H
    (``ml``'s refinement, :func:`risloc.estimators.ml.estimate` with ``init``), followed by
    ``ml``'s range decision. When K is estimated, MUSIC proposes per ``propose``
    (:data:`MUSIC_PROPOSE`) and backward pruning passes of ``ml``'s penalised likelihood choose
    K-hat (pruning only removes sources). Why: with 16 snapshots the low-rank covariance carries
    a subspace error that moves MUSIC's range and, on single sources, its count; the
    measurements seen through the steering manifold do not (docs/estimators.md).
    ``refine="none"``: MUSIC's own positions, K-hat = the ML covariance's rank chosen by
    ``options.rank_rule`` (or by ``order_rule`` on a back-projected covariance).

    ``K`` (``[S]``) sets the covariance's rank and replaces the order rule (oracle or learned
    K): the answer then has exactly ``K`` sources per scene (no pruning). Other keywords go to
    :func:`music_from_covariance`."""
    if refine not in ("likelihood", "none"):
        raise ValueError(f"music: refine = {refine!r}: must be 'likelihood' or 'none'")
    if propose not in ("rank_limit", "order_rule"):
        raise ValueError(f"music: propose = {propose!r}: must be 'rank_limit' or 'order_rule'")
    start, prune = K, 0
    if K is None and refine == "likelihood":
        if propose == "rank_limit" and options.estimate == "ml":
            L, M = scenes.y.shape[1], scenes.y.shape[2]
            k_fit = min(cv.ml_rank_limit(scenes.scenario, L, M, options=options), kw.get("k_max", scenes.scenario.k_max))
            start = torch.full((len(scenes),), k_fit, dtype=torch.int64, device=scenes.y.device)
            prune = k_fit - 1
        else:
            prune = 1
    R = scene_covariance(scenes, options=options, use_snr=use_snr, K=start)
    est = music_from_covariance(R, scenes.scenario, K=start, order_rule=order_rule, **kw)
    if refine == "none":
        return est
    from .ml import estimate as ml_estimate

    out = ml_estimate(scenes, k_max=kw.get("k_max", scenes.scenario.k_max), init=est, iterations=MUSIC_REFINE_STEPS, init_prune=prune)
    out.method = est.method
    return out
