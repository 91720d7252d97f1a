"""RIS-domain covariances: the sample covariance of a scene and THE effective-covariance builder.

Every consumer of a covariance in risloc (MUSIC/MVDR, the learned pipeline's loss,
its validation and its inference) calls :func:`effective_covariance` with the same
arguments, so that training, evaluation and inference see the same matrix
("train == eval == infer").

Structure. Every effective covariance here is *low rank plus a scaled identity*::

    R = U U^H + c I,      U in C^{N x r} (r = K_max + L at most),  c >= 0,

(a rank-K_max predicted factor, a rank-L sample covariance, diagonal loading and
shrinkage towards the identity). :class:`LowRankCovariance` keeps that form, so its
eigen-decomposition costs one r x r Hermitian eigenproblem on the Gram matrix U^H U
instead of an N x N one (N = 144): if ``U^H U = V diag(lam) V^H`` then the non-trivial
eigenpairs of R are ``(lam_i + c, U v_i / sqrt(lam_i))`` and every other eigenvalue is c.

The builder (:func:`effective_covariance`), step by step, for a prediction R_pred and a
sample covariance R_samp (both optional)::

    1. Hermitian           (a factor form U U^H is Hermitian by construction)
    2. trace-normalised    R <- N R / tr(R)   (average eigenvalue 1; a zero R stays zero)
    3. hybrid blend        R <- (1 - beta) R_pred + beta R_samp          (each normalised)
    4. diagonal loading    R <- R + delta I
    5. SNR-aware shrinkage R <- (1 - alpha) R + alpha (tr(R)/N) I,   alpha = gamma / (1 + snr)

with ``snr`` the scene's linear SNR (estimated from the snapshots when not given).
Step 5 mimics what noise does to a covariance (the noise share of the total power is
1/(1 + snr)), so a noise-free prediction and a noisy sample covariance are compared
and searched on the same footing; at high SNR it vanishes, at low SNR it keeps the
noise subspace well conditioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import physics
from .cuda_graphs import cache_entry, register_cache


@dataclass
class LowRankCovariance:
    """``R = U U^H + c I`` for a batch: ``factor`` U ``[B, N, r]``, ``diag`` c ``[B]`` (real, >= 0)."""

    factor: Tensor
    diag: Tensor

    @property
    def n(self) -> int:
        return self.factor.shape[-2]

    def trace(self) -> Tensor:
        """``tr R = |U|_F^2 + c N``, ``[B]``."""
        return self.factor.abs().square().sum((-2, -1)) + self.diag * self.n

    def dense(self) -> Tensor:
        """The full ``[B, N, N]`` matrix (for tests, plots and small batches)."""
        eye = torch.eye(self.n, dtype=self.factor.dtype, device=self.factor.device)
        return self.factor @ self.factor.mH + self.diag.view(-1, 1, 1).to(self.factor.dtype) * eye

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Non-trivial eigenpairs via the Gram matrix: eigenvalues ``[B, r]`` (descending) and
        orthonormal eigenvectors ``[B, N, r]``; all other eigenvalues of R equal ``diag``.

        The Gram matrix, its r x r eigenproblem and the eigenvectors are computed in double
        precision (the vectors returned in the factor's): a float32 Gram product rounds
        differently with r, so zero columns (a batch padded to its widest factor) moved MUSIC's
        sources by up to 0.6 sqrt(CRB). Directions with a (numerically) zero Gram eigenvalue
        carry no information; their vectors are set to zero and their eigenvalue to ``diag``.
        """
        U = self.factor.to(torch.complex128)
        gram = U.mH @ U
        lam, V = torch.linalg.eigh(gram)  # ascending
        lam, V = lam.flip(-1), V.flip(-1)
        scale = lam.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
        good = lam > scale * 1e-10
        inv_sqrt = torch.where(good, lam.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
        vecs = (U @ (V * inv_sqrt.unsqueeze(-2))).to(self.factor.dtype)
        values = torch.where(good, lam, torch.zeros_like(lam)).to(self.diag.dtype) + self.diag.unsqueeze(-1)
        return values, vecs

    def eigenvalues(self, n_values: int | None = None) -> Tensor:
        """The largest ``n_values`` eigenvalues of R (descending, padded with ``diag``), ``[B, n_values]``."""
        values, _ = self.eigh()
        n_values = n_values or self.n
        r = values.shape[-1]
        if n_values <= r:
            return values[..., :n_values]
        pad = self.diag.unsqueeze(-1).expand(-1, n_values - r)
        return torch.cat([values, pad], -1)

    def signal_subspace(self, k: int) -> Tensor:
        """Orthonormal basis ``[B, N, k]`` of the k dominant eigenvectors (k <= rank of U)."""
        _, vecs = self.eigh()
        if k > vecs.shape[-1]:
            raise ValueError(f"signal_subspace: k = {k} exceeds the factor rank {vecs.shape[-1]}")
        return vecs[..., :k]

    def scale(self, s: Tensor) -> "LowRankCovariance":
        """``s R`` for a per-scene real scale ``s`` ``[B]`` (>= 0)."""
        return LowRankCovariance(self.factor * s.sqrt().view(-1, 1, 1).to(self.factor.dtype), self.diag * s)

    def add_identity(self, c: Tensor) -> "LowRankCovariance":
        """``R + c I`` (``c`` ``[B]`` or scalar)."""
        return LowRankCovariance(self.factor, self.diag + c)

    def blend(self, other: "LowRankCovariance", beta: Tensor | float) -> "LowRankCovariance":
        """``(1 - beta) R + beta R_other`` (columns concatenated; ``beta`` scalar or ``[B]``)."""
        beta = torch.as_tensor(beta, dtype=self.diag.dtype, device=self.diag.device).expand_as(self.diag)
        a = self.scale(1 - beta)
        b = other.scale(beta)
        return LowRankCovariance(torch.cat([a.factor, b.factor], -1), a.diag + b.diag)


def as_low_rank(R: Tensor | LowRankCovariance) -> LowRankCovariance:
    """Accept a factor ``[B, N, r]`` (R = F F^H) or a :class:`LowRankCovariance`.

    A dense ``[B, N, N]`` matrix is refused: factor it once (``dense_to_low_rank``) so the
    hot paths never see an N x N eigenproblem.
    """
    if isinstance(R, LowRankCovariance):
        return R
    if not torch.is_tensor(R) or R.dim() != 3:
        raise ValueError(f"expected a covariance factor [B, N, r] or LowRankCovariance, got {type(R).__name__}")
    if not R.is_complex():
        R = R.to(physics.complex_dtype(R.dtype))
    return LowRankCovariance(R, torch.zeros(R.shape[0], dtype=physics.real_dtype(R.dtype), device=R.device))


def dense_to_low_rank(R: Tensor, rank: int | None = None) -> LowRankCovariance:
    """Factor a dense Hermitian PSD ``[B, N, N]`` matrix (made Hermitian first) with one full
    eigendecomposition: the top ``rank`` eigenpairs go into U, the mean of the rest into c.
    """
    R = 0.5 * (R + R.mH)
    lam, V = torch.linalg.eigh(R)
    lam, V = lam.flip(-1).clamp(min=0), V.flip(-1)
    n = R.shape[-1]
    rank = n if rank is None else rank
    rest = lam[..., rank:].mean(-1) if rank < n else torch.zeros_like(lam[..., 0])
    U = V[..., :rank] * (lam[..., :rank] - rest.unsqueeze(-1)).clamp(min=0).sqrt().unsqueeze(-2).to(V.dtype)
    return LowRankCovariance(U, rest)


def normalise_trace(R: LowRankCovariance) -> LowRankCovariance:
    """``N R / tr R`` per scene (a zero matrix stays zero)."""
    tr = R.trace()
    tiny = torch.finfo(tr.dtype).tiny
    return R.scale(torch.where(tr > tiny, R.n / tr.clamp(min=tiny), torch.zeros_like(tr)))


# ----------------------------------------------------------------------------------------------
# Sample covariance from the snapshots
# ----------------------------------------------------------------------------------------------
def back_project(y: Tensor, H: Tensor, codes: Tensor, *, regularisation: float = 1e-2) -> Tensor:
    """Regularised minimum-norm back-projection of each snapshot to the RIS domain, ``[B, L, N]``::

        x_hat_l = G_l^H (G_l G_l^H + eps_l I_M)^{-1} y_l,     G_l = H diag(c_l),
        eps_l = regularisation * tr(G_l G_l^H) / M.

    Only the M-dimensional row space of G_l is seen per snapshot (M = 16 < N = 144), so
    ``x_hat_l ~ P_l x_l + noise`` with P_l the projector on that row space.
    """
    B, L, M = y.shape
    G = physics.measurement_matrix(H, codes)  # [B, L, M, N]
    gram = G @ G.mH  # [B, L, M, M]
    eps = regularisation * torch.diagonal(gram, dim1=-2, dim2=-1).real.sum(-1) / M  # [B, L]
    eye = torch.eye(M, dtype=gram.dtype, device=gram.device)
    z = torch.linalg.solve(gram + eps[..., None, None].to(gram.dtype) * eye, y.unsqueeze(-1))  # [B, L, M, 1]
    return (G.mH @ z).squeeze(-1)


def sample_covariance(y: Tensor, H: Tensor, codes: Tensor, *, regularisation: float = 1e-2) -> LowRankCovariance:
    """Sample covariance of the back-projected snapshots, ``R_samp = (1/L) sum_l x_hat_l x_hat_l^H``,
    kept as its rank-L factor ``U = [x_hat_1, ..., x_hat_L] / sqrt(L)``.

    Choice and bias. The per-snapshot problem is under-determined (M < N), so each
    snapshot is mapped back by the regularised minimum-norm inverse of G_l. Then
    ``E[R_samp] ~ (1/L) sum_l P_l R P_l + noise``: because the random RIS codes spread the
    row spaces of G_l over the whole RIS, the average of P_l R P_l is close to
    ``a R + b tr(R) I`` (a ~ (M/N)^2): the *eigenvectors* of R are kept but the signal
    eigenvalues are shrunk and a floor is added, and with L = 16 snapshots the estimate
    has rank <= 16 and is noisy. It is invariant to a global gain on y up to scale, which
    the trace normalisation of the builder removes. Why this choice: it is linear in the
    data, cheap (one M x M solve per snapshot), differentiable, and its bias is a
    multiple of the identity in expectation — harmless for subspace methods.
    """
    x_hat = back_project(y, H, codes, regularisation=regularisation)  # [B, L, N]
    L = y.shape[1]
    U = x_hat.transpose(1, 2) / math.sqrt(L)
    return LowRankCovariance(U, torch.zeros(U.shape[0], dtype=physics.real_dtype(U.dtype), device=U.device))


def estimate_snr_db(y: Tensor, H: Tensor, codes: Tensor, *, rank: int = 5, regularisation: float = 1e-2) -> Tensor:
    """A data-only SNR estimate [dB] ``[B]`` for when the SNR label is missing.

    Heuristic (documented bias): take the ``rank`` dominant eigenvectors E of the sample
    covariance, fit each snapshot inside that subspace, ``y_l ~ G_l E w_l`` (least squares),
    and read the noise power off the residual, ``sigma^2 = sum_l |res_l|^2 / (L (M - rank))``;
    then ``SNR = (mean_l |y_l|^2 / M - sigma^2) / sigma^2``. E is only an estimate of the
    source subspace, so some signal leaks into the residual and the subspace fits some noise: the
    estimate is compressed towards the middle (medians of 40 default scenes: -5 dB reads 6 dB, 20 dB
    reads 14 dB), i.e. it ranks scenes by SNR rather than measuring it. Clamped to [-20, 50] dB. The subspace has
    at most min(M, L) - 1 dimensions (at least 1): with fewer snapshots than ``rank`` the sample
    covariance has rank L, and a subspace of all L snapshots would fit the noise too. With few
    snapshots the bias grows (40 scenes per level: L = 2 reads -5 / 20 dB as 4 / 12 dB, L = 4 as
    12 / 20 dB); with one snapshot the subspace is that snapshot and the estimate saturates high
    (about 30 dB whatever the SNR): give such scenes their SNR labels.
    """
    B, L, M = y.shape
    rank = max(1, min(rank, M - 1, L - 1))
    E = sample_covariance(y, H, codes, regularisation=regularisation).signal_subspace(rank)  # [B, N, rank]
    GE = physics.measurement_matrix(H, codes) @ E.unsqueeze(1)  # [B, L, M, rank]
    w = torch.linalg.lstsq(GE, y.unsqueeze(-1)).solution if y.device.type == "cpu" else torch.linalg.pinv(GE) @ y.unsqueeze(-1)
    res = y.unsqueeze(-1) - GE @ w
    noise = res.abs().square().sum((1, 2, 3)) / (L * (M - rank))
    total = y.abs().square().sum((1, 2)) / (L * M)
    tiny = torch.finfo(noise.dtype).tiny
    snr = (total - noise).clamp(min=tiny) / noise.clamp(min=tiny)
    return (10 * torch.log10(snr)).clamp(-20.0, 50.0)


def labelled_snr_db(snr_db: Tensor | None, y: Tensor, H: Tensor, codes: Tensor, *, regularisation: float = 1e-2) -> Tensor:
    """The SNR labels ``snr_db`` ``[B]`` [dB] with each missing one (a NaN entry; every one when
    ``snr_db`` is None) replaced by :func:`estimate_snr_db`, which runs only where a label is missing
    (one host read to know it)."""
    if snr_db is None:
        return estimate_snr_db(y, H, codes, regularisation=regularisation)
    missing = ~torch.isfinite(snr_db)
    if not bool(missing.any()):
        return snr_db
    return torch.where(missing, estimate_snr_db(y, H, codes, regularisation=regularisation).to(snr_db.dtype), snr_db)


def shrinkage_weight(snr_db: Tensor, strength: float = 1.0) -> Tensor:
    """alpha = strength / (1 + 10^(SNR/10)), clamped to [0, 1]: the noise share of the total power."""
    return (strength / (1 + 10 ** (snr_db / 10))).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# THE builder
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CovarianceOptions:
    """Knobs of the effective covariance (shared by loss, validation and inference)."""

    beta: float = 0.0
    """Hybrid blend weight of the scene's own sample covariance, in [0, 1]."""
    loading: float = 1e-3
    """Diagonal loading delta, relative to the average eigenvalue (the trace is normalised to N)."""
    shrinkage: float = 1.0
    """Strength gamma of the SNR-aware shrinkage alpha = gamma / (1 + snr); 0 disables it."""
    regularisation: float = 1e-2
    """Relative Tikhonov term of the per-snapshot back-projection (sample covariance)."""
    estimate: str = "ml"
    """Covariance of the classical estimators (:func:`scene_covariance`): 'ml' (the maximum-
    likelihood low-rank fit of the measurements, :func:`ml_covariance`) or 'back_projection'
    (:func:`sample_covariance`). :func:`effective_covariance` itself always uses the latter
    for its sample term."""
    rank_rule: str = "mdl"
    """Order rule choosing the rank of the 'ml' estimate (:func:`risloc.estimators.order.likelihood_order`)."""
    prior_energy: float = 0.99
    """The 'ml' factor lives in the span of the scenario's steering vectors holding this share of
    their power (:func:`prior_subspace`; 1 = no restriction)."""
    em_iterations: int = 30
    """EM steps of each rank-k fit of the 'ml' estimate (:func:`fit_factor`)."""

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"CovarianceOptions.beta = {self.beta}: must be in [0, 1]")
        if self.loading < 0:
            raise ValueError(f"CovarianceOptions.loading = {self.loading}: must be >= 0")
        if self.shrinkage < 0:
            raise ValueError(f"CovarianceOptions.shrinkage = {self.shrinkage}: must be >= 0")
        if self.estimate not in ("ml", "back_projection"):
            raise ValueError(f"CovarianceOptions.estimate = {self.estimate!r}: must be 'ml' or 'back_projection'")
        if not 0.0 < self.prior_energy <= 1.0:
            raise ValueError(f"CovarianceOptions.prior_energy = {self.prior_energy}: must be in (0, 1]")
        if self.em_iterations < 0:
            raise ValueError(f"CovarianceOptions.em_iterations = {self.em_iterations}: must be >= 0")


def effective_covariance(
    prediction: Tensor | LowRankCovariance | None = None,
    *,
    sample: LowRankCovariance | None = None,
    snr_db: Tensor | None = None,
    options: CovarianceOptions = CovarianceOptions(),
    y: Tensor | None = None,
    H: Tensor | None = None,
    codes: Tensor | None = None,
) -> LowRankCovariance:
    """Build the effective covariance (see the module docstring for the five steps).

    Args:
        prediction: a factor F ``[B, N, r]`` (R_pred = F F^H) or a :class:`LowRankCovariance`;
            ``None`` uses the sample covariance alone (the classical estimators).
        sample: the scene's sample covariance; computed from ``y, H, codes`` when those are
            given, it is needed when ``beta > 0`` or ``prediction is None``.
        snr_db: per-scene SNR ``[B]``; when ``None`` and shrinkage is on, it is estimated
            from ``y, H, codes`` with :func:`estimate_snr_db`.
        options: beta, loading, shrinkage strength, back-projection regularisation.

    Returns a :class:`LowRankCovariance` (differentiable w.r.t. ``prediction``).
    """
    need_sample = prediction is None or options.beta > 0
    if sample is None and need_sample:
        if y is None or H is None or codes is None:
            raise ValueError("effective_covariance: the sample covariance is needed (beta > 0 or no prediction); pass sample= or y, H, codes")
        sample = sample_covariance(y, H, codes, regularisation=options.regularisation)

    if prediction is None:
        R = normalise_trace(sample)
    else:
        R = normalise_trace(as_low_rank(prediction))
        if options.beta > 0:
            R = R.blend(normalise_trace(sample), options.beta)

    if options.loading > 0:
        R = R.add_identity(torch.full_like(R.diag, options.loading))

    if options.shrinkage > 0:
        if snr_db is None:
            if y is None or H is None or codes is None:
                raise ValueError("effective_covariance: shrinkage needs snr_db or (y, H, codes) to estimate it")
            snr_db = estimate_snr_db(y, H, codes, regularisation=options.regularisation)
        alpha = shrinkage_weight(snr_db.to(R.diag.dtype).to(R.diag.device), options.shrinkage)
        mean_eig = R.trace() / R.n
        R = R.scale(1 - alpha).add_identity(alpha * mean_eig)
    return R


def scene_covariance(
    scenes, *, options: CovarianceOptions = CovarianceOptions(), use_snr: bool = True, K: Tensor | int | None = None
) -> LowRankCovariance:
    """The classical estimators' effective covariance of a :class:`~risloc.scenes.Scenes` batch.

    ``options.estimate == 'ml'`` (default): the maximum-likelihood low-rank estimate of the
    RIS-domain covariance (:func:`ml_covariance`; its rank from ``options.rank_rule``, or ``K``
    ``[B]`` / an int when the number of sources is known), fed to :func:`effective_covariance`
    as its prediction; the SNR of the shrinkage is the scene's label when ``use_snr`` and
    present (a NaN label: that scene has none), else the fit's own (signal power over its noise
    variance).
    ``'back_projection'``: the sample covariance of the back-projected snapshots
    (:func:`sample_covariance`), the SNR label or :func:`estimate_snr_db`.
    """
    snr = scenes.snr_db if use_snr else None
    if options.estimate == "back_projection":
        if snr is not None:
            snr = labelled_snr_db(snr, scenes.y, scenes.H, scenes.codes, regularisation=options.regularisation)
        return effective_covariance(None, snr_db=snr, options=options, y=scenes.y, H=scenes.H, codes=scenes.codes)
    fit = ml_covariance(scenes.y, scenes.H, scenes.codes, scenes.scenario, K=K, options=options)
    L, M = scenes.y.shape[1], scenes.y.shape[2]
    power = scenes.y.abs().square().sum((1, 2)) / (L * M)
    tiny = torch.finfo(power.dtype).tiny
    own = 10 * torch.log10(((power - fit.noise_var).clamp(min=tiny) / fit.noise_var.clamp(min=tiny))).clamp(-20.0, 50.0)
    snr = own if snr is None else torch.where(torch.isfinite(snr), snr.to(own.dtype), own)
    return effective_covariance(fit.factor, snr_db=snr, options=options, y=scenes.y, H=scenes.H, codes=scenes.codes)


# ----------------------------------------------------------------------------------------------
# Maximum-likelihood estimate of the RIS-domain covariance from the measurements
# ----------------------------------------------------------------------------------------------
_PRIOR_CACHE: dict = register_cache({})  # graphs keep what they read from it (risloc.cuda_graphs)


def prior_subspace(scenario, *, energy: float = 0.99, device=None, dtype: torch.dtype = torch.complex128) -> Tensor:
    """Orthonormal basis ``[N, d]`` of the span of the scenario's steering vectors (its *prior support*).

    The prior second moment ``R_0 = E[a a^H]`` of a source drawn as the simulator draws it
    (phi, theta, r uniform over the field of view and the range interval) is computed on a
    deterministic midpoint grid (41 x 21 x 24 points); its leading eigenvectors, as many as
    hold the fraction ``energy`` of tr R_0, are returned. Every source covariance
    ``sum_k p_k a_k a_k^H`` lies (up to ``1 - energy`` of its power, on average) in that
    span. Default scenario: d = 69 / 86 / 104 at energy 0.95 / 0.99 / 0.999 (N = 144).
    ``energy >= 1`` returns the identity (no restriction).
    """
    n = scenario.n_elements
    if energy >= 1.0:
        return torch.eye(n, dtype=dtype, device=device)
    if not 0.0 < energy:
        raise ValueError(f"prior_subspace: energy = {energy}: must be in (0, 1]")

    def build() -> Tensor:
        sc = scenario

        def mid(lo, hi, k):
            return lo + (hi - lo) * (torch.arange(k, dtype=torch.float64) + 0.5) / k

        P, T, Rr = torch.meshgrid(mid(sc.phi_min, sc.phi_max, 41), mid(sc.theta_min, sc.theta_max, 21), mid(sc.r_min, sc.r_max, 24), indexing="ij")
        a = physics.steering(P.reshape(-1), T.reshape(-1), Rr.reshape(-1), sc, dtype=torch.complex128)  # [G, N]
        R0 = a.T @ a.conj() / a.shape[0]
        lam, V = torch.linalg.eigh(R0)
        lam, V = lam.flip(-1), V.flip(-1)
        d = int((lam.cumsum(0) / lam.sum() < energy).sum()) + 1
        return V[:, :d].contiguous()

    return cache_entry(_PRIOR_CACHE, (scenario.to_json(), float(energy)), build, limit=8).to(device=device, dtype=dtype)


@dataclass
class FactorFit:
    """A rank-r fit of the measurement model ``y_l ~ CN(0, G_l F F^H G_l^H + s2 I_M)``.

    ``factor`` F ``[B, N, r]`` (RIS domain, R = F F^H), ``noise_var`` s2 ``[B]`` (in the units
    of y), ``nll`` ``[B]`` the negative log-likelihood ``sum_l log det C_l + y_l^H C_l^-1 y_l``
    of y normalised to unit mean power per scene (constant ``L M log pi`` dropped).
    """

    factor: Tensor
    noise_var: Tensor
    nll: Tensor

    def covariance(self) -> "LowRankCovariance":
        """R = F F^H (no identity term: the model has no RIS-domain noise)."""
        return LowRankCovariance(self.factor, torch.zeros_like(self.noise_var))


def _factor_nll(W: Tensor, y: Tensor, s2: Tensor) -> Tensor:
    """``sum_l log det C_l + y_l^H C_l^-1 y_l`` for ``C_l = W_l W_l^H + s2 I`` (W ``[B, L, M, r]``), by Woodbury."""
    B, L, M, r = W.shape
    s2v = s2.view(B, 1, 1, 1)
    yy = y.abs().square().sum(-1)  # [B, L]
    if r == 0:
        return (M * torch.log(s2).view(B, 1) + yy / s2.view(B, 1)).sum(-1)
    eye = torch.eye(r, dtype=W.dtype, device=W.device)
    A = W.mH @ W + s2v.to(W.dtype) * eye  # [B, L, r, r]
    Lc = torch.linalg.cholesky(A)
    b = W.mH @ y.unsqueeze(-1)
    u = torch.cholesky_solve(b, Lc)
    quad = (yy - (b.conj() * u).real.sum((-1, -2))) / s2.view(B, 1)
    logdet = (M - r) * torch.log(s2).view(B, 1) + 2 * torch.log(torch.diagonal(Lc, dim1=-2, dim2=-1).real).sum(-1)
    return (logdet + quad).sum(-1)


def fit_factor(
    y: Tensor,
    H: Tensor,
    codes: Tensor,
    rank: int,
    *,
    basis: Tensor | None = None,
    iterations: int = 60,
    cg_steps: int = 3,
    init: Tensor | None = None,
    noise_floor: float = 1e-10,
    accelerate: bool = True,
    precision: torch.dtype = torch.complex128,
) -> FactorFit:
    """Maximum-likelihood rank-``rank`` factor of the RIS-domain covariance by EM.

    Model (docs/model.md, stochastic signals): ``y_l = G_l x_l + n_l``, ``G_l = H diag(c_l)``,
    ``x_l ~ CN(0, R)``, ``n_l ~ CN(0, s2 I_M)``, so ``y_l ~ CN(0, G_l R G_l^H + s2 I_M)``.
    With ``R = F F^H``, ``F = P F_d`` (P ``[N, d]`` an orthonormal ``basis``, e.g.
    :func:`prior_subspace`; default the identity) and ``x_l = F z_l``, ``z_l ~ CN(0, I_r)``,
    this is factor analysis with a per-snapshot loading ``W_l = G_l P F_d`` (Rubin & Thayer
    1982; Tipping & Bishop 1999 for the EM of probabilistic PCA). EM on the latent z_l:

    * E-step (an r x r solve per snapshot): ``S_l = (W_l^H W_l + s2 I_r)^-1``,
      ``mu_l = S_l W_l^H y_l``, ``Sigma_l = s2 S_l``;
    * M-step for F_d: ``sum_l Gt_l^H Gt_l F_d (mu_l mu_l^H + Sigma_l) = sum_l Gt_l^H y_l mu_l^H``
      (``Gt_l = G_l P``), a Hermitian positive-definite system in vec(F_d) of size d r
      whose matrix differs per snapshot; solved by ``cg_steps`` steps of Jacobi-preconditioned
      conjugate gradients warm-started from the current F_d (an ECM step: the expected
      complete-data likelihood increases at every step, Meng & Rubin 1993);
    * M-step for s2: ``s2 = sum_l (|y_l - W_l mu_l|^2 + tr(W_l Sigma_l W_l^H)) / (L M)``,
      floored at ``noise_floor`` times the mean power of y;
    * parameter expansion (PX-EM, Liu, Rubin & Wu 1998): ``F_d <- F_d Psi^(1/2)`` with
      ``Psi = (1/L) sum_l (mu_l mu_l^H + Sigma_l)`` (plain EM barely moves the scale of F at
      high SNR);
    * SQUAREM extrapolation (Varadhan & Roland 2008) every three steps when ``accelerate``.

    Initialised (unless ``init`` ``[B, N, rank]`` is given) from the ``rank`` principal
    directions of the back-projected sample covariance (:func:`sample_covariance`) inside
    the basis, scaled so that the model explains half of the measured power. y and G are
    normalised per scene to unit mean power first (the estimate is scale-equivariant).
    Batched over scenes; runs on y's device.

    Precision: the fit runs in ``precision`` (complex128 by default) whatever y's precision,
    and ``factor``, ``noise_var`` and ``nll`` are returned in y's. The EM steps amplify a
    change of y (near a saddle of the likelihood EM moves away from it geometrically, and the
    SQUAREM safeguard compares two NLLs); in float32 they amplified the rounding of every step,
    which differs between CPUs. Relative Frobenius change of R when y is multiplied by
    ``1 + 1e-7 e`` (e complex standard normal; 16 default scenes, 30 steps): float32, median
    9e-5 / 2e-4 and up to 2e-2 / 9e-3 for the rank-1 / rank-2 fits; complex128, median
    4e-6 / 8e-6 and up to 7e-4 / 2e-3 (docs/estimators.md).
    """
    B, L, M = y.shape
    out_dtype = y.dtype
    cd = precision
    y, H, codes = y.to(cd), H.to(cd), codes.to(cd)
    if init is not None:
        init = init.to(cd)
    N = codes.shape[-1]
    P = (torch.eye(N, dtype=cd, device=y.device) if basis is None else basis.to(device=y.device, dtype=cd))
    d = P.shape[1]
    if rank < 0 or rank > d:
        raise ValueError(f"fit_factor: rank = {rank} must be in 0..{d}")
    rd = physics.real_dtype(cd)
    y_scale = (y.abs().square().sum((1, 2)) / (L * M)).clamp(min=torch.finfo(rd).tiny).sqrt()  # [B]
    G = physics.measurement_matrix(H, codes) @ P  # [B, L, M, d]
    g_scale = (G.abs().square().sum((1, 2, 3)) / (L * M * d)).clamp(min=torch.finfo(rd).tiny).sqrt()
    yn = y / y_scale.view(B, 1, 1).to(cd)
    Gn = G / g_scale.view(B, 1, 1, 1).to(cd)
    unit = y_scale / g_scale  # F (physical) = F_d (normalised) * unit
    floor = torch.full((B,), noise_floor, dtype=rd, device=y.device)
    if rank == 0:
        s2 = torch.ones(B, dtype=rd, device=y.device)
        Fd = torch.zeros(B, d, 0, dtype=cd, device=y.device)
        nll = _factor_nll(Gn[..., :0], yn, s2)
        return _fit_in(out_dtype, P @ Fd, s2 * y_scale.square(), nll)

    if init is None:
        x_hat = back_project(y, H, codes)  # [B, L, N]
        X = P.mH @ x_hat.transpose(1, 2)  # [B, d, L]
        lam, V = torch.linalg.eigh(X.mH @ X)
        V = V.flip(-1)[..., :rank]
        E = X @ V
        E = E / torch.linalg.vector_norm(E, dim=1, keepdim=True).clamp(min=torch.finfo(rd).tiny)
        if E.shape[-1] < rank:  # L < rank: pad with random directions
            E = torch.cat([E, torch.randn(B, d, rank - E.shape[-1], dtype=cd, device=y.device)], -1)
        W = Gn @ E.unsqueeze(1)
        explained = W.abs().square().sum((1, 2, 3)) / (L * M)  # mean power of the model with unit columns
        Fd = E * (0.5 * rank / explained.clamp(min=torch.finfo(rd).tiny)).sqrt().view(B, 1, 1).to(cd) / math.sqrt(rank)
        s2 = torch.full((B,), 0.5, dtype=rd, device=y.device)
    else:
        Fd = P.mH @ (init.to(cd) / unit.view(B, 1, 1).to(cd))
        W = Gn @ Fd.unsqueeze(1)
        s2 = (1.0 - W.abs().square().sum((1, 2, 3)) / (L * M)).clamp(min=0.05)

    Gf = Gn.reshape(B, L * M, d)
    GfH = Gf.mH.contiguous()  # one copy, reused by every product
    colnorm = Gn.abs().square().sum(2)  # [B, L, d]: diagonals of Gt_l^H Gt_l (Jacobi preconditioner)
    state = (Fd, s2)
    nll = None
    for _ in range(iterations // 3 if accelerate else iterations):
        if not accelerate:
            state = _em_step(state, Gf, GfH, Gn, yn, colnorm, floor, cg_steps)
            continue
        # SQUAREM (Varadhan & Roland 2008, scheme S3): two EM steps, an extrapolation along
        # the EM path, one stabilising EM step; fall back to the plain EM point where the
        # extrapolated one has a higher NLL (monotone overall).
        t1 = _em_step(state, Gf, GfH, Gn, yn, colnorm, floor, cg_steps)
        t2 = _em_step(t1, Gf, GfH, Gn, yn, colnorm, floor, cg_steps)
        r_F, v_F = t1[0] - state[0], t2[0] - 2 * t1[0] + state[0]
        r_s, v_s = t1[1].log() - state[1].log(), t2[1].log() - 2 * t1[1].log() + state[1].log()
        rn = (r_F.abs().square().sum((1, 2)) + r_s.square()).sqrt()
        vn = (v_F.abs().square().sum((1, 2)) + v_s.square()).sqrt()
        alpha = -(rn / vn.clamp(min=torch.finfo(rd).tiny)).clamp(min=1.0, max=64.0)  # [B], <= -1
        a = alpha.view(B, 1, 1).to(cd)
        F_x = state[0] - 2 * a * r_F + a * a * v_F
        s_x = torch.maximum((state[1].log() - 2 * alpha * r_s + alpha * alpha * v_s).exp(), floor)
        t3 = _em_step((F_x, s_x), Gf, GfH, Gn, yn, colnorm, floor, cg_steps)
        nll3 = _factor_nll((Gf @ t3[0]).view(B, L, M, -1), yn, t3[1])
        nll2 = _factor_nll((Gf @ t2[0]).view(B, L, M, -1), yn, t2[1])
        take = (nll3 <= nll2) & torch.isfinite(nll3)
        state = (torch.where(take.view(B, 1, 1), t3[0], t2[0]), torch.where(take, t3[1], t2[1]))
    Fd, s2 = state
    W = (Gf @ Fd).view(B, L, M, rank)
    nll = _factor_nll(W, yn, s2)
    return _fit_in(out_dtype, P @ Fd * unit.view(B, 1, 1).to(cd), s2 * y_scale.square(), nll)


def _fit_in(dtype: torch.dtype, factor: Tensor, noise_var: Tensor, nll: Tensor) -> FactorFit:
    """A :class:`FactorFit` cast to the complex ``dtype`` of the data (and its real counterpart)."""
    rd = physics.real_dtype(dtype)
    return FactorFit(factor.to(dtype), noise_var.to(rd), nll.to(rd))


def _em_step(state, Gf: Tensor, GfH: Tensor, Gn: Tensor, yn: Tensor, colnorm: Tensor, floor: Tensor, cg_steps: int):
    """One ECM step of :func:`fit_factor` on normalised data (Gf = Gn as ``[B, L M, d]``)."""
    Fd, s2 = state
    B, L, M, d = Gn.shape
    r = Fd.shape[-1]
    cd = Fd.dtype
    eye = torch.eye(r, dtype=cd, device=Fd.device)
    yv = yn.unsqueeze(-1)
    W = (Gf @ Fd).view(B, L, M, r)
    A = W.mH @ W + s2.view(B, 1, 1, 1).to(cd) * eye
    Lc, info = torch.linalg.cholesky_ex(A)
    Lc = torch.where(info.ne(0).view(B, L, 1, 1), eye, Lc)
    mu = torch.cholesky_solve(W.mH @ yv, Lc)  # [B, L, r, 1]
    Sig = s2.view(B, 1, 1, 1).to(cd) * torch.cholesky_inverse(Lc)
    S = mu @ mu.mH + Sig  # [B, L, r, r]
    rhs = GfH @ (yv @ mu.mH).reshape(B, L * M, r)  # [B, d, r]

    def op(X):
        return GfH @ ((Gf @ X).view(B, L, M, r) @ S).view(B, L * M, r)

    Minv = 1.0 / (colnorm.unsqueeze(-1) * torch.diagonal(S, dim1=-2, dim2=-1).real.unsqueeze(-2)).sum(1).clamp(min=torch.finfo(s2.dtype).tiny)
    Fd = _cg(op, rhs, Fd, Minv, cg_steps)
    W = (Gf @ Fd).view(B, L, M, r)
    res = (yv - W @ mu).abs().square().sum((1, 2, 3))
    tr = ((W.mH @ W) * Sig.mT).real.sum((1, 2, 3))  # sum_l tr(W_l Sigma_l W_l^H)
    s2 = torch.maximum((res + tr) / (L * M), floor)
    # PX-EM reduction (Liu, Rubin & Wu 1998): the expanded model z_l ~ CN(0, Psi) has the M-step
    # Psi = (1/L) sum_l E[z_l z_l^H]; mapping back, F <- F Psi^(1/2). It fixes the slow scale
    # mode of plain EM at high SNR (where E[z] barely feels the unit prior).
    Lp, info = torch.linalg.cholesky_ex(S.mean(1))
    Lp = torch.where(info.ne(0).view(B, 1, 1), eye, Lp)
    return Fd @ Lp, s2


def _cg(op, b: Tensor, x: Tensor, Minv: Tensor, steps: int) -> Tensor:
    """Preconditioned conjugate gradients on ``op(x) = b`` per scene (inner product Re tr(X^H Y))."""
    rd = Minv.dtype
    tiny = torch.finfo(rd).tiny
    r = b - op(x)
    z = Minv.to(r.dtype) * r
    p = z
    rz = (r.conj() * z).real.sum((1, 2))
    for _ in range(steps):
        Ap = op(p)
        pAp = (p.conj() * Ap).real.sum((1, 2))
        alpha = torch.where(pAp > tiny, rz / pAp.clamp(min=tiny), torch.zeros_like(rz))
        x = x + alpha.view(-1, 1, 1).to(x.dtype) * p
        r = r - alpha.view(-1, 1, 1).to(x.dtype) * Ap
        z = Minv.to(r.dtype) * r
        rz_new = (r.conj() * z).real.sum((1, 2))
        beta = torch.where(rz > tiny, rz_new / rz.clamp(min=tiny), torch.zeros_like(rz))
        p = z + beta.view(-1, 1, 1).to(x.dtype) * p
        rz = rz_new
    return x


def fit_path(y: Tensor, H: Tensor, codes: Tensor, ranks, *, basis: Tensor | None = None, iterations: int = 30) -> list[FactorFit]:
    """:func:`fit_factor` for every rank in ``ranks`` (each started from the back-projection)."""
    return [fit_factor(y, H, codes, k, basis=basis, iterations=iterations) for k in ranks]


def ml_rank_limit(scenario, n_snapshots: int, n_antennas: int, *, options: CovarianceOptions = CovarianceOptions(), k_min: int = 1) -> int:
    """``k_fit``: the largest rank that :func:`ml_covariance` fits without a known K,
    ``max(min(k_max, identifiable rank), min(k_min, k_max))`` in the :func:`prior_subspace` of
    ``options.prior_energy`` (:func:`risloc.estimators.order.identifiable_rank`; 2 by default)."""
    from .estimators.order import identifiable_rank

    d = prior_subspace(scenario, energy=options.prior_energy).shape[1]
    return max(min(scenario.k_max, identifiable_rank(n_snapshots, n_antennas, d)), min(k_min, scenario.k_max))


def ml_covariance(
    y: Tensor,
    H: Tensor,
    codes: Tensor,
    scenario,
    *,
    K: Tensor | int | None = None,
    options: CovarianceOptions = CovarianceOptions(),
    k_min: int = 1,
) -> FactorFit:
    """The maximum-likelihood low-rank RIS-domain covariance of each scene, its rank chosen.

    Fits ranks k = 0..k_fit (:func:`fit_factor` in the :func:`prior_subspace` of
    ``options.prior_energy``), with ``k_fit = min(k_max, identifiable rank)``
    (:func:`risloc.estimators.order.identifiable_rank`: beyond it the likelihood is
    unbounded), and keeps, per scene, the rank chosen by ``options.rank_rule``
    (:func:`risloc.estimators.order.likelihood_order`, at least ``k_min``), or ``K`` (an int or
    ``[B]``) when given: then ranks up to max K are fitted, identifiable or not.
    Returns a :class:`FactorFit` whose ``factor`` ``[B, N, k]`` has zero columns beyond each
    scene's rank and whose ``nll`` is that of the chosen rank.
    """
    from .estimators.order import likelihood_order

    B, L, M = y.shape
    basis = prior_subspace(scenario, energy=options.prior_energy, device=y.device, dtype=torch.complex128)
    d = basis.shape[1]
    if K is not None:
        Kt = torch.as_tensor(K, device=y.device).to(torch.int64).reshape(-1).expand(B)
        if bool((Kt < 0).any()) or bool((Kt > d).any()):
            bad = int(((Kt < 0) | (Kt > d)).nonzero()[0, 0])
            raise ValueError(f"ml_covariance: K[{bad}] = {int(Kt[bad])} must be in 0..{d}")
        ranks = sorted(set(int(k) for k in Kt.unique().tolist()))
    else:
        k_fit = ml_rank_limit(scenario, L, M, options=options, k_min=k_min)
        ranks = list(range(0, k_fit + 1))
    fits = fit_path(y, H, codes, ranks, basis=basis, iterations=options.em_iterations)
    nll = torch.stack([f.nll for f in fits], -1)  # [B, len(ranks)]
    if K is None:
        Kt = likelihood_order(nll, d=d, n_snapshots=L, rule=options.rank_rule, k_min=k_min)
    pos = torch.as_tensor(ranks, device=y.device)
    sel = (Kt.view(-1, 1) == pos.view(1, -1)).to(torch.int64).argmax(-1)  # index of each scene's rank
    width = max(max(ranks), 1)
    factor = torch.zeros(B, codes.shape[-1], width, dtype=y.dtype, device=y.device)
    noise = torch.zeros(B, dtype=fits[0].noise_var.dtype, device=y.device)
    for i, f in enumerate(fits):
        take = sel == i
        if f.factor.shape[-1]:
            factor[..., : f.factor.shape[-1]] = torch.where(take.view(B, 1, 1), f.factor, factor[..., : f.factor.shape[-1]])
        noise = torch.where(take, f.noise_var, noise)
    return FactorFit(factor, noise, nll.gather(1, sel.view(-1, 1)).squeeze(1))
