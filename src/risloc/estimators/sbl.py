"""Sparse Bayesian learning (``sbl``) on a near-field dictionary seen through each snapshot's map.

Model (docs/model.md, stochastic signals). With the dictionary ``D = [a(eta_1), ..., a(eta_Q)]``
``[N, Q]`` of exact steering vectors on the near-field grid of :mod:`risloc.grids`, each
snapshot is ``y_l = Phi_l x_l + n_l`` with its own dictionary ``Phi_l = G_l D`` ``[M, Q]``
(``G_l = H diag(c_l)``), ``x_l ~ CN(0, Gamma)``, ``Gamma = diag(gamma)`` shared by the
snapshots (a source is the same atom in every snapshot), ``n_l ~ CN(0, s2 I_M)``. So

    y_l ~ CN(0, Sigma_l),   Sigma_l = s2 I_M + Phi_l Gamma Phi_l^H   (M x M),

and gamma, s2 maximise the evidence (type-II likelihood); most gamma_q go to zero (Tipping
2001; Wipf & Rao 2004, and 2007 for the multiple-snapshot M-SBL with one dictionary — here
the dictionary differs per snapshot, so every quantity below is per snapshot). Per iteration,
with ``u_l = Sigma_l^-1 y_l``:

* ``b_q = sum_l |phi_lq^H u_l|^2`` and ``a_q = sum_l phi_lq^H Sigma_l^-1 phi_lq``;
* gamma (MacKay's fixed point, the fast form of the EM update; posterior mean
  ``mu_lq = gamma_q phi_lq^H u_l``)::

      gamma_q <- gamma_q b_q / a_q      (= sum_l |mu_lq|^2 / sum_l (1 - Sigma_x,l,qq / gamma_q))

* s2 (EM)::

      s2 <- sum_l (s2^2 |u_l|^2 + s2 (M - sum_q gamma_q phi_lq^H Sigma_l^-1 phi_lq)) / (L M).

Cost per scene and iteration: a batched product of the ``L`` ``[M, Q]`` dictionaries with
their adjoints and a triangular solve with them (``~1.5 L M^2 Q`` complex multiply-adds;
Q = 4 550 by default) — matrix products only, batched over scenes, on the scenes' device.
After ``prune_after`` iterations only the ``keep`` strongest atoms per scene stay (the
others' gamma is set to 0), so the remaining iterations cost ``keep / Q`` of that.

Detection. The learned gamma concentrates on the atoms around each source. The local maxima
of gamma on the 3-D grid (3 x 3 x 3 neighbourhood) are the candidates; a candidate's strength
is the receiver SNR of its neighbourhood, ``snr_q = (sum of gamma over the 3 x 3 x 3 cells) x
mean_l |phi_lq|^2 / (M s2)`` (per antenna). K-hat counts the candidates with ``snr_q >= threshold`` and
``snr_q >= rel_threshold x`` the scene's strongest (at least 1, at most k_max); both
constants were tuned on validation scenes (docs/estimators.md).

Off-grid refinement. The K-hat strongest candidates start the joint refinement of the
``ml`` estimator (its ``init`` path: Fisher scoring of the stochastic likelihood in
(phi, theta, 1/r, powers, s2), the range decision of ``ml``); K-hat is kept.

M. E. Tipping, "Sparse Bayesian learning and the relevance vector machine", JMLR 1, 2001.
D. P. Wipf and B. D. Rao, "Sparse Bayesian learning for basis selection", IEEE Trans. Signal
Process. 52(8), 2004; "An empirical Bayesian strategy for solving the simultaneous sparse
approximation problem", IEEE Trans. Signal Process. 55(7), 2007.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fnn
from torch import Tensor

from .. import grids, physics
from ..scenes import Estimates, Scenes
from . import register
from .ml_core import unit_power
from .order import no_energy

__all__ = ["estimate", "sbl_gamma", "detect", "DEFAULTS"]

DEFAULTS = dict(
    grid_shape=(25, 13, 14),  # atoms in sin(phi), sin(theta), 1/r
    iterations=20,
    prune_after=5,  # full-dictionary iterations before pruning
    keep=256,  # atoms per scene kept after pruning (None: no pruning)
    threshold=0.02,  # minimum strength (see detect) of a candidate's neighbourhood
    rel_threshold=0.02,  # minimum strength relative to the scene's strongest candidate
    extra=2,  # candidates handed to the refinement beyond the gamma count
    prune=3,  # backward pruning passes of the refinement (penalised likelihood of ml)
    refine_iterations=25,
)
OPTION_TYPES = {"grid_shape": "tuple[int, int, int]", "iterations": "int", "prune_after": "int", "keep": "int | None",
                "threshold": "float", "rel_threshold": "float", "extra": "int", "prune": "int", "refine_iterations": "int"}
"""The kinds of :data:`DEFAULTS` (the registry checks command-line values against them)."""

def sbl_gamma(
    y: Tensor, Phi: Tensor, iterations: int, *, keep: int | None = 256, prune_after: int = 8, noise_floor: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Learn ``gamma`` ``[B, Q]`` and ``s2`` ``[B]`` (module docstring) from y ``[B, L, M]`` (unit
    mean power per scene) and the per-snapshot dictionaries Phi ``[B, L, M, Q]``.

    After ``prune_after`` iterations on all atoms only the ``keep`` atoms with the largest gamma
    stay in the model (the others are set to 0, as SBL drives them; Tipping 2001 prunes the
    same way), which makes the remaining iterations ~Q / keep times cheaper.
    """
    B, L, M, Q = Phi.shape
    cd = Phi.dtype
    rd = physics.real_dtype(cd)
    eye = torch.eye(M, dtype=cd, device=y.device)
    col = grids.sum_abs2(Phi, 2)  # [B, L, Q] = |phi_lq|^2
    # start: the model explains half of the power, spread evenly over the atoms
    gamma = (0.5 * M / col.mean(1).sum(-1).clamp(min=torch.finfo(rd).tiny)).view(B, 1).expand(B, Q).clone()
    s2 = torch.full((B,), 0.5, dtype=rd, device=y.device)
    floor = torch.full_like(s2, noise_floor)
    yv = y.unsqueeze(-1)
    index = None
    P = Phi
    for it in range(iterations):
        if keep is not None and it == prune_after and keep < Q:
            g_full = gamma
            gamma, index = gamma.topk(keep, dim=-1)  # [B, T]
            P = Phi.gather(3, index.view(B, 1, 1, -1).expand(B, L, M, keep))
        Sig = (P * gamma.view(B, 1, 1, -1).to(cd)) @ P.mH + s2.view(B, 1, 1, 1).to(cd) * eye  # [B, L, M, M]
        Lc, info = torch.linalg.cholesky_ex(Sig)
        Lc = torch.where(info.ne(0).view(B, L, 1, 1), eye * s2.view(B, 1, 1, 1).sqrt().to(cd), Lc)
        Wt = torch.linalg.solve_triangular(Lc, P, upper=False)  # [B, L, M, T]: Lc^-1 phi
        yt = torch.linalg.solve_triangular(Lc, yv, upper=False)  # [B, L, M, 1]
        quad = grids.sum_abs2(Wt, 2)  # [B, L, T] = phi^H Sigma^-1 phi
        proj = (Wt.mH @ yt).squeeze(-1).abs().square()  # [B, L, T] = |phi^H Sigma^-1 y|^2
        u2 = torch.linalg.solve_triangular(Lc.mH, yt, upper=True).abs().square().sum((2, 3))  # [B, L] = |u_l|^2
        used = (gamma.unsqueeze(1) * quad).sum(-1)  # [B, L]
        s2_new = (s2.view(B, 1).square() * u2 + s2.view(B, 1) * (M - used)).sum(1) / (L * M)
        gamma = gamma * proj.sum(1) / quad.sum(1).clamp(min=torch.finfo(rd).tiny)
        s2 = torch.maximum(s2_new, floor)
    if index is not None:
        gamma = torch.zeros_like(g_full).scatter(1, index, gamma)
    return gamma, s2


def detect(
    gamma: Tensor, s2: Tensor, col: Tensor, shape, *, threshold: float, rel_threshold: float, k_max: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates from gamma on the grid: ``(K_hat [B], index [B, k_max], strength [B, k_max])``:
    the local maxima by strength, then the other atoms by gamma (strength 0); K_hat counts the
    leading maxima that pass both thresholds (module docstring). ``col`` ``[B, Q]`` = mean_l |phi_lq|^2 / M."""
    B, Q = gamma.shape
    g3 = gamma.view(B, 1, *shape)
    is_max = Fnn.max_pool3d(g3, 3, stride=1, padding=1) <= g3
    cluster = Fnn.avg_pool3d(g3, 3, stride=1, padding=1, count_include_pad=True) * 27
    strength = cluster.view(B, Q) * col / s2.view(B, 1)
    peak = is_max.view(B, Q) & (gamma > 0)
    # local maxima first (strongest first), then the other atoms by gamma (a source next to a
    # stronger one on the coarse grid is often not a local maximum)
    rank = torch.where(peak, strength, -1.0 / (1.0 + gamma * col / s2.view(B, 1)))
    k = min(k_max, Q)
    _, idx = rank.topk(k, dim=-1)
    val = torch.where(peak.gather(1, idx), strength.gather(1, idx), torch.zeros_like(idx, dtype=strength.dtype))
    ok = (val >= threshold) & (val >= rel_threshold * val[:, :1])
    K = torch.cumprod(ok.to(torch.int64), dim=1).sum(1).clamp(min=1, max=k_max)
    return K, idx, val


def _run_batch(scenes: Scenes, k_max: int, opts: dict, K_given: Tensor | None, extra: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sc = scenes.scenario
    cd = opts["dtype"]
    y, H, codes = scenes.y.to(cd), scenes.H.to(cd), scenes.codes.to(cd)
    B, L, M = y.shape
    y, H, _ = unit_power(y, H)  # scale invariance, as ml
    dico = grids.dictionary(sc, opts["grid_shape"], device=y.device, dtype=cd)
    gp, gt, gr = dico.phi, dico.theta, dico.rho
    Phi = grids.measure_dictionary(H, codes, dico.D)  # [B, L, M, Q]
    gamma, s2 = sbl_gamma(y, Phi, int(opts["iterations"]), keep=opts["keep"], prune_after=int(opts["prune_after"]))
    col = Phi.abs().square().sum(2).mean(1) / M  # [B, Q]: mean_l |phi_lq|^2 / M
    K, idx, val = detect(gamma, s2, col, opts["grid_shape"], threshold=opts["threshold"], rel_threshold=opts["rel_threshold"], k_max=k_max)
    if K_given is not None:
        K = K_given.to(K.device).to(torch.int64).clamp(0, k_max)
    elif extra:
        K = (K + extra).clamp(max=k_max)
    if K_given is None:  # no measurement energy: no source (detect's count is at least 1)
        K = torch.where(no_energy(y).to(K.device), torch.zeros_like(K), K)
    return K, gp[idx], gt[idx], 1.0 / gr[idx]


@register("sbl")
def estimate(
    scenes: Scenes,
    *,
    k_max: int | None = None,
    K: Tensor | int | None = None,
    refine: bool = True,
    **options,
) -> Estimates:
    """Sparse Bayesian learning of the source positions (module docstring).

    One batch, in one pass (memory ~ 2 x 16 x 16 x Q x 8 bytes ~ 19 MB per scene with the
    default grid): the registry (``risloc.locate(scenes, "sbl", batch=...)``) runs large scene
    sets in batches of 16 scenes on the CPU and 256 on CUDA by default.

    Args:
        scenes: the batch; any device.
        k_max: largest K-hat (default ``scenes.scenario.k_max``).
        K: known number of sources (int or ``[S]``) instead of the gamma-based count.
        refine: off-grid refinement by the ``ml`` estimator's joint refinement (its ``init`` path).
        **options: ``grid_shape``, ``iterations``, ``prune_after``, ``keep``, ``threshold``, ``rel_threshold``,
            ``refine_iterations``, ``dtype`` (complex64 default). See ``DEFAULTS``.

    Returns :class:`Estimates` (K-hat >= 1, NaN-padded ``[S, k_max]``).
    """
    sc = scenes.scenario
    k_max = int(k_max if k_max is not None else sc.k_max)
    if k_max < 1:
        raise ValueError(f"sbl: k_max must be >= 1, got {k_max}")
    unknown = set(options) - set(DEFAULTS) - {"dtype"}
    if unknown:
        raise ValueError(f"sbl: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS) + ['dtype']}")
    opts = dict(DEFAULTS, dtype=torch.complex64)
    opts.update(options)
    if len(opts["grid_shape"]) != 3 or min(opts["grid_shape"]) < 2:
        raise ValueError(f"sbl: grid_shape = {opts['grid_shape']}: three sizes >= 2")
    S = len(scenes)
    if S == 0:
        return Estimates.empty(0, k_max, method="sbl", device=scenes.device)
    if K is not None:
        K = torch.as_tensor(K, device=scenes.device).to(torch.int64).reshape(-1).expand(S)
    with torch.no_grad():
        K_hat, phi, theta, r = _run_batch(scenes, k_max, opts, K, int(opts["extra"]) if refine else 0)
    idx = torch.arange(k_max, device=K_hat.device).view(1, -1)
    nan = torch.tensor(math.nan, device=K_hat.device)
    keep = idx < K_hat.view(-1, 1)
    phi, theta, r = (torch.where(keep, v.to(torch.float32), nan) for v in (phi, theta, r))
    est = Estimates(K_hat, phi, theta, r, method="sbl")
    if refine:
        from .ml import estimate as ml_estimate

        prune = 0 if K is not None else int(opts["prune"])
        est = ml_estimate(scenes, k_max=k_max, init=est, iterations=int(opts["refine_iterations"]), init_prune=prune)
        est.method = "sbl"
    return est
