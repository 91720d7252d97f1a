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

        The r x r eigenproblem is solved in double precision. Directions with a (numerically)
        zero Gram eigenvalue carry no information; their vectors are set to zero and their
        eigenvalue to ``diag``.
        """
        U = self.factor
        gram = (U.mH @ U).to(torch.complex128)
        lam, V = torch.linalg.eigh(gram)  # ascending
        lam, V = lam.flip(-1), V.flip(-1)
        scale = lam.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
        good = lam > scale * 1e-10
        inv_sqrt = torch.where(good, lam.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
        vecs = U @ (V * inv_sqrt.unsqueeze(-2)).to(U.dtype)
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
    source subspace, so some signal leaks into the residual: at high SNR the estimate is
    biased low (it saturates); at low SNR it is close. Clamped to [-20, 50] dB.
    """
    B, L, M = y.shape
    rank = min(rank, M - 1)
    E = sample_covariance(y, H, codes, regularisation=regularisation).signal_subspace(rank)  # [B, N, rank]
    GE = physics.measurement_matrix(H, codes) @ E.unsqueeze(1)  # [B, L, M, rank]
    w = torch.linalg.lstsq(GE, y.unsqueeze(-1)).solution if y.device.type == "cpu" else torch.linalg.pinv(GE) @ y.unsqueeze(-1)
    res = y.unsqueeze(-1) - GE @ w
    noise = res.abs().square().sum((1, 2, 3)) / (L * (M - rank))
    total = y.abs().square().sum((1, 2)) / (L * M)
    tiny = torch.finfo(noise.dtype).tiny
    snr = (total - noise).clamp(min=tiny) / noise.clamp(min=tiny)
    return (10 * torch.log10(snr)).clamp(-20.0, 50.0)


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

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"CovarianceOptions.beta = {self.beta}: must be in [0, 1]")
        if self.loading < 0:
            raise ValueError(f"CovarianceOptions.loading = {self.loading}: must be >= 0")
        if self.shrinkage < 0:
            raise ValueError(f"CovarianceOptions.shrinkage = {self.shrinkage}: must be >= 0")


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


def scene_covariance(scenes, *, options: CovarianceOptions = CovarianceOptions(), use_snr: bool = True) -> LowRankCovariance:
    """The classical estimators' effective covariance of a :class:`~risloc.scenes.Scenes` batch
    (sample covariance only, the scene's SNR label if present and ``use_snr``)."""
    snr = scenes.snr_db if use_snr else None
    return effective_covariance(None, snr_db=snr, options=options, y=scenes.y, H=scenes.H, codes=scenes.codes)
