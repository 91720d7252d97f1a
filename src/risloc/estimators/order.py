"""Model-order (number of sources) estimation from covariance eigenvalues.

``estimate_order(eigenvalues, n_snapshots, rule=...)`` with eigenvalues ``[B, p]`` sorted
descending (the p largest eigenvalues of a Hermitian covariance).

MDL and AIC (M. Wax and T. Kailath, "Detection of signals by information theoretic
criteria", IEEE Trans. ASSP 33(2), 1985). For k = 0..p-1, with the arithmetic and
geometric means ``A_k, G_k`` of the p - k smallest of the p eigenvalues::

    LL(k)  = n (p - k) log(A_k / G_k)            (>= 0: the noise eigenvalues' spread)
    MDL(k) = LL(k) + 1/2 k (2p - k) log n
    AIC(k) = 2 LL(k) + 2 k (2p - k)

``K_hat = argmin_k`` over ``k_min <= k <= k_max`` (``k_max <= p - 1``).

Few snapshots. The classical forms assume n >> p snapshots of a p-dimensional array.
risloc's covariances are N x N (N = 144) with rank r << N (L = 16 snapshots plus a
scaled identity from loading and shrinkage), so with ``p = N`` and ``n = L`` the N - r
flat eigenvalues dominate the tail means and the criteria over-estimate K. The variant
used here is the *dual* form: the r non-trivial eigenvalues of ``X X^H / L`` (X the
N x L matrix of snapshots) are those of the L x L matrix ``X^H X / L``, which is an
L-dimensional covariance estimated from N "observations" (the rows of X). So
:func:`estimate_order` is applied to the top ``p = r`` eigenvalues (at least
``k_max + 1``) with ``n = N``; this is what :func:`risloc.estimators.music.music_from_covariance`
does by default. Any other (p, n) can be passed.

Eigengap: ``K_hat = argmax_{k_min <= k <= k_max} lam_k / lam_{k+1}`` (1-based), and
``K_hat = 0`` when that largest ratio is below ``gap_threshold`` (no eigenvalue stands
out of the floor) and ``k_min = 0``.

No energy: a scene whose eigenvalues are all zero (its measurements are all zero) has nothing
to find, so every rule answers ``K_hat = 0`` there whatever ``k_min`` (:func:`no_energy`;
the estimators that decide K otherwise apply the same test to their data).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

RULES = ("mdl", "aic", "eigengap")


def no_energy(x: Tensor) -> Tensor:
    """``[B]`` bool: the scenes whose data ``x`` ``[B, ...]`` (measurements, a covariance factor,
    eigenvalues) is all zero. Such a scene carries no signal at all: K-hat is 0 there, whatever
    a rule's lower bound ``k_min`` (which stands for "the scenario always has a source")."""
    return ~(x.reshape(x.shape[0], -1).abs() > 0).any(-1)


def information_criterion(eigenvalues: Tensor, n_snapshots: float, *, rule: str = "mdl") -> Tensor:
    """MDL or AIC values ``[B, p]`` for k = 0..p-1 (see the module docstring)."""
    if rule not in ("mdl", "aic"):
        raise ValueError(f"information_criterion: rule must be 'mdl' or 'aic', not {rule!r}")
    lam = eigenvalues.to(torch.float64)
    B, p = lam.shape
    tiny = torch.finfo(torch.float64).tiny
    scale = lam[:, :1].abs().clamp(min=tiny)
    lam = (lam / scale).clamp(min=1e-12)  # scale-free; (numerically) zero eigenvalues floored
    # tail sums over i >= k (reverse cumulative sums)
    s = lam.flip(-1).cumsum(-1).flip(-1)  # [B, p]: sum_{i>=k} lam_i
    ls = lam.log().flip(-1).cumsum(-1).flip(-1)
    m = torch.arange(p, 0, -1, device=lam.device, dtype=torch.float64)  # p - k
    log_a = (s / m).log()
    log_g = ls / m
    ll = n_snapshots * m * (log_a - log_g).clamp(min=0)
    k = torch.arange(p, device=lam.device, dtype=torch.float64)
    free = k * (2 * p - k)
    if rule == "mdl":
        return ll + 0.5 * free * math.log(max(n_snapshots, 1.0))
    return 2 * ll + 2 * free


def estimate_order(
    eigenvalues: Tensor,
    n_snapshots: float | None = None,
    *,
    rule: str = "mdl",
    k_max: int | None = None,
    k_min: int = 0,
    gap_threshold: float = 1.5,
) -> Tensor:
    """Number of sources ``K_hat`` ``[B]`` (int64) from eigenvalues ``[B, p]`` (descending).

    Args:
        eigenvalues: the p largest eigenvalues per scene, descending (non-negative).
        n_snapshots: observations behind the covariance (MDL/AIC; see the module docstring
            for the dual choice used by the estimators). Required for 'mdl' and 'aic'.
        rule: 'mdl', 'aic' or 'eigengap'.
        k_max: largest order considered (default p - 1; clipped to p - 1).
        k_min: smallest order returned (0 allows "no source"), except in scenes whose
            eigenvalues are all zero (:func:`no_energy`): K-hat = 0 there.
        gap_threshold: eigengap only: below this largest ratio the answer is ``k_min``.
    """
    if rule not in RULES:
        raise ValueError(f"estimate_order: rule must be one of {RULES}, not {rule!r}")
    if eigenvalues.dim() != 2:
        raise ValueError(f"estimate_order: eigenvalues must be [B, p], got shape {tuple(eigenvalues.shape)}")
    B, p = eigenvalues.shape
    k_max = p - 1 if k_max is None else min(k_max, p - 1)
    k_min = max(0, min(k_min, k_max))
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=eigenvalues.device)
    if not torch.isfinite(eigenvalues).all():
        bad = int((~torch.isfinite(eigenvalues)).any(-1).nonzero()[0, 0])
        raise ValueError(f"estimate_order: eigenvalues of scene {bad} are not finite")
    lam = eigenvalues.to(torch.float64).clamp(min=0)
    return torch.where(no_energy(lam), torch.zeros(B, dtype=torch.int64, device=lam.device),
                       _order(lam, n_snapshots, rule, k_max, k_min, gap_threshold))


def _order(lam: Tensor, n_snapshots: float | None, rule: str, k_max: int, k_min: int, gap_threshold: float) -> Tensor:
    """The rule of :func:`estimate_order` on non-negative eigenvalues ``[B, p]``."""
    B = lam.shape[0]
    if rule == "eigengap":
        tiny = 1e-300
        ratio = lam[:, :-1] / lam[:, 1:].clamp(min=tiny)  # ratio[:, k-1] = lam_k / lam_{k+1}
        ratio = torch.where(lam[:, :-1] > tiny, ratio, torch.ones_like(ratio))
        lo = max(k_min, 1)
        if k_max < lo:
            return torch.full((B,), k_min, dtype=torch.int64, device=lam.device)
        window = ratio[:, lo - 1 : k_max]
        best, idx = window.max(-1)
        k = idx + lo
        return torch.where(best >= gap_threshold, k, torch.full_like(k, k_min))
    if n_snapshots is None:
        raise ValueError(f"estimate_order: rule {rule!r} needs n_snapshots")
    crit = information_criterion(lam, float(n_snapshots), rule=rule)[:, k_min : k_max + 1]
    return crit.argmin(-1) + k_min


# ----------------------------------------------------------------------------------------------
# Order rules on the measurement likelihood of the ML covariance fits (risloc.covariance.fit_factor)
# ----------------------------------------------------------------------------------------------
LIKELIHOOD_RULES = ("mdl", "aic", "penalised")
"""Rules on the rank-k fits' measurement likelihood (:func:`likelihood_order`)."""

PENALTY = 250.0
"""Nats per source of the 'penalised' rule: the best of a sweep on 300 validation scenes (seed 1000)
with ``benchmarks/bench_order.py`` (docs/estimators.md)."""


def factor_dof(k: int, d: int) -> int:
    """Real degrees of freedom of a rank-k factor F_d ``[d, k]`` modulo a unitary k x k rotation
    (R = F F^H has ``2 d k - k^2``), plus one for the noise variance."""
    return 2 * d * k - k * k + 1


def identifiable_rank(n_snapshots: int, m: int, d: int) -> int:
    """Largest k whose rank-k model is not saturated by ``n_snapshots`` snapshots of ``m`` antennas
    seen through a d-dimensional basis: ``k (d + L) - k^2 < L M``.

    Each snapshot is y_l = G_l F z_l + n_l: the k L latent values z_l and the ``d k - k^2``
    (complex) free entries of F must be fewer than the L M (complex) measurements, otherwise
    every y_l lies in the span of G_l F for some F, s2 -> 0 and the likelihood is unbounded.
    Default scenario (L = M = 16): d = 144 -> 1, d = 86 (prior support, 99 %) -> 2, d = 69 (95 %) -> 3.
    """
    k = 0
    while k + 1 <= min(d, m - 1) and (k + 1) * (d + n_snapshots) - (k + 1) ** 2 < n_snapshots * m:
        k += 1
    return k


def likelihood_order(
    nll: Tensor,
    *,
    d: int,
    n_snapshots: int,
    rule: str = "mdl",
    penalty: float = PENALTY,
    k_min: int = 0,
) -> Tensor:
    """``K_hat`` ``[B]`` from the NLLs ``[B, k_fit + 1]`` of the rank-k fits, k = 0..k_fit.

    The criteria are Wax & Kailath's, written on the likelihood of the measurements
    themselves (their eigenvalue forms are the closed-form ML likelihood of a fully observed
    array; here the ML fit is computed by EM, :func:`risloc.covariance.fit_factor`), with
    ``nu_k`` = :func:`factor_dof` (k, d)::

        MDL(k) = NLL_k + 1/2 nu_k log L         (Rissanen; = BIC with the L snapshots as observations)
        AIC(k) = NLL_k + nu_k                   (Akaike)
        penalised(k) = NLL_k + penalty k        (a calibrated per-source penalty)

    ``K_hat = argmin_k`` over ``k_min <= k <= k_fit``.
    """
    if rule not in LIKELIHOOD_RULES:
        raise ValueError(f"likelihood_order: rule must be one of {LIKELIHOOD_RULES}, not {rule!r}")
    if nll.dim() != 2:
        raise ValueError(f"likelihood_order: nll must be [B, k_fit + 1], got shape {tuple(nll.shape)}")
    kk = torch.arange(nll.shape[1], device=nll.device, dtype=torch.float64)
    dof = torch.tensor([factor_dof(int(k), d) for k in kk], device=nll.device, dtype=torch.float64)
    if rule == "mdl":
        pen = 0.5 * dof * math.log(max(n_snapshots, 2))
    elif rule == "aic":
        pen = dof
    else:
        pen = penalty * kk
    crit = nll.to(torch.float64) + pen
    k_min = max(0, min(k_min, nll.shape[1] - 1))
    return crit[:, k_min:].argmin(-1) + k_min


def sorte(eigenvalues: Tensor, *, k_max: int | None = None, k_min: int = 0) -> Tensor:
    """SORTE (second order statistic of the eigenvalues; He, Cichocki, Xie and Choi, "Detecting
    the number of clusters in n-way probabilistic clustering", IEEE TPAMI 32(11), 2010).

    With the gaps ``g_i = lam_i - lam_{i+1}`` (i = 1..p-1) and ``s2_k`` the variance of
    ``{g_k, ..., g_{p-1}}``, ``SORTE(k) = s2_{k+1} / s2_k`` (``+inf`` where ``s2_k = 0``) and
    ``K_hat = argmin_k`` over ``max(k_min, 1) <= k <= min(k_max, p - 3)``; ``K_hat = 0`` when
    every gap is zero. eigenvalues ``[B, p]`` descending -> ``[B]``.
    """
    lam = eigenvalues.to(torch.float64)
    B, p = lam.shape
    if p < 4:
        raise ValueError(f"sorte: needs at least 4 eigenvalues, got {p}")
    g = lam[:, :-1] - lam[:, 1:]  # [B, p-1]; g[:, i-1] = lam_i - lam_{i+1}
    n = g.shape[1]
    var = torch.stack([g[:, i:].var(-1, unbiased=False) for i in range(n)], -1)  # var[:, k-1] = s2_k
    hi = min(p - 3, k_max if k_max is not None else p - 3)
    lo = max(k_min, 1)
    if hi < lo:
        return torch.full((B,), min(lo, max(hi, 0)), dtype=torch.int64, device=lam.device)
    ks = torch.arange(lo, hi + 1, device=lam.device)
    num, den = var[:, ks], var[:, ks - 1]
    crit = torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.inf))
    K = crit.argmin(-1) + lo
    flat = (var[:, 0] <= 0)
    return torch.where(flat, torch.full_like(K, max(k_min, 0)), K)


SCENE_RULES = ("ml-mdl", "ml-aic", "ml-penalised", "bp-mdl", "bp-aic", "bp-eigengap", "bp-sorte")
"""Rules of :func:`order_estimates`: ``ml-*`` on the likelihood of the maximum-likelihood
covariance fits (:func:`likelihood_order`); ``bp-*`` on the eigenvalues of the back-projected
sample covariance (its effective covariance for MDL/AIC/eigengap in the dual form of
:func:`risloc.estimators.music.order_from_covariance`; SORTE on the L eigenvalues of the
plain sample covariance)."""


def order_estimates(scenes, *, rules=SCENE_RULES, options=None, penalty: float = PENALTY, k_min: int = 1, batch: int = 256) -> dict:
    """Per-rule source counts ``{rule: K_hat [S]}`` of a :class:`~risloc.scenes.Scenes` batch.

    The rank-k ML fits (k = 0..k_fit, :func:`risloc.covariance.fit_path` in the prior subspace of
    ``options``) are computed once and shared by the ``ml-*`` rules. K-hat is at least ``k_min``
    and, for the ``ml-*`` rules, at most k_fit (:func:`identifiable_rank`; 2 by default).
    Batched over scenes (``batch`` per chunk), on the scenes' device.
    """
    from .. import covariance as cv
    from .music import order_from_covariance

    unknown = sorted(set(rules) - set(SCENE_RULES))
    if unknown:
        raise ValueError(f"order_estimates: unknown rules {unknown}; known: {SCENE_RULES}")
    options = cv.CovarianceOptions() if options is None else options
    sc = scenes.scenario
    out = {r: [] for r in rules}
    for a in range(0, len(scenes), batch):
        s = scenes[a : a + batch]
        L, M = s.y.shape[1], s.y.shape[2]
        if any(r.startswith("ml-") for r in rules):
            basis = cv.prior_subspace(sc, energy=options.prior_energy, device=s.y.device, dtype=s.y.dtype)
            d = basis.shape[1]
            k_fit = max(min(sc.k_max, identifiable_rank(L, M, d)), k_min)
            fits = cv.fit_path(s.y, s.H, s.codes, range(k_fit + 1), basis=basis, iterations=options.em_iterations)
            nll = torch.stack([f.nll for f in fits], -1)
        bp = None
        for r in rules:
            if r.startswith("ml-"):
                K = likelihood_order(nll, d=d, n_snapshots=L, rule=r[3:], penalty=penalty, k_min=k_min)
            elif r == "bp-sorte":
                lam = cv.sample_covariance(s.y, s.H, s.codes, regularisation=options.regularisation).eigenvalues(L)
                K = sorte(lam, k_max=sc.k_max, k_min=k_min)
            else:
                if bp is None:
                    bp = cv.scene_covariance(s, options=dataclasses.replace(options, estimate="back_projection"))
                K = order_from_covariance(bp, sc, rule=r[3:], k_min=k_min)
            out[r].append(K.to(torch.int64))
    return {r: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for r, v in out.items()}
