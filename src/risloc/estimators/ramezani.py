"""The ``ramezani`` estimator: modified (decoupled) near-field MUSIC with sub-RIS smoothing.

Reference: P. Ramezani, A. Kosasih and E. Björnson, "An Efficient Modified MUSIC Algorithm
for RIS-Assisted Near-Field Localization", arXiv:2409.14152 (2024). Source of the facts used
here: only the paper's abstract and the start of its introduction could be retrieved; the
details (anti-diagonal vector of the RIS covariance, virtual steering with doubled phases
α = 2π d_H sinφ cosθ/λ, β = 2π d_V sinθ/λ, overlapping D_H x D_V sub-RIS smoothing, the
least-squares back-projection of the snapshots, and a 1-D distance MUSIC after the 2-D
angle MUSIC) were corroborated from a third-party public re-implementation that cites the
paper's equations. Nothing was copied; this module is written from the model below
(docs/estimators-ramezani.md says what is the paper's and what is risloc's).

Model (docs/model.md). Element e_n = ((i - c_H) d_H, (j - c_V) d_V, 0), n = j N_H + i,
c = (N - 1)/2; the RIS is centro-symmetric: the mirror n' of n (indices N_H-1-i, N_V-1-j) sits
at e_n' = -e_n. With u = (cos θ sin φ, sin θ, cos θ cos φ) and the Fresnel expansion

    a_n(φ, θ, r) ≈ exp(j k u·e_n - j k (|e_n|² - (u·e_n)²) / (2 r)),   k = 2π/λ,

the range term is even in e_n and cancels on the anti-diagonal of R = Σ_k p_k a_k a_kᴴ:

    ȳ_n = R[n, n'] = Σ_k p_k a_n(k) conj(a_n'(k)) ≈ Σ_k p_k exp(j 2π (f_x,k (i - c_H) + f_y,k (j - c_V))),
    f_x = 2 d_H u_x / λ,  f_y = 2 d_V u_y / λ,

i.e. ȳ, arranged as an N_V x N_H grid, is one snapshot of a virtual far-field UPA whose
phase steps are doubled (virtual spacing 2d). (With the exact spherical model the odd,
third-order terms of the path difference survive and bias the angle of close sources.)

1. **Sub-RIS smoothing** (paper): the J = (N_V-D_V+1)(N_H-D_H+1) overlapping D_V x D_H
   sub-grids q_j of ȳ give R_q = (1/J) Σ_j q_j q_jᴴ (D = D_V D_H), rank min(K, J). (ȳ is
   centro-Hermitian, so forward smoothing already includes the backward one.)
2. **Order** K̂ from the eigenvalues of R_q (:func:`risloc.estimators.order.estimate_order`,
   MDL by default, Wax & Kailath 1985, with n = J), bounded below by
   ``min_sources``; or K given.
3. **2-D angle MUSIC** on R_q (paper) with the virtual steering b_d(f) = exp(j 2π (f_x i_d + f_y j_d)):
   ‖E_sᴴ b(f)‖²/D is periodic in f with period 1, so it is evaluated by a zero-padded 2-D FFT
   of the signal eigenvectors E_s on the torus [0, 1)²; the largest local maxima (K̂ x
   ``candidates``) are refined by a shrinking local grid.
4. **Alias resolution** (risloc): with d = λ/2 the virtual spacing is λ, so a peak f maps to
   several directions u_x = λ (f_x + m_x)/(2 d_H), u_y = λ (f_y + m_y)/(2 d_V), m integer. All
   candidates inside the scenario's field of view (plus ``fov_margin``) go to step 5; the one
   with the highest full-covariance MUSIC value wins.
5. **1-D range MUSIC** (paper) for each angle peak on the full N x N covariance:
   r̂ = argmax_r ‖E_sᴴ a(φ̂, θ̂, r)‖² / ‖a‖², E_s the principal eigenvectors of R (K̂ of them in
   the paper; ``full_rank``), a the exact spherical steering (``steering="fresnel"``: the
   paper's approximation), on a grid uniform in 1/r over [r_min, r_max], refined locally.
6. **Selection** (risloc, when ``candidates > 1``): the K̂ candidates with the highest
   full-covariance MUSIC value, one per direction (NMS at half the scenario's minimum
   separation, :func:`risloc.estimators.search.select_peaks`).
7. **Joint refinement** (risloc, ``refine=True``): Levenberg-Marquardt on (φ, θ, 1/r) of the
   same full-covariance MUSIC null spectrum (:func:`risloc.estimators.search.refine_peaks`);
   it removes the Fresnel bias of step 3 at short range.

``variant="paper"`` runs steps 1-5 as published (candidates=1, full_rank=K̂, no refinement,
K̂ from MDL alone); ``variant="risloc"`` (default) adds 4 candidates per source, an 8-dim
full-array subspace, the refinement and K̂ >= 1.

The RIS-domain covariance. The receiver sees y_ℓ = H diag(c_ℓ) x_ℓ + n_ℓ, not x_ℓ. Unless a
covariance is passed (``covariance=``, e.g. the truth for tests), R is
:func:`risloc.covariance.sample_covariance`: the sample covariance of the regularised
per-snapshot back-projections x̂_ℓ = G_ℓᴴ (G_ℓ G_ℓᴴ + ε I)⁻¹ y_ℓ, G_ℓ = H diag(c_ℓ), kept as the
factor U (R = U Uᴴ), so ȳ costs O(N L) and the eigenvectors of R come from the L x L Gram
matrix. It is trace-normalised, which makes the estimator invariant to the scale of y.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import physics
from ..covariance import CovarianceOptions, LowRankCovariance, as_low_rank, dense_to_low_rank, ml_covariance, normalise_trace, sample_covariance
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from . import register, search
from .order import estimate_order, no_energy

__all__ = ["estimate", "anti_diagonal", "smoothed_covariance", "angle_spectrum"]

_TINY = 1e-30


# --------------------------------------------------------------------------------------------
# the decoupled (virtual) array
# --------------------------------------------------------------------------------------------
def _mirror_index(sc: Scenario, device) -> Tensor:
    """n' of every n: the element mirrored through the centre, (N_H-1-i, N_V-1-j)."""
    n = torch.arange(sc.n_elements, device=device)
    i, j = n % sc.n_h, n // sc.n_h
    return (sc.n_v - 1 - j) * sc.n_h + (sc.n_h - 1 - i)


def anti_diagonal(sc: Scenario, R: LowRankCovariance) -> Tensor:
    """ȳ_n = R[n, n'] (n' the mirror of n) as a grid ``[B, N_V, N_H]`` (row j, column i), for R = U Uᴴ + c I."""
    U = R.factor
    mirror = _mirror_index(sc, U.device)
    ybar = (U * U[:, mirror].conj()).sum(-1)
    centre = (mirror == torch.arange(sc.n_elements, device=U.device)).to(ybar.dtype)  # odd N_H and N_V only
    ybar = ybar + R.diag.to(ybar.dtype).view(-1, 1) * centre
    return ybar.view(-1, sc.n_v, sc.n_h)


def smoothed_covariance(ybar: Tensor, sub: tuple[int, int]) -> tuple[Tensor, int]:
    """Sub-RIS smoothing: sub-grids Q ``[B, J, D]`` of ȳ; returns (Q, J) with R_q = Qᵀ conj(Q) / J."""
    dv, dh = sub
    q = ybar.unfold(1, dv, 1).unfold(2, dh, 1)  # [B, Jv, Jh, dv, dh]
    B = q.shape[0]
    J = q.shape[1] * q.shape[2]
    return q.reshape(B, J, dv * dh), J


def _signal_subspace_from_rows(Q: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """Eigen-pairs of R_q = Qᵀ conj(Q)/J via the smaller of the D x D and J x J Gram matrices.

    Returns (eigenvalues [B, p] descending, eigenvectors [B, D, min(k_max, p)]) with p = min(D, J).
    """
    B, J, D = Q.shape
    if D <= J:
        lam, V = torch.linalg.eigh(Q.transpose(1, 2) @ Q.conj() / J)
        lam, V = lam.flip(-1), V.flip(-1)
        return lam, V[..., :k_max]
    A = Q.transpose(1, 2)  # [B, D, J], R_q = A Aᴴ / J
    lam, W = torch.linalg.eigh(A.mH @ A / J)  # [B, J]
    lam, W = lam.flip(-1), W.flip(-1)[..., :k_max]
    E = A @ W  # [B, D, k]
    E = E / torch.linalg.vector_norm(E, dim=1, keepdim=True).clamp(min=_TINY)
    return lam, E


def angle_spectrum(E: Tensor, weight: Tensor, sub: tuple[int, int], grid: int) -> Tensor:
    """‖E_sᴴ b(f)‖²/D on the torus grid f = (g_x, g_y)/grid, ``[B, grid(f_y), grid(f_x)]``.

    ``E`` [B, D, k] (orthonormal columns), ``weight`` [B, k] (1 for the K̂ signal columns, 0 else).
    """
    dv, dh = sub
    B, D, k = E.shape
    e = E.transpose(1, 2).reshape(B, k, dv, dh)
    F = torch.fft.fft2(e, s=(grid, grid))  # Σ_d E_d exp(-j2π f·idx) = conj(E_sᴴ b(f))
    return (F.abs().square() * weight.view(B, k, 1, 1)).sum(1) / D


def _virtual_value(E: Tensor, weight: Tensor, sub: tuple[int, int], fx: Tensor, fy: Tensor) -> Tensor:
    """‖E_sᴴ b(f)‖²/D at arbitrary f; fx, fy ``[B, P]`` -> ``[B, P]``."""
    dv, dh = sub
    jj, ii = torch.meshgrid(
        torch.arange(dv, device=E.device, dtype=fx.dtype), torch.arange(dh, device=E.device, dtype=fx.dtype), indexing="ij"
    )
    phase = 2 * math.pi * (fx.unsqueeze(-1) * ii.reshape(-1) + fy.unsqueeze(-1) * jj.reshape(-1))  # [B, P, D]
    b = torch.polar(torch.ones_like(phase), phase).to(E.dtype)
    proj = (b @ E.conj()).abs().square()  # [B, P, k] = |b·conj(e_k)|² = |e_kᴴ b|²
    return (proj * weight.unsqueeze(1)).sum(-1) / (dv * dh)


def _torus_peaks(S: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest local maxima (8-neighbourhood, periodic) of S [B, G, G]: (gy, gx, valid) each [B, k]."""
    B, G, _ = S.shape
    is_max = torch.ones_like(S, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= S >= torch.roll(S, shifts=(dy, dx), dims=(1, 2))
    masked = torch.where(is_max, S, torch.full_like(S, -1.0)).view(B, -1)
    val, idx = masked.topk(k, dim=-1)
    return idx // G, idx % G, val >= 0


# --------------------------------------------------------------------------------------------
# the full-covariance (range) stage
# --------------------------------------------------------------------------------------------
def _full_value(Es: Tensor, weight: Tensor, phi: Tensor, theta: Tensor, r: Tensor, sc: Scenario, approx: str) -> Tensor:
    """MUSIC value ‖E_sᴴ a‖²/‖a‖² on the full array; Es [B, N, k], angles/ranges [B, ...] -> [B, ...]."""
    a = physics.steering(phi, theta, r, sc, approximation=approx, dtype=Es.dtype)  # [B, ..., N]
    shape = a.shape
    a = a.reshape(shape[0], -1, shape[-1])
    p = (a @ Es.conj()).abs().square()  # [B, P, k]
    val = (p * weight.unsqueeze(1)).sum(-1) / a.abs().square().sum(-1).clamp(min=_TINY)
    return val.reshape(shape[:-1])


def _full_subspace(R: LowRankCovariance, k_max: int) -> Tensor:
    """The k_max principal eigenvectors ``[B, N, k_max]`` of R (zero columns beyond its rank)."""
    _, vecs = R.eigh()
    vecs = vecs[..., :k_max]
    if vecs.shape[-1] < k_max:
        vecs = torch.cat([vecs, vecs.new_zeros(vecs.shape[0], vecs.shape[1], k_max - vecs.shape[-1])], -1)
    return vecs


# --------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------
@register("ramezani")
def estimate(
    scenes: Scenes,
    *,
    covariance: Tensor | LowRankCovariance | None = None,
    n_sources: int | Tensor | None = None,
    sub_ris: tuple[int, int] | int = (8, 8),
    order_rule: str = "mdl",
    grid: int = 128,
    range_points: int = 32,
    steering: str = "exact",
    fov_margin: float = math.radians(2.0),
    variant: str = "risloc",
    refine: bool | None = None,
    candidates: int | None = None,
    full_rank: int | None | str = "auto",
    min_sources: int | None = None,
    regularisation: float = 1e-2,
    options: CovarianceOptions = CovarianceOptions(),
) -> Estimates:
    """Ramezani–Kosasih–Björnson modified MUSIC (arXiv:2409.14152), batched over scenes.

    Options:
      covariance: a RIS-domain covariance to use instead of the sample covariance of the
        back-projected snapshots: a dense ``[S, N, N]`` matrix, a factor F ``[S, N, r]``
        (R = F Fᴴ, e.g. ``risloc.source_factor(truth, scenario)``) or a
        :class:`~risloc.covariance.LowRankCovariance`.
      n_sources: known K (int or ``[S]`` tensor) instead of the order rule; the answer then has
        exactly that many sources per scene (``risloc.locate(..., K=...)`` routes K here).
      sub_ris: sub-RIS size (D_V, D_H) of the spatial smoothing (int: square).
      order_rule: risloc.estimators.order rule for K̂ on the eigenvalues of the smoothed covariance
        ('mdl', 'aic' or 'eigengap'; n = J sub-RISs as snapshots).
      grid: FFT size per axis of the 2-D angle (virtual-frequency) spectrum.
      range_points: points of the 1-D range grid (uniform in 1/r on [r_min, r_max]).
      steering: 'exact' (docs/model.md) or 'fresnel' (the paper's approximation) for the range stage.
      fov_margin: how far outside the scenario's field of view [rad] an alias may lie and still count.
      variant: 'risloc' (default) or 'paper'; sets the defaults of the next four options:
        'paper' = (refine=False, candidates=1, full_rank=None, min_sources=0), the published
        pipeline; 'risloc' = (True, 4, 8, 1), tuned for the noisy back-projected covariance.
      refine: add a local joint (φ, θ, r) refinement on the full-covariance MUSIC spectrum (not in the paper).
      full_rank: principal eigenvectors of the full covariance used by the range stage, the
        selection and the refinement (None: K̂, the paper's MUSIC).
      min_sources: lower bound on K̂ (the order rule often says 0 on sample covariances).
      candidates: angle peaks examined per wanted source (1: the paper's pipeline; more: the
        K̂ best by full-covariance MUSIC value are kept, one per direction — risloc's adaptation).
      regularisation: relative Tikhonov term ε of the back-projection (risloc.covariance.sample_covariance).
      options: ``options.estimate`` chooses the covariance when none is given: 'ml' (default, the
        maximum-likelihood low-rank fit of the measurements, risloc.covariance.ml_covariance) or
        'back_projection' (the sample covariance of the back-projected snapshots).

    One batch of scenes (the registry chunks them, 256 per call by default: ``risloc.locate``).

    Returns :class:`~risloc.scenes.Estimates` (K̂ ≤ k_max; NaN only after K̂).
    """
    sc = scenes.scenario
    S = len(scenes)
    N = sc.n_elements
    sub = (sub_ris, sub_ris) if isinstance(sub_ris, int) else tuple(int(s) for s in sub_ris)
    if len(sub) != 2 or not (1 <= sub[0] <= sc.n_v and 1 <= sub[1] <= sc.n_h):
        raise ValueError(f"sub_ris={sub_ris}: must be (D_V, D_H) within the {sc.n_v} x {sc.n_h} RIS")
    if steering not in ("exact", "fresnel"):
        raise ValueError(f"steering must be 'exact' or 'fresnel', not {steering!r}")
    presets = {"paper": (False, 1, None, 0), "risloc": (True, 4, 8, 1)}
    if variant not in presets:
        raise ValueError(f"variant must be one of {sorted(presets)}, not {variant!r}")
    d_refine, d_cand, d_rank, d_min = presets[variant]
    refine = d_refine if refine is None else bool(refine)
    candidates = d_cand if candidates is None else int(candidates)
    full_rank = d_rank if full_rank == "auto" else full_rank
    min_sources = d_min if min_sources is None else int(min_sources)
    if full_rank is not None and not 1 <= int(full_rank) <= N:
        raise ValueError(f"full_rank={full_rank}: must be None or in 1..{N}")
    if not 0 <= min_sources <= sc.k_max:
        raise ValueError(f"min_sources={min_sources}: must be in 0..{sc.k_max}")
    if candidates < 1:
        raise ValueError(f"candidates={candidates}: must be >= 1")
    if grid < 8 or range_points < 2:
        raise ValueError(f"grid={grid} (>= 8), range_points={range_points} (>= 2)")
    if scenes.y.ndim != 3 or scenes.H.shape[-1] != N or scenes.codes.shape[-1] != N:
        raise ValueError(f"scenes: expected y [S, L, M], H [S, M, {N}], codes [S, L, {N}]")
    R_all = None
    if covariance is not None:
        if isinstance(covariance, Tensor) and covariance.dim() == 3 and tuple(covariance.shape[1:]) == (N, N):
            R_all = dense_to_low_rank(covariance)
        else:
            R_all = as_low_rank(covariance)
        if tuple(R_all.factor.shape[:2]) != (S, N):
            raise ValueError(f"covariance: expected {S} scenes of {N} elements, got factor shape {tuple(R_all.factor.shape)}")
    if n_sources is not None:
        n_sources = torch.as_tensor(n_sources, device=scenes.device).to(torch.int64).expand(S)
    if S == 0:
        return Estimates.empty(0, sc.k_max, method="ramezani", device=scenes.device)
    K_in = n_sources
    if R_all is None:
        if options.estimate == "ml":
            fit = ml_covariance(scenes.y, scenes.H, scenes.codes, sc, K=n_sources, options=options)
            R = fit.covariance()
            if n_sources is None:  # K-hat is the rank the order rule chose for the estimate
                K_in = (fit.factor.abs().sum(1) > 0).sum(-1).clamp(min=min_sources)
                K_in = torch.where(no_energy(scenes.y), torch.zeros_like(K_in), K_in)  # no measurement energy: no source
        else:
            R = sample_covariance(scenes.y, scenes.H, scenes.codes, regularisation=regularisation)
    else:
        R = R_all
    est = _estimate_chunk(
        sc, normalise_trace(R), K_in, n_sources is not None, sub, order_rule, grid, range_points, steering, fov_margin,
        refine, candidates, full_rank, min_sources,
    )
    est.method = "ramezani"
    return est


def _estimate_chunk(sc, R, n_sources, exact, sub, order_rule, grid, range_points, approx, margin, refine, candidates, full_rank,
                    min_sources):
    """One batch; ``n_sources`` ``[B]``: a K to use instead of the order rule, the answer's K when
    ``exact`` (a known K), else an estimate (clipped to the subspace and to the peaks kept)."""
    B = R.factor.shape[0]
    dev = R.factor.device
    k_max = sc.k_max
    rdtype = physics.real_dtype(R.factor.dtype)

    # --- steps 1-2: anti-diagonal, sub-RIS smoothing, order -----------------------------------
    ybar = anti_diagonal(sc, R)
    Q, J = smoothed_covariance(ybar, sub)
    lam_q, Eq = _signal_subspace_from_rows(Q, k_max)
    kq = Eq.shape[-1]
    if n_sources is not None and exact:  # a known K is the answer's K (at most k_max)
        K = n_sources.clamp(0, k_max)
    elif n_sources is not None:
        K = n_sources.clamp(0, min(k_max, kq))
    else:
        K = estimate_order(lam_q.clamp(min=0), J, rule=order_rule, k_max=min(k_max, kq), k_min=min(min_sources, kq))

    if int(K.max()) == 0:
        return Estimates.empty(B, k_max, method="ramezani", device=dev)
    kc = int(K.max())  # the widest scene of this chunk (every scene uses only its own K slots)
    wq = (torch.arange(kq, device=dev).view(1, -1) < K.view(-1, 1)).to(rdtype)

    # --- step 3: 2-D virtual-frequency MUSIC on the torus ----------------------------------------
    # K * candidates angle peaks per scene: the strongest P of the torus, those beyond a scene's own
    # count marked invalid (so a scene's answer does not depend on the other scenes of the batch)
    P = min(kc * candidates, grid * grid)
    Sg = angle_spectrum(Eq, wq, sub, grid)  # [B, G, G]
    gy, gx, ok = _torus_peaks(Sg, P)  # [B, P]
    ok = ok & (torch.arange(P, device=dev).view(1, -1) < (K * candidates).view(-1, 1))
    fx, fy = gx.to(rdtype) / grid, gy.to(rdtype) / grid
    h = 1.0 / grid
    off = torch.linspace(-1, 1, 5, device=dev, dtype=rdtype)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    ox, oy = ox.reshape(-1), oy.reshape(-1)
    for _ in range(6):
        cx = fx.unsqueeze(-1) + h * ox  # [B, P, 25]
        cy = fy.unsqueeze(-1) + h * oy
        v = _virtual_value(Eq, wq, sub, cx.reshape(B, -1), cy.reshape(B, -1)).view(B, P, -1)
        best = v.argmax(-1, keepdim=True)
        fx, fy = cx.gather(-1, best).squeeze(-1), cy.gather(-1, best).squeeze(-1)
        h = h / 2.5

    # --- step 4: alias candidates in the field of view -------------------------------------------
    phi_c, theta_c, cvalid = _alias_candidates(fx, fy, sc, margin)  # [B, P, C], valid ones first
    C = max(1, int(cvalid.sum(-1).max()))
    phi_c, theta_c, cvalid = phi_c[..., :C], theta_c[..., :C], cvalid[..., :C] & ok.unsqueeze(-1)

    # --- step 5: 1-D range MUSIC on the full covariance ------------------------------------------
    if full_rank is None:  # the paper: the K̂ principal eigenvectors
        Es = _full_subspace(R, kc)
        wf = (torch.arange(kc, device=dev).view(1, -1) < K.view(-1, 1)).to(rdtype)
    else:  # a fixed number of principal eigenvectors (risloc's option for noisy sample covariances)
        Es = _full_subspace(R, full_rank)
        wf = torch.ones(B, full_rank, device=dev, dtype=rdtype)
    inv_r = torch.linspace(1 / sc.r_max, 1 / sc.r_min, range_points, device=dev, dtype=rdtype)
    R_grid = (1 / inv_r).view(1, 1, 1, -1).expand(B, P, C, -1)
    val = _full_value(Es, wf, phi_c.unsqueeze(-1).expand_as(R_grid), theta_c.unsqueeze(-1).expand_as(R_grid), R_grid, sc, approx)
    val = torch.where(cvalid.unsqueeze(-1), val, torch.full_like(val, -1.0))  # [B, P, C, G]
    flat = val.reshape(B, P, -1).argmax(-1)
    ci, ri = flat // range_points, flat % range_points
    phi = phi_c.gather(-1, ci.unsqueeze(-1)).squeeze(-1)  # [B, P]
    theta = theta_c.gather(-1, ci.unsqueeze(-1)).squeeze(-1)
    q = inv_r[ri]
    dq = inv_r[1] - inv_r[0]
    q_lo, q_hi = 1 / sc.r_max, 1 / sc.r_min
    off1 = torch.linspace(-1, 1, 9, device=dev, dtype=rdtype)
    for _ in range(5):
        cq = (q.unsqueeze(-1) + dq * off1).clamp(q_lo, q_hi)  # [B, P, 9]
        v = _full_value(Es, wf, phi.unsqueeze(-1).expand_as(cq), theta.unsqueeze(-1).expand_as(cq), 1 / cq, sc, approx)
        vbest, best = v.max(-1, keepdim=True)
        q = cq.gather(-1, best).squeeze(-1)
        dq = dq / 4
    r = 1 / q
    qnull = 1 - vbest.squeeze(-1)  # MUSIC null spectrum 1 - |E_sᴴ â|² at each candidate

    # --- selection: the K̂ best angle peaks by full-covariance MUSIC value, one per direction -------
    sep = sc.min_separation / 2 if sc.min_separation > 0 else math.radians(1.0)
    phi, theta, r, qnull, kept = search.select_peaks(phi, theta, r, qnull, ok, min_separation=sep)
    phi, theta, r, qnull, kept = phi[:, :kc], theta[:, :kc], r[:, :kc], qnull[:, :kc], kept[:, :kc]
    kept = kept & (torch.arange(kc, device=dev).view(1, -1) < K.view(-1, 1))  # each scene's own K best

    # --- step 6 (optional): joint local refinement (risloc.estimators.search), then NMS again ------
    if refine:
        spec = search.NullSpectrum.weighted(Es, wf)
        grid3 = search.search_grid(sc, search.GridSpec(approximation=approx), device=dev, dtype=Es.dtype)
        phi, theta, r, qnull = search.refine_peaks(spec, phi, theta, 1 / r, sc, grid3, approximation=approx)
        phi, theta, r, qnull = phi.to(rdtype), theta.to(rdtype), r.to(rdtype), qnull.to(rdtype)
        phi, theta, r, qnull, kept = search.select_peaks(phi, theta, r, qnull, kept, min_separation=sep)
    if not exact:  # an estimated K: only the peaks that survived the suppression
        K = torch.minimum(K, kept.to(torch.int64).cumprod(-1).sum(-1))

    active = torch.arange(kc, device=dev).view(1, -1) < K.view(-1, 1)
    pad = lambda t: torch.cat([torch.where(active, t, torch.full_like(t, float("nan"))), t.new_full((B, k_max - kc), float("nan"))], -1)
    return Estimates(K=K.to(torch.int64), phi=pad(phi), theta=pad(theta), r=pad(r), method="ramezani")


def _alias_candidates(fx: Tensor, fy: Tensor, sc: Scenario, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """Directions (φ, θ) ``[B, k, C]`` whose virtual frequency is (fx, fy) mod 1, and which are usable.

    u_x = λ (fx + m_x)/(2 d_H), u_y = λ (fy + m_y)/(2 d_V), m integer, |u| < 1. Candidates inside
    the field of view widened by ``margin`` are valid; if none is, the closest one is kept.
    """
    lam = sc.wavelength
    mx_max = int(math.ceil(2 * sc.spacing_h / lam)) + 1
    my_max = int(math.ceil(2 * sc.spacing_v / lam)) + 1
    mx = torch.arange(-mx_max, mx_max + 1, device=fx.device, dtype=fx.dtype)
    my = torch.arange(-my_max, my_max + 1, device=fx.device, dtype=fx.dtype)
    MY, MX = torch.meshgrid(my, mx, indexing="ij")
    ux = lam * (fx.unsqueeze(-1) + MX.reshape(-1)) / (2 * sc.spacing_h)  # [B, k, C0]
    uy = lam * (fy.unsqueeze(-1) + MY.reshape(-1)) / (2 * sc.spacing_v)
    uz2 = 1 - ux * ux - uy * uy
    visible = uz2 > 0
    uz = uz2.clamp(min=1e-12).sqrt()
    phi = torch.atan2(ux, uz)
    theta = torch.asin(uy.clamp(-1, 1))
    out = (
        (sc.phi_min - phi).clamp(min=0) + (phi - sc.phi_max).clamp(min=0)
        + (sc.theta_min - theta).clamp(min=0) + (theta - sc.theta_max).clamp(min=0)
    )
    out = torch.where(visible, out, torch.full_like(out, 1e3))
    C = min(4, out.shape[-1])
    dist, idx = out.topk(C, dim=-1, largest=False)  # closest first
    phi, theta = phi.gather(-1, idx), theta.gather(-1, idx)
    valid = dist <= margin
    valid[..., 0] = True  # always keep the closest one
    # bring slightly-outside candidates back onto the field of view's edge
    phi = phi.clamp(sc.phi_min - margin, sc.phi_max + margin)
    theta = theta.clamp(sc.theta_min - margin, sc.theta_max + margin)
    return phi, theta, valid
