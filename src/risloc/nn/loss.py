"""The training objective of the learned pipeline.

Notation: E(F) = :func:`risloc.nn.inputs.effective` (F, inputs, options) — THE effective covariance
of a factor F with the scene's sample covariance R_s and SNR (trace-normalised, hybrid-blended
with beta, loaded with delta, shrunk with alpha = gamma / (1 + snr)); F* = source_factor(truth)
(R = F* F*^H, the learning target of docs/model.md); F-hat the network's factor.

Main term (covariance NMSE, the same builder and arguments for prediction and truth)::

    NMSE = |E(F-hat) - E(F*)|_F^2 / |E(0) - E(F*)|_F^2

It is exactly 0 at perfection and exactly 1 for a zero prediction (E(0) is what the builder
gives for F = 0). Writing R_n = N R / tr R, the identity parts cancel and, for every beta and
loading delta,  E(F-hat) - E(F*) = (1-beta)(1-alpha)(R-hat_n - R_n)  and
E(0) - E(F*) = -(1-beta)((1-alpha) R_n + alpha I), so

    NMSE = (1-alpha)^2 |R-hat_n - R_n|^2 / |(1-alpha) R_n + alpha I|^2,

the NMSE of the trace-normalised matrices weighted by how much signal the SNR leaves
(low-SNR scenes, whose R is mostly the shrinkage identity, count less).

Every Frobenius norm is computed from the low-rank-plus-identity form with Gram-type
products (:func:`frobenius_sq_diff`), in float64; no N x N matrix or eigenproblem is formed.

Auxiliary terms (each switchable, each with its own ramp, see :class:`~risloc.nn.config.LossConfig`):

* ``raw``  |R-hat_n - R_n|^2 / |R_n|^2: NMSE of the raw normalised prediction;
* ``k``    cross-entropy of the K logits against the true K;
* ``gap``  eigengap: mu = eigenvalues of F-hat_n^H F-hat_n (K_max x K_max, eigvalsh, whose
  gradient V diag(g) V^H is always finite), loss = sum_{i>K} mu_i / (mu_K + sum_{i>K} mu_i):
  0 when the prediction has rank K, 1 when its K-th eigenvalue is empty;
* ``sub``  subspace alignment, projector-based: 1 - |Q^H F-hat_n|_F^2 / |F-hat_n|_F^2 with Q an
  orthonormal basis of the TRUE source subspace (no gradient needs an eigenvector);
* ``peak`` peak contrast: with the Capon spectrum P(p) = 1 / (a^H E(F-hat)^{-1} a) (a the
  normalised steering vector; the inverse by Woodbury on the small Gram; a smooth, stable
  stand-in for the MUSIC spectrum), softplus(log P(neighbour) - log P(truth) + margin)
  averaged over the true sources and 6 neighbours at +-2 deg in phi, theta and +-10 % in r;
* ``orth`` orthogonality of the factor's columns: |offdiag(G)|_F^2 / |G|_F^2, G = F-hat_n^H F-hat_n.

Alternative main term (``LossConfig.main = "music"``, the SubspaceNet-style peer,
docs/learned-peer.md): :func:`music_null_loss`, the normalised MUSIC null spectrum of E(F-hat) at
the true positions with the true K — no covariance target. It takes the slot (and the running
magnitude) of ``cov`` and is logged as ``music``. With ``main = "detect"`` (the ``spectrum``
kind's detection loss) ``detect_cov_weight`` c > 0 makes the main term ``detect + c NMSE``
(logged as ``detect``); the overfit probe uses it, the shipped run does not (c = 0).

Weights. With ``balance`` on, term t enters as  w_t ramp_t(epoch) * EMA(main) / EMA(t) * L_t,
so ``w_t`` is its share of the main term (defaults 0.05-0.1); the running magnitudes are
buffers (saved with the checkpoint). Optional homoscedastic-uncertainty weighting
(Kendall, Gal & Cipolla, CVPR 2018) multiplies each term by exp(-s_t) and adds s_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import covariance as cv
from ..metrics import ANGLE_TOL, RANGE_TOL_REL
from ..scenario import Scenario
from ..scenes import Truth
from ..physics import steering
from .config import LossConfig
from .inputs import ModelInputs, Prediction, effective

AUX_TERMS = ("raw", "k", "gap", "sub", "peak", "orth")
TERMS = ("cov",) + AUX_TERMS


# ----------------------------------------------------------------------------------------------
# Frobenius norms of low-rank-plus-identity differences
# ----------------------------------------------------------------------------------------------
def frobenius_sq_diff(A: cv.LowRankCovariance, B: cv.LowRankCovariance | None = None) -> Tensor:
    """``|A - B|_F^2`` ``[B]`` for ``A = P P^H + a I``, ``B = Q Q^H + b I`` (float64)::

        |A - B|^2 = |P^H P|^2 + |Q^H Q|^2 - 2 |P^H Q|^2 + 2 d (|P|^2 - |Q|^2) + d^2 N,   d = a - b.

    Each block is summed on its own, so identical inputs give exactly 0.
    """
    P = A.factor.to(torch.complex128)
    a = A.diag.to(torch.float64)
    n = A.n
    if B is None:
        Q = P[..., :0]
        b = torch.zeros_like(a)
    else:
        Q = B.factor.to(torch.complex128)
        b = B.diag.to(torch.float64)
    d = a - b
    pp = (P.mH @ P).abs().square().sum((-2, -1))
    qq = (Q.mH @ Q).abs().square().sum((-2, -1))
    pq = (P.mH @ Q).abs().square().sum((-2, -1))
    p2 = P.abs().square().sum((-2, -1))
    q2 = Q.abs().square().sum((-2, -1))
    return (pp + qq - 2 * pq) + 2 * d * (p2 - q2) + d * d * n


def covariance_nmse(pred: cv.LowRankCovariance, truth: cv.LowRankCovariance, zero: cv.LowRankCovariance) -> Tensor:
    """``|pred - truth|^2 / |zero - truth|^2`` per scene ``[B]`` (see the module docstring)."""
    den = frobenius_sq_diff(zero, truth)
    return frobenius_sq_diff(pred, truth) / den.clamp(min=1e-30)


def raw_nmse(factor: Tensor, true_factor: Tensor) -> Tensor:
    """``|R-hat_n - R_n|^2 / |R_n|^2`` with ``R_n = N R / tr R`` (R = F F^H), ``[B]``."""
    Rh = cv.normalise_trace(cv.as_low_rank(factor))
    Rt = cv.normalise_trace(cv.as_low_rank(true_factor))
    return frobenius_sq_diff(Rh, Rt) / frobenius_sq_diff(Rt).clamp(min=1e-30)


def zero_prediction(factor: Tensor) -> Tensor:
    return torch.zeros_like(factor)


# ----------------------------------------------------------------------------------------------
# auxiliary terms (per scene, [B])
# ----------------------------------------------------------------------------------------------
def _normalised_gram(factor: Tensor) -> tuple[Tensor, Tensor]:
    Fn = cv.normalise_trace(cv.as_low_rank(factor)).factor.to(torch.complex128)
    return Fn, Fn.mH @ Fn


def eigengap_loss(factor: Tensor, K: Tensor) -> Tensor:
    """``sum_{i>K} mu_i / (mu_K + sum_{i>K} mu_i)`` with mu the eigenvalues of the factor's Gram."""
    _, G = _normalised_gram(factor)
    mu = torch.linalg.eigvalsh(G).flip(-1).clamp(min=0)  # descending [B, K_max]
    idx = torch.arange(mu.shape[-1], device=mu.device)
    Kc = K.to(mu.device).clamp(min=1, max=mu.shape[-1]).unsqueeze(-1)
    tail = (mu * (idx >= Kc)).sum(-1)
    kth = torch.gather(mu, -1, Kc - 1).squeeze(-1)
    return tail / (kth + tail + 1e-9 * mu.shape[-1])


def true_subspace(true_factor: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis ``[B, N, K_max]`` of the true source subspace (zero columns where
    the factor is rank-deficient), from the Gram eigenproblem; no gradient."""
    with torch.no_grad():
        F = true_factor.to(torch.complex128)
        lam, V = torch.linalg.eigh(F.mH @ F)
        good = lam > lam.amax(-1, keepdim=True) * rtol
        inv = torch.where(good, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
        return F @ (V * inv.unsqueeze(-2))


def subspace_loss(factor: Tensor, true_factor: Tensor) -> Tensor:
    """``1 - |Q^H F_n|^2 / |F_n|^2``: the share of the predicted energy outside the true subspace."""
    Fn, _ = _normalised_gram(factor)
    Q = true_subspace(true_factor)
    inside = (Q.mH @ Fn).abs().square().sum((-2, -1))
    total = Fn.abs().square().sum((-2, -1))
    return 1 - inside / total.clamp(min=1e-12) * (total > 1e-12)


def orthogonality_loss(factor: Tensor) -> Tensor:
    """``|offdiag(G)|^2 / |G|^2`` of the normalised factor's Gram G."""
    _, G = _normalised_gram(factor)
    tot = G.abs().square().sum((-2, -1))
    diag = torch.diagonal(G, dim1=-2, dim2=-1).abs().square().sum(-1)
    return (tot - diag) / tot.clamp(min=1e-12)


def capon_inverse_quadratic(R: cv.LowRankCovariance, A: Tensor) -> Tensor:
    """``a^H R^{-1} a`` for R = U U^H + c I (c > 0) and rows a of ``A`` ``[B, P, N]`` (Woodbury, float64)::

        R^{-1} = (I - U (c I + U^H U)^{-1} U^H) / c
    """
    U = R.factor.to(torch.complex128)
    c = R.diag.to(torch.float64).clamp(min=1e-12)
    A = A.to(torch.complex128)
    r = U.shape[-1]
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    M = U.mH @ U + c.view(-1, 1, 1) * eye
    W = A.conj() @ U  # [B, P, r] = a^H U
    X = torch.linalg.solve(M, W.mH)  # [B, r, P]
    quad = (W * X.mT).sum(-1).real  # a^H U M^{-1} U^H a
    a2 = A.abs().square().sum(-1)
    return (a2 - quad).clamp(min=1e-12) / c.unsqueeze(-1)


def music_null_loss(R: cv.LowRankCovariance, truth: Truth, scenario: Scenario, *, negatives: int = 0,
                    negative_weight: float = 1.0, margin: float = 0.5) -> Tensor:
    """Normalised MUSIC null spectrum at the true sources, averaged over them, ``[B]``::

        q_k = |P_noise a(p_k)|^2 / |a(p_k)|^2 = 1 - |E_s^H a_hat(p_k)|^2,   a_hat = a / |a|,

    with E_s the K (TRUE K) dominant eigenvectors of R = U U^H + c I, obtained exactly as
    :func:`risloc.estimators.music.music_from_covariance` obtains them (the Gram route of
    :meth:`LowRankCovariance.eigh`: U^H U = V diag(lam) V^H, E_s = U V_K lam_K^{-1/2}), but in
    float64 and differentiable. q_k = 0 iff a(p_k) lies in the estimated signal subspace, i.e.
    the MUSIC pseudo-spectrum 1/q has an infinite peak at the true position.
    Gradient: through ``torch.linalg.eigh`` of the r x r Gram (terms 1/(lam_i - lam_j)); the loss
    depends only on the projector E_s E_s^H, so it is smooth while lam_K > lam_{K+1}; exactly
    degenerate spectra (e.g. a zero prediction) can give non-finite gradients, which the trainer's
    gradient gate skips. Used by the SubspaceNet-style peer (Shmuel et al., IEEE TVT 2025, train a
    surrogate covariance end-to-end through a differentiable subspace method; here MUSIC's null
    spectrum at the true near-field positions, cf. Gast, Le Magoarou & Shlezinger 2025).

    Hard negatives (``negatives`` = n > 0): the null at the truth says nothing about spurious
    nulls elsewhere, which is what RAP-MUSIC then picks. So the spectrum is also scanned (no
    gradient) on a coarse 25 x 13 x 10 grid (:func:`risloc.estimators.search.search_grid`), points
    within 6 deg of a true source are excluded, the n deepest remaining points p_j are taken, and
    ``negative_weight * mean_{k,j} softplus(log q_k - log q(p_j) + margin)`` is added (q(p_j)
    differentiable, at the fixed points).
    """
    U = R.factor.to(torch.complex128)
    G = U.mH @ U
    lam, V = torch.linalg.eigh(G)  # ascending
    lam, V = lam.flip(-1), V.flip(-1)
    r = lam.shape[-1]
    K = truth.K.to(U.device).clamp(min=1, max=r).unsqueeze(-1)
    keep = (torch.arange(r, device=U.device) < K) & (lam > lam[..., :1].clamp(min=1e-300) * 1e-10)
    w = torch.where(keep, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
    Es = U @ (V * w.unsqueeze(-2).to(V.dtype))  # [B, N, r], columns beyond K are zero
    active = torch.isfinite(truth.phi)
    phi = torch.where(active, truth.phi, torch.zeros_like(truth.phi))
    theta = torch.where(active, truth.theta, torch.zeros_like(truth.theta))
    rr = torch.where(active, truth.r, torch.ones_like(truth.r))
    a = steering(phi, theta, rr, scenario, dtype=torch.complex128).to(U.device)  # [B, K_max, N]
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    q = (1 - (a.conj() @ Es).abs().square().sum(-1)).clamp(min=0)  # [B, K_max]
    wa = active.to(q.dtype)
    loss = (q * wa).sum(-1) / wa.sum(-1).clamp(min=1)
    if negatives <= 0:
        return loss
    from ..estimators.search import NullSpectrum
    from ..grids import GridSpec, search_grid
    from ..physics import angle_between

    grid = search_grid(scenario, GridSpec(n_phi=25, n_theta=13, n_r=10), device=U.device, dtype=torch.complex64)
    with torch.no_grad():
        qg = NullSpectrum.subspace(Es.detach().to(torch.complex64)).grid(grid).reshape(len(q), -1)  # [B, G]
        P, T = torch.meshgrid(grid.phi, grid.theta, indexing="ij")
        P = P.unsqueeze(-1).expand(*grid.shape).reshape(-1).to(phi.dtype)
        T = T.unsqueeze(-1).expand(*grid.shape).reshape(-1).to(phi.dtype)
        near = angle_between(P.view(1, 1, -1), T.view(1, 1, -1), phi.unsqueeze(-1), theta.unsqueeze(-1)) < math.radians(6.0)
        near = (near & active.unsqueeze(-1)).any(1)  # [B, G]
        idx = torch.where(near, torch.full_like(qg, math.inf), qg).topk(negatives, -1, largest=False).indices  # [B, n]
    a_neg = grid.steering.to(torch.complex128)[idx]  # [B, n, N], unit norm
    q_neg = (1 - (a_neg.conj() @ Es).abs().square().sum(-1)).clamp(min=0)  # [B, n]
    lq = q.clamp(min=1e-6).log().unsqueeze(-1)  # [B, K_max, 1]
    hinge = nn.functional.softplus(lq - q_neg.clamp(min=1e-6).log().unsqueeze(-2) + margin)  # [B, K_max, n]
    hinge = (hinge.mean(-1) * wa).sum(-1) / wa.sum(-1).clamp(min=1)
    return loss + negative_weight * hinge


_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def peak_contrast_loss(R: cv.LowRankCovariance, truth: Truth, scenario: Scenario, margin: float) -> Tensor:
    """softplus(log P(neighbour) - log P(truth) + margin), averaged over true sources and neighbours
    one hit tolerance away (:data:`risloc.metrics.ANGLE_TOL` in phi and theta, :data:`risloc.metrics.RANGE_TOL_REL` in r)."""
    active = torch.isfinite(truth.phi)
    phi = torch.where(active, truth.phi, torch.zeros_like(truth.phi))
    theta = torch.where(active, truth.theta, torch.zeros_like(truth.theta))
    r = torch.where(active, truth.r, torch.ones_like(truth.r))
    d_ang = ANGLE_TOL
    off = torch.tensor(_NEIGHBOURS, dtype=phi.dtype, device=phi.device)  # [6, 3]
    phis = torch.cat([phi.unsqueeze(-1), phi.unsqueeze(-1) + d_ang * off[:, 0]], -1)  # [B, K, 7]
    thetas = torch.cat([theta.unsqueeze(-1), theta.unsqueeze(-1) + d_ang * off[:, 1]], -1)
    rs = torch.cat([r.unsqueeze(-1), r.unsqueeze(-1) * (1 + RANGE_TOL_REL * off[:, 2])], -1)
    a = steering(phis, thetas, rs, scenario, dtype=torch.complex64)  # [B, K, 7, N]
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    B, K, P, N = a.shape
    q = capon_inverse_quadratic(R, a.reshape(B, K * P, N)).view(B, K, P)
    logq = q.log()
    # P = 1/q: log P(nbr) - log P(true) = log q(true) - log q(nbr)
    hinge = nn.functional.softplus(logq[..., :1] - logq[..., 1:] + margin)  # [B, K, 6]
    w = active.to(hinge.dtype).unsqueeze(-1)
    return (hinge * w).sum((-2, -1)) / (w.sum((-2, -1)) * hinge.shape[-1]).clamp(min=1)


def covariance_main_loss(pred: Prediction, inputs: ModelInputs, options: cv.CovarianceOptions, true_factor: Tensor) -> Tensor:
    """The 'cov' main term ``[B]``: NMSE of E(F-hat) against E(F*) (module docstring)."""
    R_true = effective(true_factor, inputs, options)
    R_zero = effective(zero_prediction(pred.factor), inputs, options)
    return covariance_nmse(pred.covariance, R_true, R_zero)


def music_main_loss(pred: Prediction, truth: Truth, scenario: Scenario, cfg: LossConfig) -> Tensor:
    """The 'music' main term ``[B]``: :func:`music_null_loss` of E(F-hat) with ``cfg``'s hard negatives."""
    return music_null_loss(pred.covariance, truth, scenario, negatives=cfg.music_negatives,
                           negative_weight=cfg.music_negative_weight, margin=cfg.peak_margin)


# ----------------------------------------------------------------------------------------------
# the objective: terms, ramps, balancing
# ----------------------------------------------------------------------------------------------
def ramp(epoch: float, start: float, length: float) -> float:
    """0 before ``start``, rising linearly to 1 over ``length`` epochs."""
    if epoch < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (epoch - start) / length)


class Objective(nn.Module):
    """The weighted sum of the terms above; ``forward`` returns (total, per-term values)."""

    def __init__(self, cfg: LossConfig, scenario: Scenario, kind):
        """``kind``: the network's :class:`risloc.nn.networks.NetworkKind` (it supplies the main term)."""
        super().__init__()
        if cfg.main not in kind.mains:
            raise ValueError(f"LossConfig.main = {cfg.main!r}: the {kind.name!r} network supports {', '.join(map(repr, kind.mains))}")
        self.cfg, self.scenario, self.kind = cfg, scenario, kind
        self.register_buffer("ema", torch.zeros(len(TERMS), dtype=torch.float64))
        self.register_buffer("ema_count", torch.zeros(len(TERMS), dtype=torch.float64))
        if cfg.uncertainty:
            self.log_var = nn.Parameter(torch.zeros(len(TERMS)))
        else:
            self.log_var = None

    def weights(self, epoch: float) -> dict[str, float]:
        """The nominal weight of every term at (fractional) ``epoch``: weight x ramp (cov is 1)."""
        c = self.cfg
        w = {"cov": 1.0}
        for t in AUX_TERMS:
            w[t] = getattr(c, f"{t}_weight") * ramp(epoch, getattr(c, f"{t}_start"), getattr(c, f"{t}_ramp"))
        return w

    def beta(self, epoch: float) -> float:
        return self.cfg.beta * ramp(epoch, self.cfg.beta_start, self.cfg.beta_ramp)

    def forward(
        self,
        pred: Prediction,
        inputs: ModelInputs,
        options: cv.CovarianceOptions,
        truth: Truth,
        true_factor: Tensor,
        epoch: float,
        *,
        update_stats: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.weights(epoch)
        F = pred.factor
        scenario = inputs.scenario or self.scenario  # the batch's geometry (a family of geometries: TrainConfig.geometries)
        parts: dict[str, Tensor] = {}
        main = self.cfg.main
        w[main] = w.pop("cov")
        parts[main] = self.kind.main_loss(main, pred, inputs, options, truth, true_factor, self.cfg, scenario).mean()
        if main == "detect" and self.cfg.detect_cov_weight > 0:  # part of the main term (LossConfig.detect_cov_weight)
            parts[main] = parts[main] + self.cfg.detect_cov_weight * covariance_main_loss(pred, inputs, options, true_factor).mean()
        if w["raw"] > 0:
            parts["raw"] = raw_nmse(F, true_factor).mean()
        if w["k"] > 0:
            target = (truth.K.to(F.device) - 1).clamp(0, self.scenario.k_max - 1)
            ce = nn.functional.cross_entropy(pred.k_logits.float(), target, reduction="none")
            # over the first looks: a second look's truth is what is left (risloc.nn.train.second_look_view)
            first = torch.ones_like(ce) if inputs.cancel is None else (inputs.cancel.abs().flatten(1).sum(1) == 0).float()
            parts["k"] = (ce * first).sum() / first.sum().clamp(min=1)
        if w["gap"] > 0:
            parts["gap"] = eigengap_loss(F, truth.K).mean()
        if w["sub"] > 0:
            parts["sub"] = subspace_loss(F, true_factor).mean()
        if w["peak"] > 0:
            parts["peak"] = peak_contrast_loss(pred.covariance, truth, scenario, self.cfg.peak_margin).mean()
        if w["orth"] > 0:
            parts["orth"] = orthogonality_loss(F).mean()

        idx = {t: i for i, t in enumerate(TERMS)}
        idx[main] = 0  # every main term takes the slot (and running magnitude) of "cov"
        if update_stats and self.training:
            with torch.no_grad():
                m = self.cfg.balance_momentum
                for t, v in parts.items():
                    i = idx[t]
                    v = v.detach().to(torch.float64)
                    self.ema[i] = torch.where(torch.isfinite(v), m * self.ema[i] + (1 - m) * v, self.ema[i])
                    self.ema_count[i] += 1
        total = torch.zeros((), dtype=torch.float64, device=F.device)
        for t, v in parts.items():
            scale = torch.as_tensor(w[t], dtype=torch.float64, device=F.device)
            if t != main and self.cfg.balance:
                scale = scale * (self._running("cov") / self._running(t).clamp(min=1e-12)).detach()
            term = scale * v.to(torch.float64)
            if self.log_var is not None and w[t] > 0:
                s = self.log_var[idx[t]].to(torch.float64)
                term = torch.exp(-s) * term + s
            total = total + term
        return total, {t: v.detach() for t, v in parts.items()}

    def _running(self, t: str) -> Tensor:
        """Bias-corrected running magnitude of term ``t`` (1 before it has been seen)."""
        i = TERMS.index(t)
        n = self.ema_count[i]
        corr = 1 - self.cfg.balance_momentum ** n
        return torch.where(n > 0, self.ema[i] / corr.clamp(min=1e-12), torch.ones_like(n))


# ----------------------------------------------------------------------------------------------
# the self-test logged at the start of training
# ----------------------------------------------------------------------------------------------
def selftest(inputs: ModelInputs, true_factor: Tensor, options: cv.CovarianceOptions) -> tuple[float, float, float]:
    """``(nmse(R, R), nmse(0, R), dense_check)`` on a batch: must be exactly 0, exactly 1, and the
    relative error of the low-rank Frobenius norm against a dense computation (~1e-6)."""
    with torch.no_grad():
        R = effective(true_factor, inputs, options)
        Z = effective(zero_prediction(true_factor), inputs, options)
        same = covariance_nmse(effective(true_factor.clone(), inputs, options), R, Z).max().item()
        zero = covariance_nmse(Z, R, Z).max().item()
        n = min(len(inputs), 4)
        dense = (Z.dense()[:n].to(torch.complex128) - R.dense()[:n].to(torch.complex128)).abs().square().sum((-2, -1))
        low = frobenius_sq_diff(Z, R)[:n]
        check = ((low - dense).abs() / dense).max().item()
    return same, zero, check


def format_selftest(values: tuple[float, float, float]) -> str:
    same, zero, check = values
    return f"[SELFTEST] nmse(R,R)={same:.3g} nmse(0,R)={zero:.6g} lowrank_vs_dense_rel_err={check:.2g}"
