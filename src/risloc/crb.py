r"""Cramér–Rao bounds on the source positions (phi, theta, r), batched over scenes.

Measurement model (docs/model.md)::

    y_l = G_l A s(l) + n_l,   G_l = H diag(c_l) (M x N),   A = [a(phi_k, theta_k, r_k)] (N x K),
    n_l ~ CN(0, sigma^2 I_M),  l = 1..L,   B_l = G_l A (M x K).

Two signal models, as in the spec:

``stochastic`` (Slepian 1954; Bangs 1971; Stoica & Nehorai 1990)
    s(l) ~ CN(0, P), P = diag(p), so y_l ~ CN(0, C_l) with ``C_l = B_l P B_l^H + sigma^2 I``.
    Unknowns eta = (phi_1..K, theta_1..K, r_1..K, p_1..K, sigma^2); the powers and the noise
    variance are nuisance parameters. The covariance differs per snapshot (the RIS code
    changes), so the Slepian–Bangs Fisher information is a sum over snapshots::

        FIM_ij = sum_l tr(C_l^-1 dC_l/deta_i C_l^-1 dC_l/deta_j).

    With ``Z = C_l^-1``, ``V = [B, dB/dphi, dB/dtheta, dB/dr]`` and ``Q = V^H Z V`` (blocks
    ``Q^{ab}``, a, b in {0 (= B), phi, theta, r}), the traces reduce to (``o`` = Hadamard)::

        F(a_k, b_l) = 2 p_k p_l Re[Q^{ab} o conj(Q^{00}) + Q^{a0} o conj(Q^{0b})]_kl
        F(a_k, p_l) = 2 p_k Re[Q^{a0} o conj(Q^{00})]_kl
        F(p_k, p_l) = |Q^{00}_kl|^2
        F(a_k, s2)  = 2 p_k Re[(V^H Z^2 V)^{0a}_kk],  F(p_k, s2) = (B^H Z^2 B)_kk,  F(s2, s2) = tr Z^2

    each summed over l (:func:`stochastic_fisher`, the one implementation, also used by ``ml``'s
    Fisher scoring in its own parametrisation). ``Q`` and ``V^H Z^2 V`` come from the per-snapshot
    Grams ``V^H V`` through the Woodbury identity with K x K solves only (:func:`_whitened_products`).

``static`` (deterministic signal; Stoica & Nehorai 1989)
    s_k(l) = g_k for every l with g unknown and deterministic. The mean of the stacked
    observation is ``mu = [G_l A g]_l`` and its covariance sigma^2 I is parameter-free apart
    from sigma^2, which decouples. With eta = (positions, Re g, Im g)::

        FIM = (2 / sigma^2) Re(J^H J),   J = d mu / d eta^T = sum over l of the stacked blocks
              [dB_l/dphi diag(g), dB_l/dtheta diag(g), dB_l/dr diag(g), B_l, j B_l].

    The bound depends on the realised amplitudes g, which a scene file does not store (it
    stores p_k = E|g_k|^2). :func:`crb` takes ``gain=g`` when it is known; without it risloc
    uses ``g_k = sqrt(p_k)`` (zero phase). For one source the phase drops out exactly; for
    several, the *relative* phases enter through the cross terms between sources: on default
    scenes at 20 dB, random phases change sqrt(CRB(phi)) by a factor 0.91..1.08 (10-90 %),
    0.65..1.30 (1-99 %) (docs/crb.md).

Derivatives of the exact spherical steering vector with respect to (phi, theta, r) are the
analytic, cancellation-free forms of :func:`risloc.physics.steering_with_derivatives`
(checked against finite differences and autograd in the tests).

All work is done in complex128 / float64 on the device of the inputs. The Fisher matrix is
equilibrated (unit diagonal) and inverted through a symmetric eigen-decomposition: a
parameter with a component in the numerical null space (relative eigenvalue below
``rcond``) is unidentifiable and its bound is ``inf`` (e.g. two identical sources, a source
of zero power, range at a far-field distance); ``CRBResult.regular`` flags scenes whose
FIM is full rank. NaN appears only in the padding beyond the K sources of a scene and for
position parameters that were declared known (``params``).

CRB files (``risloc crb``) are written and read by :func:`risloc.io.crb_file` and
:func:`risloc.io.load_crb`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from . import physics
from .scenario import SIGNAL_MODELS, Scenario

POSITION_PARAMS = ("phi", "theta", "r")

__all__ = ["CRBResult", "crb", "crb_for_scenes", "fisher_information", "stochastic_fisher", "stochastic_fisher_parts", "POSITION_PARAMS"]


@dataclass
class CRBResult:
    """Square roots of the Cramér–Rao bounds, ``[S, K_max]`` float64 (radians, metres).

    ``phi, theta, r``: sqrt(diag FIM^-1) for each source; NaN after the first K of a scene
    and for parameters not in ``params``; ``inf`` where unidentifiable.
    ``regular``: ``[S]`` bool, False where the Fisher matrix was singular.
    ``position_cov``: ``[S, P*K_max, P*K_max]`` (only with ``full=True``) the position block of
    FIM^-1 ordered parameter-major (phi_1..K_max, theta_1..K_max, r_1..K_max for the default
    ``params``), NaN in rows/columns of padded sources.
    """

    phi: Tensor
    theta: Tensor
    r: Tensor
    regular: Tensor
    position_cov: Tensor | None = None
    signal: str = "stochastic"
    params: tuple[str, ...] = POSITION_PARAMS

    def __len__(self) -> int:
        return self.phi.shape[0]

    def __getitem__(self, index) -> "CRBResult":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def to(self, device=None, **kwargs) -> "CRBResult":
        return self._map(lambda t: t.to(device, **kwargs))

    def _map(self, fn) -> "CRBResult":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    @classmethod
    def cat(cls, items: Sequence["CRBResult"]) -> "CRBResult":
        items = list(items)
        if not items:
            raise ValueError("CRBResult.cat needs at least one item")
        out = {}
        for f in fields(cls):
            v = getattr(items[0], f.name)
            out[f.name] = torch.cat([getattr(it, f.name) for it in items]) if isinstance(v, Tensor) else v
        return cls(**out)


# ---------------------------------------------------------------------------------------------
# Fisher information
# ---------------------------------------------------------------------------------------------
_CPU_GRAM_CHUNK = 16
"""Scenes per step of the Gram computation on CPU: the stacked G_l of a few scenes stay in cache
(measured: ~8x faster per scene than 512-scene steps on a 2-core Xeon)."""


def _grams(H: Tensor, codes: Tensor, vecs: Tensor) -> Tensor:
    """Per-snapshot Gram matrices ``V_l^H V_l`` ``[S, L, Q, Q]`` of the BS-side columns
    ``V_l = H diag(c_l) [v_1, ..., v_Q]`` for RIS-domain vectors ``vecs`` ``[S, Q, N]``.

    Everything the Fisher matrices need from the measurement matrices is in these Grams.
    """
    S, L, N = codes.shape
    M = H.shape[1]
    step = _CPU_GRAM_CHUNK if H.device.type == "cpu" else S
    out = []
    for a in range(0, S, max(1, step)):
        h, c, v = H[a : a + step], codes[a : a + step], vecs[a : a + step]
        G = (h.unsqueeze(1) * c.unsqueeze(2)).reshape(h.shape[0], L * M, N)  # stacked G_l
        V = (G @ v.mT).reshape(h.shape[0], L, M, -1)  # [s, L, M, Q]
        out.append(V.mH @ V)
    return out[0] if len(out) == 1 else torch.cat(out)


def stochastic_fisher(W: Tensor, U: Tensor, trC2: Tensor, p: Tensor, s2: Tensor, P: int, *, log_params: bool = False) -> Tensor:
    r"""The Slepian–Bangs Fisher matrix of the stochastic model from its whitened products.

    Inputs per scene and snapshot l, with ``V_l = [B_l, dB_l/dxi_1, ..., dB_l/dxi_P]`` (``Q = (1+P)K``
    columns; ``xi`` any P position coordinates, e.g. (phi, theta, r) for the bound or
    (phi, theta, rho) for ``ml``) and ``C_l = B_l diag(p) B_l^H + sigma^2 I``:
    ``W`` = V^H C^-1 V ``[S, L, Q, Q]``; ``U`` = the first K rows of V^H C^-2 V (or all of them),
    ``[S, L, >=K, Q]``; ``trC2`` = sum_l tr C_l^-2 ``[S]``; powers ``p`` ``[S, K]``; ``s2`` ``[S]``.

    Every dC_l/deta_i is ``c_i (v b_k^H + b_k v^H)`` for a column v of V (``c = p_k`` and
    ``v = dB/dxi e_k`` for a position, ``c = 1/2`` (or ``p_k/2`` for log p_k) and ``v = b_k`` for a
    power) or ``c I`` (``c = 1``, or ``sigma^2`` for log sigma^2), so
    ``F_ij = sum_l Re tr(C^-1 C_i C^-1 C_j)`` reduces to products of entries of W, U and tr C^-2::

        tr(C^-1 v_a v_b^H C^-1 v_c v_d^H) = W[b, c] W[d, a],   tr(C^-1 I C^-1 v_x v_y^H) = U[y, x].

    Returns ``[S, (P+1)K + 1, (P+1)K + 1]`` in the real dtype of ``W``, parameters ordered
    (xi_1 of sources 1..K, ..., xi_P, p_1..K, sigma^2), or (..., log p, log sigma^2) with
    ``log_params``. No padding treatment: sources of zero power contribute zero rows.
    """
    S, L = W.shape[:2]
    K = p.shape[-1]
    n = P + 1
    Wr = W.view(S, L, n, K, n, K)  # blocks (b, b'_xi1, ..., b'_xiP) x (same)
    Ur = U[..., :K, :].reshape(S, L, K, n, K)  # rows b of V^H C^-2 V
    A0 = Wr[:, :, 0]  # [S, L, a, J, c]
    Wbb = A0[:, :, :, 0]  # [S, L, a, c]
    # For the position blocks i, J and sources a, c the four terms of tr(C^-1 C_i C^-1 C_j) are
    #   W[(0,a),(J,c)] W[(0,c),(i,a)] + W[(0,a),(0,c)] W[(J,c),(i,a)]
    #   + W[(i,a),(J,c)] W[(0,c),(0,a)] + W[(i,a),(0,c)] W[(J,c),(0,a)];
    # W is Hermitian, so the fourth is the conjugate of the first and the second of the third:
    # the real part is twice that of the first plus the third.
    Fl = 2 * (
        A0.view(S, L, 1, K, n, K) * A0.permute(0, 1, 3, 4, 2).reshape(S, L, n, K, 1, K)
        + Wr * Wbb.transpose(-1, -2).reshape(S, L, 1, K, 1, K)
    ).real.sum(1)  # [S, i, a, J, c]
    Fs = 2 * torch.diagonal(Ur, dim1=-3, dim2=-1).real.sum(1)  # [S, i, a]
    return _parameter_fisher(Fl, Fs, trC2, p, s2, P, log_params)


def stochastic_fisher_parts(Wr: Tensor, Wi: Tensor, Ur: Tensor, trC2: Tensor, p: Tensor, s2: Tensor, P: int, *,
                            log_params: bool = False) -> Tensor:
    """:func:`stochastic_fisher` in real arithmetic only, from the real and imaginary parts of ``W``
    and the real part of the first K rows of ``U`` (all it reads of U): the form that ``ml``'s
    compiled likelihood fuses (``torch.compile`` generates no code for complex operators). The
    same terms, with Re(x y) = Re x Re y - Im x Im y; :func:`stochastic_fisher` keeps the complex
    form, whose rounding gives a scene the same bound and ``ml`` the same answer at any batch size."""
    S, L = Wr.shape[:2]
    K = p.shape[-1]
    n = P + 1
    Wr6, Wi6 = Wr.view(S, L, n, K, n, K), Wi.view(S, L, n, K, n, K)  # blocks (b, b'_xi1, ..., b'_xiP) x (same)
    A0r, A0i = Wr6[:, :, 0], Wi6[:, :, 0]  # [S, L, a, J, c]
    # twice the real part of the first plus the third term of stochastic_fisher's four
    first = (A0r.view(S, L, 1, K, n, K) * A0r.permute(0, 1, 3, 4, 2).reshape(S, L, n, K, 1, K)
             - A0i.view(S, L, 1, K, n, K) * A0i.permute(0, 1, 3, 4, 2).reshape(S, L, n, K, 1, K))
    third = (Wr6 * A0r[:, :, :, 0].transpose(-1, -2).reshape(S, L, 1, K, 1, K)
             - Wi6 * A0i[:, :, :, 0].transpose(-1, -2).reshape(S, L, 1, K, 1, K))
    Fl = 2 * (first + third).sum(1)  # [S, i, a, J, c]
    Fs = 2 * torch.diagonal(Ur[..., :K, :].reshape(S, L, K, n, K), dim1=-3, dim2=-1).sum(1)  # [S, i, a]
    return _parameter_fisher(Fl, Fs, trC2, p, s2, P, log_params)


def _parameter_fisher(Fl: Tensor, Fs: Tensor, trC2: Tensor, p: Tensor, s2: Tensor, P: int, log_params: bool) -> Tensor:
    """The Fisher matrix from its unscaled blocks: ``Fl`` ``[S, n, K, n, K]`` (the tr(C^-1 C_i C^-1 C_j)
    terms of the blocks (b, b'_xi1, ..., b'_xiP) of sources a, c), ``Fs`` ``[S, n, K]`` (those against
    sigma^2) and ``trC2`` ``[S]``, n = P + 1, scaled by the parameters' factors (see :func:`stochastic_fisher`)."""
    S, n, K = Fs.shape
    # positions first, then the powers: blocks (b, b'_xi1, ..., b'_xiP) -> (xi_1, ..., xi_P, p), a roll
    # (not an index list, which would be copied from the host at every call)
    Fl = torch.roll(Fl, (-1, -1), dims=(1, 3)).reshape(S, n * K, n * K)
    Fs = torch.roll(Fs, -1, dims=1).reshape(S, n * K)
    if log_params:
        coef = torch.cat([p] * P + [0.5 * p], dim=1)  # [S, nK]
        c_s2 = s2
    else:
        coef = torch.cat([p] * P + [torch.full_like(p, 0.5)], dim=1)
        c_s2 = torch.ones_like(s2)
    # F = (c c^T) * [[Fl, Fs], [Fs^T, tr C^-2]] elementwise, c = (coef, c_s2): the scales of the parameters
    c = torch.cat([coef, c_s2.view(S, 1)], dim=1)  # [S, nK + 1]
    G = torch.cat([torch.cat([Fl, Fs.unsqueeze(-1)], -1), torch.cat([Fs, trC2.view(S, 1)], -1).unsqueeze(1)], 1)
    F = c.unsqueeze(-1) * c.unsqueeze(-2) * G
    return 0.5 * (F + F.transpose(-1, -2))


def _whitened_products(Gm: Tensor, p: Tensor, s2: Tensor, K: int, M: int) -> tuple[Tensor, Tensor, Tensor]:
    """``W = V^H C^-1 V``, the first K rows of ``V^H C^-2 V`` and ``sum_l tr C_l^-2`` (the inputs of
    :func:`stochastic_fisher`) from the Grams ``Gm`` = V^H V ``[S, L, Q, Q]`` (columns of B first).

    Woodbury identity with ``B~ = B P^(1/2)``, ``G^ = B~^H B~ + sigma^2 I_K`` (K x K) and ``X = V^H B~``::

        V^H C^-1 V = (V^H V - X G^-1 X^H) / sigma^2
        B^H C^-2 V = (B^H C^-1 V - Y_B^H G^-1 X^H) / sigma^2    (Y = G^-1 X^H, rows B of V)
        tr C^-2    = (M - K) / sigma^4 + tr G^-2

    so no M x M matrix is formed or inverted (accurate also at high SNR: the tests compare
    with explicit inverses from -10 to 60 dB).
    """
    S, L = Gm.shape[:2]
    sp = p.clamp(min=0).sqrt().to(Gm.dtype).view(S, 1, 1, K)
    X = Gm[..., :K] * sp  # [S, L, Q, K] = V^H B~
    s2c = s2.view(S, 1, 1, 1)
    Ghat = X[..., :K, :] * sp.mT + s2c * torch.eye(K, dtype=Gm.dtype, device=Gm.device)
    chol, info = torch.linalg.cholesky_ex(Ghat)
    if bool((info != 0).any()):  # cannot happen for sigma^2 > 0 unless the inputs are absurd
        bad = int(torch.nonzero(info.view(S, L).any(1))[0])
        raise ValueError(f"covariance C_l of scene {bad} is not positive definite (noise_var too small?)")
    Y = torch.cholesky_solve(X.mH, chol)  # G^-1 X^H  [S, L, K, Q]
    W = (Gm - X @ Y) / s2c
    U = (W[..., :K, :] - Y[..., :K].mH @ Y) / s2c
    Ginv = torch.cholesky_inverse(chol)
    trC2 = (M - K) / s2.square() * L + Ginv.abs().square().sum((1, 2, 3))
    return W, U, trC2


def _fim_static(Gm: Tensor, g: Tensor, s2: Tensor, K: int, P: int) -> Tensor:
    """Deterministic-signal FIM over (positions [P*K], Re g [K], Im g [K]), ``[S, (P+2)K, (P+2)K]``.

    ``FIM = (2/sigma^2) Re(T^H (sum_l V_l^H V_l) T)`` where T maps the real parameters to the
    columns of ``V_l = [B_l, dB_l/dxi_1, ...]`` (``dmu_l/dxi_k = dB_l/dxi e_k g_k``, ``dmu_l/dRe g_k = b_l,k``,
    ``dmu_l/dIm g_k = j b_l,k``).
    """
    S = Gm.shape[0]
    Gram = Gm.sum(1)  # [S, (1+P)K, (1+P)K] = sum_l V_l^H V_l
    n = (P + 2) * K
    T = torch.zeros(S, (1 + P) * K, n, dtype=Gm.dtype, device=Gm.device)
    idx = torch.arange(K, device=Gm.device)
    for a in range(P):  # position columns: dB/dxi_a diag(g)
        T[:, (1 + a) * K + idx, a * K + idx] = g
    T[:, idx, P * K + idx] = 1
    T[:, idx, (P + 1) * K + idx] = 1j
    return (2 / s2).view(S, 1, 1) * (T.mH @ Gram @ T).real


def fisher_information(
    H: Tensor,
    codes: Tensor,
    phi: Tensor,
    theta: Tensor,
    r: Tensor,
    power: Tensor,
    noise_var: Tensor,
    scenario: Scenario,
    *,
    signal: str = "stochastic",
    active: Tensor | None = None,
    gain: Tensor | None = None,
    params: Sequence[str] = POSITION_PARAMS,
) -> Tensor:
    """The full Fisher information matrix ``[S, n, n]`` float64 (no padding treatment).

    Parameter order: positions parameter-major (``params[0]`` of sources 1..K_max, then
    ``params[1]`` ...), then the nuisance block: powers p_1..K_max and sigma^2 (stochastic) or
    Re g_1..K_max, Im g_1..K_max (static). Inputs must be finite; inactive sources (``active``
    False) contribute nothing (their rows and columns are zero).
    """
    params = _check_params(params)
    dev = H.device
    f64 = lambda t: t.to(device=dev, dtype=torch.float64)  # noqa: E731
    phi, theta, r, power, noise_var = map(f64, (phi, theta, r, power, noise_var))
    S, K = phi.shape
    if active is None:
        active = torch.ones(S, K, dtype=torch.bool, device=dev)
    mask = active.to(torch.float64)
    a, *ders = physics.steering_with_derivatives(phi, theta, r, scenario, dtype=torch.complex128)
    vecs = torch.cat([a] + [ders[POSITION_PARAMS.index(q)] for q in params], dim=1)  # [S, (1+P)K, N]
    vecs = vecs * mask.repeat(1, 1 + len(params)).unsqueeze(-1)
    Gm = _grams(H.to(torch.complex128), codes.to(device=dev, dtype=torch.complex128), vecs)
    if signal == "stochastic":
        p = power * mask
        return stochastic_fisher(*_whitened_products(Gm, p, noise_var, K, H.shape[1]), p, noise_var, len(params))
    if signal == "static":
        if gain is None:
            gain = torch.sqrt(torch.clamp(power, min=0))
        g = gain.to(device=dev, dtype=torch.complex128) * mask
        return _fim_static(Gm, g, noise_var, K, len(params))
    raise ValueError(f"signal must be one of {SIGNAL_MODELS}, not {signal!r}")


def _check_params(params: Sequence[str]) -> tuple[str, ...]:
    params = tuple(params)
    if not params or len(set(params)) != len(params) or not set(params) <= set(POSITION_PARAMS):
        raise ValueError(f"params must be distinct names from {POSITION_PARAMS}, got {params!r}")
    return tuple(q for q in POSITION_PARAMS if q in params)


def _invert(F: Tensor, unused: Tensor, rcond: float) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of the FIM with unidentifiable directions mapped to ``inf``.

    ``unused`` ``[S, n]`` marks parameters of padded sources: their rows are replaced by the
    identity. Returns (inverse ``[S, n, n]``, per-parameter identifiable ``[S, n]``, regular ``[S]``).
    """
    keep = (~unused).to(F.dtype)
    F = F * keep.unsqueeze(-1) * keep.unsqueeze(-2) + torch.diag_embed(1 - keep)
    F = 0.5 * (F + F.mT)
    dg = torch.diagonal(F, dim1=-2, dim2=-1)
    zero = dg <= 0
    scale = torch.where(zero, torch.ones_like(dg), dg.clamp(min=torch.finfo(F.dtype).tiny).rsqrt())
    Fn = F * scale.unsqueeze(-1) * scale.unsqueeze(-2) + torch.diag_embed(zero.to(F.dtype))
    lam, U = torch.linalg.eigh(Fn)
    null = lam <= rcond * lam[..., -1:].clamp(min=0)
    null_weight = (U.square() * null.unsqueeze(-2).to(F.dtype)).sum(-1)  # [S, n]
    ident = (null_weight < 1e-6) & ~zero
    inv_lam = torch.where(null, torch.zeros_like(lam), 1 / lam.clamp(min=torch.finfo(F.dtype).tiny))
    inv = (U * inv_lam.unsqueeze(-2)) @ U.mT
    inv = inv * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    ident = ident | unused
    regular = ident.all(-1)
    return inv, ident, regular


def crb(
    H: Tensor,
    codes: Tensor,
    phi: Tensor,
    theta: Tensor,
    r: Tensor,
    power: Tensor,
    noise_var: Tensor,
    scenario: Scenario,
    *,
    signal: str = "stochastic",
    K: Tensor | None = None,
    gain: Tensor | None = None,
    params: Sequence[str] = POSITION_PARAMS,
    full: bool = False,
    batch: int | None = None,
    rcond: float = 1e-12,
) -> CRBResult:
    """Square-root Cramér–Rao bounds on (phi, theta, r) of every source of every scene.

    Args:
        H: ``[S, M, N]`` BS–RIS channel; codes: ``[S, L, N]`` RIS codes (element order of docs/model.md).
        phi, theta, r, power: ``[S, K_max]`` true positions (rad, m) and powers p_k, NaN-padded.
        noise_var: ``[S]`` sigma^2.
        scenario: geometry (wavelength, element grid).
        signal: ``"stochastic"`` (Slepian–Bangs, nuisance p and sigma^2) or ``"static"``
            (deterministic g, nuisance Re g and Im g; sigma^2 decouples). See the module docstring.
        K: ``[S]`` number of sources; default: the count of finite leading ``phi`` entries.
        gain: ``[S, K_max]`` complex realised amplitudes g_k for ``signal="static"``;
            default ``sqrt(power)`` (zero phase; documented in docs/crb.md).
        params: which position parameters are unknown (the others are treated as known and
            reported as NaN), e.g. ``("phi",)`` for a direction-only bound.
        full: also return the position block of FIM^-1 (``position_cov``).
        batch: scenes per vectorised step (bounds memory, ~1 MB per scene at K = 5); default
            64 on CPU (cache-friendly; larger is slower there), 2048 on other devices.
        rcond: relative eigenvalue threshold of the equilibrated FIM below which a direction
            counts as unidentifiable (bound ``inf``).

    Returns:
        :class:`CRBResult` with ``[S, K_max]`` float64 standard deviations on the device of H.
    """
    if signal not in SIGNAL_MODELS:
        raise ValueError(f"signal must be one of {SIGNAL_MODELS}, not {signal!r}")
    params = _check_params(params)
    dev = H.device
    f64 = lambda t, name: _as64(t, name, dev)  # noqa: E731
    phi, theta, r, power = f64(phi, "phi"), f64(theta, "theta"), f64(r, "r"), f64(power, "power")
    noise_var = f64(noise_var, "noise_var").reshape(-1)
    if phi.dim() != 2:
        raise ValueError(f"phi must be [S, K_max], got shape {tuple(phi.shape)}")
    S, K_max = phi.shape
    for name, t in (("theta", theta), ("r", r), ("power", power)):
        if t.shape != phi.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, phi has {tuple(phi.shape)}")
    if H.dim() != 3 or H.shape[0] != S or codes.dim() != 3 or codes.shape[0] != S or noise_var.shape[0] != S:
        raise ValueError(f"H [S, M, N], codes [S, L, N], noise_var [S] must have S = {S} scenes; got "
                         f"{tuple(H.shape)}, {tuple(codes.shape)}, {tuple(noise_var.shape)}")
    N = scenario.n_elements
    if H.shape[-1] != N or codes.shape[-1] != N:
        raise ValueError(f"H and codes must have N = n_h * n_v = {N} columns; got {H.shape[-1]}, {codes.shape[-1]}")
    idx = torch.arange(K_max, device=dev)
    if K is None:
        K = torch.isfinite(phi).to(torch.int64).cumprod(1).sum(1)
    K = torch.as_tensor(K, device=dev).to(torch.int64).reshape(-1)
    if K.shape[0] != S or bool(((K < 0) | (K > K_max)).any()):
        raise ValueError(f"K must be [S={S}] with values in 0..K_max={K_max}")
    active = idx.view(1, -1) < K.view(-1, 1)
    _check_finite(active, noise_var, phi=phi, theta=theta, r=r, power=power)
    if gain is not None:
        gain = torch.as_tensor(gain, device=dev).to(torch.complex128)
        if gain.shape != phi.shape:
            raise ValueError(f"gain has shape {tuple(gain.shape)}, phi has {tuple(phi.shape)}")
        if signal != "static":
            raise ValueError("gain is only used with signal='static'")
    # safe dummies for padded slots (their contribution is masked out)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    phi_s, theta_s = torch.where(active, phi, zero), torch.where(active, theta, zero)
    r_s = torch.where(active, r, torch.ones((), dtype=torch.float64, device=dev))
    p_s = torch.where(active, power, zero)
    g_s = None if gain is None else torch.where(active, gain, torch.zeros((), dtype=gain.dtype, device=dev))

    s2_s = torch.where(active.any(1), noise_var, torch.ones((), dtype=torch.float64, device=dev))

    # Scenes sorted by K so that each vectorised chunk uses (nearly) only the slots it needs.
    P = len(params)
    step = max(1, int(batch if batch is not None else (64 if dev.type == "cpu" else 2048)))
    order = torch.argsort(K, stable=True)
    K_sorted = K[order].tolist()
    sd = torch.full((S, P, K_max), math.nan, dtype=torch.float64, device=dev)
    regular = torch.ones(S, dtype=torch.bool, device=dev)
    cov = torch.full((S, P, K_max, P, K_max), math.nan, dtype=torch.float64, device=dev) if full else None
    for a in range(0, S, step):
        ix = order[a : a + step]
        Kc = max(1, max(K_sorted[a : a + step]))
        act = active[ix, :Kc]
        F = fisher_information(
            H[ix], codes[ix], phi_s[ix, :Kc], theta_s[ix, :Kc], r_s[ix, :Kc], p_s[ix, :Kc], s2_s[ix],
            scenario, signal=signal, active=act, gain=None if g_s is None else g_s[ix, :Kc], params=params,
        )
        blocks = P + (1 if signal == "stochastic" else 2)  # per-source parameter blocks (sigma^2 last)
        unused = torch.zeros(F.shape[0], F.shape[-1], dtype=torch.bool, device=dev)
        unused[:, : blocks * Kc] = (~act).repeat(1, blocks)
        inv, ident, reg = _invert(F, unused, rcond)
        regular[ix] = reg
        var = torch.diagonal(inv, dim1=-2, dim2=-1)[:, : P * Kc].reshape(-1, P, Kc)
        okp = ident[:, : P * Kc].reshape(-1, P, Kc)
        sdc = torch.where(okp, var.clamp(min=0).sqrt(), torch.full_like(var, math.inf))
        sd[ix, :, :Kc] = torch.where(act.unsqueeze(1), sdc, torch.full_like(sdc, math.nan))
        if full:
            blk = inv[:, : P * Kc, : P * Kc].reshape(-1, P, Kc, P, Kc)
            blk = torch.where(okp.view(-1, P, Kc, 1, 1) & okp.view(-1, 1, 1, P, Kc), blk, torch.full_like(blk, math.inf))
            blk = torch.where(act.view(-1, 1, Kc, 1, 1) & act.view(-1, 1, 1, 1, Kc), blk, torch.full_like(blk, math.nan))
            cov[ix, :, :Kc, :, :Kc] = blk

    nan = torch.full((S, K_max), math.nan, dtype=torch.float64, device=dev)
    res = {q: (sd[:, params.index(q)] if q in params else nan.clone()) for q in POSITION_PARAMS}
    return CRBResult(
        phi=res["phi"], theta=res["theta"], r=res["r"], regular=regular,
        position_cov=cov.reshape(S, P * K_max, P * K_max) if full else None,
        signal=signal, params=params,
    )


def _as64(t, name: str, device) -> Tensor:
    try:
        return torch.as_tensor(t, device=device).to(torch.float64)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot read as a real tensor ({exc})") from None


def _check_finite(active: Tensor, noise_var: Tensor, **fields_: Tensor) -> None:
    for name, t in fields_.items():
        bad = active & ~torch.isfinite(t)
        if bool(bad.any()):
            s, k = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"{name} of scene {s}, source {k} is not finite")
    bad = active.any(1) & ~(torch.isfinite(noise_var) & (noise_var > 0))
    if bool(bad.any()):
        s = int(torch.nonzero(bad)[0])
        raise ValueError(f"noise_var of scene {s} must be finite and > 0, got {float(noise_var[s])}")
    badp = active & (fields_["power"] < 0)
    if bool(badp.any()):
        s, k = (int(v) for v in torch.nonzero(badp)[0])
        raise ValueError(f"power of scene {s}, source {k} is negative")


def crb_for_scenes(scenes, signal: str | None = None, **options) -> CRBResult:
    """:func:`crb` of ``scenes.truth`` (signal defaults to ``scenes.scenario.signal``).

    Needs the truth group (ValueError otherwise). Options are passed to :func:`crb`. The bound
    uses what the receiver knows, ``scenes.H`` and ``scenes.codes``: for scenes with
    impairments (docs/model.md, "Impairments") it is the bound of the ideal model with the
    estimated channel and the commanded codes, not a bound for the impaired measurement
    (``truth.H`` and ``truth.codes`` are not used).
    """
    if scenes.truth is None:
        raise ValueError("the CRB needs the true source positions: these scenes have no truth group")
    t = scenes.truth
    return crb(
        scenes.H, scenes.codes, t.phi, t.theta, t.r, t.power, t.noise_var, scenes.scenario,
        signal=signal or scenes.scenario.signal, K=t.K, **options,
    )
