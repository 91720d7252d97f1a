"""Building blocks of the ``ml`` estimator: the per-snapshot measurement of steering vectors
and the two likelihoods (stochastic and static signal model) with their gradients and Fisher matrices.

Symbols are those of docs/model.md: element positions e_n, direction
u(phi, theta) = (cos(theta) sin(phi), sin(theta), cos(theta) cos(phi)), range r, and

    a_n = (r / d_n) exp(-j 2 pi (d_n - r) / lambda),   d_n = |r u - e_n|.

The range is parametrised by its inverse rho = 1 / r (range resolution is nearly
uniform in 1/r: the Fresnel phase term is (|e|^2 - (u.e)^2) / (2 r)).
Steering vectors and their derivatives in (phi, theta, rho) come from
:func:`risloc.physics.steering_with_derivatives` (``range_param="rho"``).
All functions are batched over leading dimensions and run on the tensors' device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import grids, physics
from ..crb import stochastic_fisher, stochastic_fisher_parts
from ..scenario import Scenario


def solve(A: Tensor, B: Tensor) -> Tensor:
    """X = A^-1 B for batched square A, as ``torch.linalg.solve`` but without its host
    synchronisation on CUDA (``solve_ex``: the error check would wait for the device at every
    refinement step); where A is singular X is NaN, which the callers treat as "no step" or an
    infinite NLL instead of an exception."""
    X, info = torch.linalg.solve_ex(A, B)
    bad = (info != 0).view(*info.shape, *([1] * (X.ndim - info.ndim)))
    return torch.where(bad, torch.full_like(X, float("nan")), X)


def inverse(A: Tensor) -> Tensor:
    """A^-1 for batched square A, as ``torch.linalg.inv`` without the host synchronisation
    (``inv_ex``); NaN where A is singular (see :func:`solve`)."""
    X, info = torch.linalg.inv_ex(A)
    bad = (info != 0).view(*info.shape, 1, 1)
    return torch.where(bad, torch.full_like(X, float("nan")), X)


def power_scales(y: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The per-scene mean powers of ``y`` and ``H`` ``[B, ...]`` that :func:`unit_power` divides by
    (1 where a power is 0), each ``[B]``, and the mask ``[B]`` of scenes whose y is all zero."""
    ypow = y.abs().square().mean((1, 2))  # [B]
    empty = ~(ypow > 0)
    hpow = H.abs().square().mean((1, 2))
    return torch.where(empty, torch.ones_like(ypow), ypow), torch.where(hpow > 0, hpow, torch.ones_like(hpow)), empty


def unit_power(y: Tensor, H: Tensor, scales: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y`` and ``H`` ``[B, ...]`` scaled per scene to unit mean power (the likelihood estimators'
    scale invariance: a global gain on y or H does not change the answer), and the mask ``[B]`` of
    scenes whose y is all zero (left as they are). ``scales``: :func:`power_scales` of ``y`` and
    ``H`` where the caller has them."""
    B = y.shape[0]
    ypow, hpow, empty = power_scales(y, H) if scales is None else scales
    y = y / torch.sqrt(ypow).to(y.dtype).view(B, 1, 1)
    H = H / torch.sqrt(hpow).to(H.dtype).view(B, 1, 1)
    return y, H, empty


def measure(H: Tensor, codes: Tensor, vectors: Tensor, G: Tensor | None = None) -> Tensor:
    """``G_l v`` for every snapshot: H ``[B, M, N]``, codes ``[B, L, N]``, vectors ``[B, P, N]`` -> ``[B, L, M, P]``.

    G_l = H diag(c_l); computed as H (c_l * v) with one batched matmul, or, where the caller has
    the stacked maps ``G`` (:func:`risloc.grids.maps`, e.g. once for many evaluations on the same scenes), as
    G v with one batched matmul that writes no [B, L P, N] intermediate.
    """
    B, L, N = codes.shape
    P = vectors.shape[1]
    if G is not None:
        return (G @ vectors.transpose(-1, -2)).view(B, L, -1, P)
    X = (codes.unsqueeze(2) * vectors.unsqueeze(1)).reshape(B, L * P, N)  # [B, L P, N]
    return (H @ X.transpose(-1, -2)).view(B, -1, L, P).transpose(1, 2)  # [B, L, M, P]


def cholesky_inverse(Lc: Tensor, *, triangular_solve: bool | None = None) -> Tensor:
    """C^-1 = Lc^-H Lc^-1 from the lower Cholesky factor ``Lc`` ``[..., M, M]`` of C.

    ``triangular_solve`` (default on CUDA): Lc^-1 by one batched triangular solve, then one
    product; ``torch.cholesky_inverse`` (the default on the CPU, where it is twice as fast) waits
    for the device to check its error codes on CUDA, which stalls every refinement step."""
    if triangular_solve is None:
        triangular_solve = Lc.device.type == "cuda"
    if not triangular_solve:
        return torch.cholesky_inverse(Lc)
    eye = torch.eye(Lc.shape[-1], dtype=Lc.dtype, device=Lc.device)
    Li = torch.linalg.solve_triangular(Lc, eye.expand_as(Lc), upper=False)
    return Li.mH @ Li


def hermitian_solve_parts(C: Tensor):
    """Cholesky of Hermitian positive-definite ``C`` ``[..., M, M]`` = Lc Lc^H: returns
    (C^-1, log det C, the factorisation's info)."""
    Lc, info = torch.linalg.cholesky_ex(C)
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    Lc = torch.where(info.ne(0).view(*info.shape, 1, 1), eye, Lc)  # failed factorisations: NLL set to inf by the caller
    logdet = 2 * torch.log(torch.diagonal(Lc, dim1=-2, dim2=-1).real.clamp_min(1e-30)).sum(-1)
    return cholesky_inverse(Lc), logdet, info


def _mask_parameters(grad: Tensor, F: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Take the parameters where ``mask`` ``[B, P]`` is False out of the model: gradient 0,
    Fisher rows and columns those of the identity."""
    grad = grad * mask
    mm = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return grad, torch.where(mm, F, torch.diag_embed((~mask).to(F.dtype)))


def stochastic_eval(
    phi: Tensor,
    theta: Tensor,
    rho: Tensor,
    logp: Tensor,
    logs: Tensor,
    active: Tensor,
    y: Tensor,
    H: Tensor,
    codes: Tensor,
    scenario: Scenario,
    *,
    derivatives: bool = True,
    floor: Tensor | None = None,
    G: Tensor | None = None,
    compiled: bool = False,
):
    """Stochastic negative log-likelihood, its gradient and Fisher matrix (batched over scenes).

    Model (docs/model.md, stochastic signals): y_l ~ CN(0, C_l),

        C_l = B_l P B_l^H + sigma^2 I,   B_l = G_l A(eta),   P = diag(p_1..p_K),
        NLL = sum_l [ log det C_l + y_l^H C_l^-1 y_l ]   (constant L M log pi dropped).

    Parameters per scene: phi, theta, rho = 1/r, log p (each ``[B, K]``) and log sigma^2 ``[B]``,
    ordered [phi_1..K, theta_1..K, rho_1..K, logp_1..K, log sigma^2]. ``active`` ``[B, K]`` masks
    sources out of the model (their gradient is 0 and their Fisher rows/columns identity).

    Gradient  g_i = sum_l Re tr(C^-1 C_i) - Re(z^H C_i z),  z = C^-1 y,
    Fisher    F_ij = sum_l Re tr(C^-1 C_i C^-1 C_j)          (Slepian-Bangs),
    with C_i = dC/d eta_i: p_k (b'_k b_k^H + b_k b'_k^H) for a position parameter,
    p_k b_k b_k^H for log p_k and sigma^2 I for log sigma^2.

    Three steps: the measured steering vectors and their derivatives V = G [a, da/dphi, da/dtheta,
    da/drho]; the complex linear algebra (C, its Cholesky factor, C^-1, z = C^-1 y, W = V^H C^-1 V,
    w = V^H z, V^H C^-2 V); the NLL, gradient and Fisher matrix from those products (the formulas
    in :func:`stochastic_assembly`), in complex arithmetic, whose rounding gives a scene the same
    answer at any batch size.

    ``floor`` (optional): a known model-error covariance added to the noise, either a white
    variance f_l per snapshot ``[B, L]``, C_l = B_l P B_l^H + (sigma^2 + f_l) I (:func:`mismatch_floor`),
    or a matrix F_l ``[B, L, M, M]``, C_l = B_l P B_l^H + sigma^2 I + F_l (:func:`coloured_floor`); it is
    a constant of the parametrisation, so the gradient and Fisher formulas above are unchanged
    (dC/d log sigma^2 is still sigma^2 I). ``G``: the scenes' stacked maps (:func:`risloc.grids.maps`), where
    the caller keeps them. ``compiled`` (``ml``'s ``compile`` option): the whole evaluation in real
    arithmetic (:func:`stochastic_eval_parts`) through ``torch.compile``; the same formulas,
    C^-1 and log det C by Gauss-Jordan elimination instead of the Cholesky factor, rounded
    otherwise (not promised bit-identical between batch sizes).
    """
    B, K = phi.shape
    cd = y.dtype
    if compiled:
        f = None if floor is None else (torch.view_as_real(floor.to(cd)) if floor.ndim == 4 else floor)
        return stochastic_eval_parts(phi, theta, rho, logp, logs, active, *_real_inputs(y, H, codes, G, scenario, phi),
                                     f, derivatives, step=compile_step)
    a, da_p, da_t, da_r = physics.steering_with_derivatives(phi, theta, rho, scenario, range_param="rho", dtype=cd)
    vectors = torch.cat([a, da_p, da_t, da_r], dim=1) if derivatives else a
    V = measure(H, codes, vectors, G)  # [B, L, M, 4K] (or [B, L, M, K])
    Bm = V[..., :K]
    p = torch.exp(logp) * active.to(phi.dtype)  # [B, K]
    s2 = torch.exp(logs)  # [B]
    coloured = floor is not None and floor.ndim == 4
    v = s2.view(B, 1) if floor is None or coloured else s2.view(B, 1) + floor  # white variance per snapshot, [B, 1 or L]
    C = (Bm * p.to(cd).view(B, 1, 1, K)) @ Bm.mH
    C.diagonal(dim1=-2, dim2=-1).add_(v.view(B, -1, 1))  # + v I
    if coloured:
        C = C + floor.to(cd)
    Cinv, logdet, info = hermitian_solve_parts(C)
    z = (Cinv @ y.unsqueeze(-1)).squeeze(-1)  # [B, L, M]
    failed = info.ne(0).any(-1)
    if not derivatives:
        nll = (logdet + (y.conj() * z).real.sum(-1)).sum(-1)
        return nll.masked_fill(failed, float("inf")), None, None
    CV = Cinv @ V  # [B, L, M, 4K]
    W = V.mH @ CV  # blocks (b, b'_phi, b'_theta, b'_rho) x (same)
    w = V.mH @ z.unsqueeze(-1)  # [B, L, 4K, 1]
    U = CV[..., :K].mH @ CV  # the first K rows of V^H C^-2 V (all the Fisher matrix reads)
    # stochastic_assembly's formulas in complex arithmetic
    nll = (logdet + (y.conj() * z).real.sum(-1)).sum(-1).masked_fill(failed, float("inf"))
    A0 = W.view(B, -1, 4, K, 4, K)[:, :, 0]  # [B, L, a, J, c]
    wr = w.view(B, -1, 4, K)
    gl = 2 * (torch.diagonal(A0, dim1=-3, dim2=-1).real - (wr.conj() * wr[:, :, :1]).real).sum(1)  # [B, i, a]
    gl = torch.roll(gl, -1, dims=1).reshape(B, 4 * K)
    trC = torch.diagonal(Cinv, dim1=-2, dim2=-1).real.sum(-1)  # [B, L]
    trC2 = grids.sum_abs2(Cinv, dim=(-2, -1)).sum(-1)  # tr(C^-2) = |C^-1|_F^2 (Hermitian)
    g_s = s2 * (trC - torch.view_as_real(z).square().sum((-1, -2))).sum(1)
    grad = torch.cat([torch.cat([p, p, p, 0.5 * p], dim=1) * gl, g_s.unsqueeze(-1)], dim=1)
    F = stochastic_fisher(W, U, trC2, p, s2, 3, log_params=True)
    mask = torch.cat([active, active, active, active, torch.ones_like(active[:, :1])], dim=1)  # [B, P]
    return (nll, *_mask_parameters(grad, F, mask))


def steering_vector_parts(phi: Tensor, theta: Tensor, rho: Tensor, e: Tensor, e2: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of [a, da/dphi, da/dtheta, da/drho] ``[B, 4K, N]`` (K sources per
    scene, columns in that order) from :func:`risloc.physics.steering_parts` (range parameter rho),
    in real arithmetic: a = amp (cos + j sin)(phase), da = a (l_re + j l_im)."""
    amp, phase, l_re, l_im = physics.steering_parts(phi, theta, rho, e, e2, k, range_param="rho")
    ar, ai = amp * torch.cos(phase), amp * torch.sin(phase)
    dr, di = ar * l_re - ai * l_im, ar * l_im + ai * l_re  # [3, B, K, N]
    return torch.cat([ar, dr[0], dr[1], dr[2]], 1), torch.cat([ai, di[0], di[1], di[2]], 1)


def stochastic_assembly(y: Tensor, z: Tensor, logdet: Tensor, failed: Tensor, Cinv: Tensor, W: Tensor, w: Tensor,
                        U: Tensor, p: Tensor, s2: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The NLL, gradient and Fisher matrix of :func:`stochastic_eval` from its products, as real
    views (``torch.view_as_real``, last axis (Re, Im)): ``y``, ``z = C^-1 y`` ``[B, L, M, 2]``,
    ``Cinv`` ``[B, L, M, M, 2]``, ``W = V^H C^-1 V`` ``[B, L, 4K, 4K, 2]``, ``w = V^H z`` ``[B, L, 4K, 1, 2]``;
    ``U`` the real part of the first K rows of V^H C^-2 V ``[B, L, K, 4K]``; ``logdet`` ``[B, L]``,
    ``failed`` ``[B]`` (a Cholesky factorisation failed: NLL inf), ``p``, ``active`` ``[B, K]``, ``s2`` ``[B]``.

    Every C_i (i < 4K) is c_i (v_x1 v_y1^H + v_x2 v_y2^H) with v's columns of V, so per snapshot
    tr(C^-1 v_x v_y^H) = W[y, x] and z^H v_x v_y^H z = conj(w_x) w_y: the gradient of a position or
    log-power parameter of source a is c_i 2 sum_l Re(W[b_a, v_i] - conj(w_i) w_b_a), that of log sigma^2
    sigma^2 sum_l (tr C^-1 - |z|^2); the Fisher matrix is :func:`risloc.crb.stochastic_fisher_parts`
    with tr C^-2 = |C^-1|_F^2 (Hermitian). Real arithmetic only (``torch.compile`` fuses it).
    """
    B, K = p.shape
    L = logdet.shape[1]
    nll = (logdet + (y * z).sum((-1, -2))).sum(-1)  # Re(y^H z) = Re y . Re z + Im y . Im z
    nll = nll.masked_fill(failed, float("inf"))
    Wr, Wi = W[..., 0], W[..., 1]
    wr, wi = w[..., 0, 0].view(B, L, 4, K), w[..., 0, 1].view(B, L, 4, K)
    A0 = Wr.view(B, L, 4, K, 4, K)[:, :, 0]  # [B, L, a, J, c]
    gl = 2 * (torch.diagonal(A0, dim1=-3, dim2=-1) - (wr * wr[:, :, :1] + wi * wi[:, :, :1])).sum(1)  # [B, i, a]
    gl = torch.roll(gl, -1, dims=1).reshape(B, 4 * K)  # blocks (b, b'_phi, b'_theta, b'_rho) -> parameters phi, theta, rho, log p
    coef = torch.cat([p, p, p, 0.5 * p], dim=1)  # [B, 4K]
    trC = torch.diagonal(Cinv[..., 0], dim1=-2, dim2=-1).sum(-1)  # [B, L]
    trC2 = Cinv.square().sum((-1, -2, -3)).sum(-1)  # sum_l tr(C^-2) = |C^-1|_F^2
    g_s = s2 * (trC - z.square().sum((-1, -2))).sum(1)
    grad = torch.cat([coef * gl, g_s.unsqueeze(-1)], dim=1)
    F = stochastic_fisher_parts(Wr, Wi, U, trC2, p, s2, 3, log_params=True)
    mask = torch.cat([active, active, active, active, torch.ones_like(active[:, :1])], dim=1)  # [B, P]
    return (nll, *_mask_parameters(grad, F, mask))


def _real_inputs(y: Tensor, H: Tensor, codes: Tensor, G: Tensor | None, scenario: Scenario, like: Tensor) -> tuple:
    """The arguments ``y, H, codes, G, e, e2, k`` of :func:`stochastic_eval_parts` and
    :func:`static_eval_parts`: the measurements, channel, codes (in y's dtype) and maps (or None)
    as real views, the element geometry in the dtype and on the device of ``like`` and
    k = 2 pi / lambda."""
    r = torch.view_as_real
    e, e2 = physics.element_geometry(scenario, like.dtype, like.device)
    return r(y), r(H), r(codes.to(y.dtype)), None if G is None else r(G), e, e2, 2 * math.pi / scenario.wavelength


def _small_product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for small batched matrices as one broadcast product and sum, which ``torch.compile``
    generates in place with its neighbours (a library call per product costs more than the
    arithmetic of a 16 x 16 matrix; this form is meant for compiled callers only)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _complex_product(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor, product=_small_product) -> tuple[Tensor, Tensor]:
    """(ar + j ai)(br + j bi) = (ar br - ai bi) + j (ar bi + ai br), in real arithmetic."""
    return product(ar, br) - product(ai, bi), product(ar, bi) + product(ai, br)


def _adjoint_product(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor, product=_small_product) -> tuple[Tensor, Tensor]:
    """(ar + j ai)^H (br + j bi) = (ar^T br + ai^T bi) + j (ar^T bi - ai^T br), in real arithmetic
    (^T: the last two axes swapped)."""
    arT, aiT = ar.transpose(-1, -2), ai.transpose(-1, -2)
    return product(arT, br) + product(aiT, bi), product(arT, bi) - product(aiT, br)


def _times_vectors(A: Tensor, Xr: Tensor, Xi: Tensor) -> tuple[Tensor, Tensor]:
    """(Re, Im) of A X^T ``[B, R, J]`` for a complex matrix A given as its real view ``[B, R, N, 2]``
    and vectors X = Xr + j Xi ``[B, J, N]``, as ONE real product that reads A in place: A's rows
    with Re and Im interleaved ``[B, R, 2N]`` times ``[[Xr, Xi], [-Xi, Xr]]`` interleaved alike
    ``[B, 2N, 2J]`` (Re(a x) = Re a Re x - Im a Im x, Im(a x) = Re a Im x + Im a Re x)."""
    B, R, N = A.shape[0], A.shape[1], A.shape[2]
    J = Xr.shape[1]
    X = torch.cat([torch.stack([Xr, -Xi], -1), torch.stack([Xi, Xr], -1)], 1).view(B, 2 * J, 2 * N)
    V = A.reshape(B, R, 2 * N) @ X.transpose(-1, -2)
    return V[..., :J], V[..., J:]


def hermitian_inverse_parts(Cr: Tensor, Ci: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """C^-1 and log det C of Hermitian positive-definite C = Cr + j Ci ``[..., M, M]`` in real
    arithmetic, by Gauss-Jordan elimination in place without pivoting:
    for k = 1..M with the pivot d_k = A_kk,

        row k     <- A_k. / d_k            (column k of the identity kept in column k),
        row i != k <- A_i. - A_ik A_k. / d_k,

    after which A = C^-1; the pivots are the successive Schur complements, real and positive for
    a positive-definite C, and log det C = sum_k log d_k. M unrolled steps of one rank-one update
    each, for a compiled caller (``torch.compile`` fuses them; PyTorch's factorisations have no
    compiled form and run one small matrix at a time on the CPU). Returns (Re C^-1, Im C^-1,
    log det C ``[...]``, failed ``[...]``: a pivot was not positive, as where a Cholesky
    factorisation fails; the other outputs are then finite but meaningless)."""
    M = Cr.shape[-1]
    col = torch.arange(M, device=Cr.device)
    logdet = torch.zeros(Cr.shape[:-2], dtype=Cr.dtype, device=Cr.device)
    failed = torch.zeros(Cr.shape[:-2], dtype=torch.bool, device=Cr.device)
    Ar, Ai = Cr, Ci
    for k in range(M):
        d = Ar[..., k, k]
        failed = failed | ~(d > 0)
        d = torch.where(d > 0, d, torch.ones_like(d))
        logdet = logdet + torch.log(d)
        d = d.unsqueeze(-1)
        is_k = col == k
        rr = torch.where(is_k, 1.0, Ar[..., k, :]) / d  # the new row k, [..., M]
        ri = torch.where(is_k, 0.0, Ai[..., k, :]) / d
        fr = torch.where(is_k, 0.0, Ar[..., :, k]).unsqueeze(-1)  # the multipliers A_ik (i != k), [..., M, 1]
        fi = torch.where(is_k, 0.0, Ai[..., :, k]).unsqueeze(-1)
        rr, ri = rr.unsqueeze(-2), ri.unsqueeze(-2)
        row_k = is_k.unsqueeze(-1)
        Ar = torch.where(row_k, rr, torch.where(is_k, 0.0, Ar) - (fr * rr - fi * ri))
        Ai = torch.where(row_k, ri, torch.where(is_k, 0.0, Ai) - (fr * ri + fi * rr))
    return Ar, Ai, logdet, failed


def stochastic_eval_parts(phi: Tensor, theta: Tensor, rho: Tensor, logp: Tensor, logs: Tensor, active: Tensor,
                          y: Tensor, H: Tensor, codes: Tensor, G: Tensor | None, e: Tensor, e2: Tensor, k: float,
                          floor: Tensor | None = None, derivatives: bool = True, *, step=None):
    """:func:`stochastic_eval` (the same arguments and outputs) in real arithmetic only, the form
    that ``torch.compile`` generates code for (``ml``'s ``compile`` option; it generates none for
    complex operators). ``y`` ``[B, L, M, 2]``, ``H`` ``[B, M, N, 2]``, ``codes`` ``[B, L, N, 2]`` and
    the stacked maps ``G`` ``[B, L M, N, 2]`` (or None) as real views (last axis (Re, Im)); ``e``,
    ``e2``: the element geometry (:func:`risloc.physics.element_geometry`), ``k = 2 pi / lambda``;
    ``floor``: None, white ``[B, L]`` or a matrix as a real view ``[B, L, M, M, 2]``.

    The same three steps, each a function: V and C (:func:`_measured_covariance`); C^-1 and
    log det C (:func:`hermitian_inverse_parts`); the products and the NLL, gradient and Fisher
    matrix (:func:`_likelihood_from_inverse`). ``step`` (e.g. :func:`compile_step`) wraps each of them:
    the compiled form is three graphs, because inductor fused the elimination's updates with the
    products that read its result into loops that ran several times slower than the two apart
    (a trial at 64 scenes on a 2-core CPU; at one scene one graph was a little faster).
    """
    step = step or (lambda f: f)
    Vr, Vi, Cr, Ci, p, s2 = step(_measured_covariance)(phi, theta, rho, logp, logs, active, y, H, codes, G, e, e2, k,
                                                      floor, derivatives)
    Qr, Qi, logdet, failed = step(hermitian_inverse_parts)(Cr, Ci)
    return step(_likelihood_from_inverse)(Qr, Qi, logdet, failed, Vr, Vi, y, p, s2, active, derivatives)


def measured_vector_parts(phi: Tensor, theta: Tensor, rho: Tensor, H: Tensor, codes: Tensor, G: Tensor | None, e: Tensor,
                          e2: Tensor, k: float, derivatives: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`measure` of [a, da/dphi, da/dtheta, da/drho] (only a without ``derivatives``) in real
    arithmetic: the vectors by :func:`steering_vector_parts`, then one real product with the
    stacked maps G, or with H after the codes where G is None (real views as in
    :func:`stochastic_eval_parts`). Returns (Re V, Im V) ``[B, L, M, 4K or K]``."""
    B, L, M = codes.shape[0], codes.shape[1], H.shape[1]
    if derivatives:
        Xr, Xi = steering_vector_parts(phi, theta, rho, e, e2, k)  # [B, 4K, N]
    else:
        amp, phase, _, _ = physics.steering_parts(phi, theta, rho, e, e2, k, range_param="rho")
        Xr, Xi = amp * torch.cos(phase), amp * torch.sin(phase)
    if G is not None:
        Vr, Vi = _times_vectors(G, Xr, Xi)
        return Vr.view(B, L, M, -1), Vi.view(B, L, M, -1)
    # G_l x = H (c_l * x): the codes times the vectors [B, L, 4K, N], then one product with H
    cr, ci = codes[..., 0].unsqueeze(2), codes[..., 1].unsqueeze(2)
    Xr, Xi = Xr.unsqueeze(1), Xi.unsqueeze(1)
    Vr, Vi = _times_vectors(H, (cr * Xr - ci * Xi).flatten(1, 2), (cr * Xi + ci * Xr).flatten(1, 2))
    return Vr.view(B, M, L, -1).transpose(1, 2), Vi.view(B, M, L, -1).transpose(1, 2)


def _measured_covariance(phi: Tensor, theta: Tensor, rho: Tensor, logp: Tensor, logs: Tensor, active: Tensor,
                         y: Tensor, H: Tensor, codes: Tensor, G: Tensor | None, e: Tensor, e2: Tensor, k: float,
                         floor: Tensor | None, derivatives: bool):
    """Step 1 of :func:`stochastic_eval_parts`: V (:func:`measured_vector_parts`) and
    C = B P B^H + v I (+ F). Returns (Re V, Im V ``[B, L, M, 4K or K]``, Re C, Im C ``[B, L, M, M]``,
    p ``[B, K]``, sigma^2 ``[B]``)."""
    B, K = phi.shape
    M = y.shape[2]
    Vr, Vi = measured_vector_parts(phi, theta, rho, H, codes, G, e, e2, k, derivatives)
    p = torch.exp(logp) * active.to(phi.dtype)
    s2 = torch.exp(logs)
    Br, Bi = Vr[..., :K], Vi[..., :K]
    pBr, pBi = Br * p.view(B, 1, 1, K), Bi * p.view(B, 1, 1, K)
    Cr = _small_product(pBr, Br.transpose(-1, -2)) + _small_product(pBi, Bi.transpose(-1, -2))  # B P B^H
    Ci = _small_product(pBi, Br.transpose(-1, -2)) - _small_product(pBr, Bi.transpose(-1, -2))
    white = s2.view(B, 1) if floor is None or floor.ndim == 5 else s2.view(B, 1) + floor  # [B, 1 or L]
    Cr = Cr + torch.eye(M, dtype=Cr.dtype, device=Cr.device) * white.view(B, -1, 1, 1)
    if floor is not None and floor.ndim == 5:
        Cr, Ci = Cr + floor[..., 0], Ci + floor[..., 1]
    return Vr, Vi, Cr, Ci, p, s2


def _likelihood_from_inverse(Qr: Tensor, Qi: Tensor, logdet: Tensor, failed: Tensor, Vr: Tensor, Vi: Tensor, y: Tensor,
                             p: Tensor, s2: Tensor, active: Tensor, derivatives: bool):
    """Step 3 of :func:`stochastic_eval_parts`: from C^-1 = Qr + j Qi, log det C and the failed
    eliminations ``[B, L]``, the products z = C^-1 y, W = V^H C^-1 V, w = V^H z and the first K
    rows of V^H C^-2 V as small real products, then the NLL (only, without ``derivatives``),
    gradient and Fisher matrix by :func:`stochastic_assembly`."""
    K = p.shape[1]
    yr, yi = y[..., 0], y[..., 1]
    failed = failed.any(-1)
    zr, zi = _complex_product(Qr, Qi, yr.unsqueeze(-1), yi.unsqueeze(-1))
    zr, zi = zr.squeeze(-1), zi.squeeze(-1)
    if not derivatives:
        nll = (logdet + (yr * zr + yi * zi).sum(-1)).sum(-1)
        return nll.masked_fill(failed, float("inf")), None, None
    CVr, CVi = _complex_product(Qr, Qi, Vr, Vi)  # C^-1 V
    W = torch.stack(_adjoint_product(Vr, Vi, CVr, CVi), -1)  # V^H C^-1 V
    w = torch.stack(_adjoint_product(Vr, Vi, zr.unsqueeze(-1), zi.unsqueeze(-1)), -1)  # V^H z
    U = _adjoint_product(CVr[..., :K], CVi[..., :K], CVr, CVi)[0]  # Re of the first K rows of V^H C^-2 V
    return stochastic_assembly(y, torch.stack([zr, zi], -1), logdet, failed, torch.stack([Qr, Qi], -1), W, w, U, p, s2, active)


_COMPILED: dict = {}


def compile_step(fn):
    """``fn`` through ``torch.compile`` (inductor; compiled at its first call for each new shape,
    which takes seconds), once per function and process. A failure to compile it (an exception of
    ``torch._dynamo``, e.g. no working C++ compiler) raises with what the option needs; any other
    error of the call (e.g. out of memory) passes unchanged. Inductor's FX graph cache is off for these functions: on the CPU
    it served a graph compiled under the default kernels to a process started with
    ``ATEN_CPU_CAPABILITY=avx2``, which then crashed (segmentation fault, torch 2.13); the compiled
    kernels themselves are still cached on disk by their source."""
    c = _COMPILED.get(fn)
    if c is None:
        compiled_fn = torch.compile(fn, fullgraph=True, options={"fx_graph_cache": False})

        def c(*args):
            try:
                return compiled_fn(*args)
            except Exception as exc:
                from torch._dynamo.exc import TorchDynamoException

                if not isinstance(exc, TorchDynamoException):
                    raise
                raise RuntimeError(f"ml: compile=True: torch.compile of {fn.__name__} failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}); it needs a C++ compiler on the CPU "
                                   "and Triton on CUDA. Run without the compile option.") from exc

        _COMPILED[fn] = c
    return c


def static_eval(
    phi: Tensor,
    theta: Tensor,
    rho: Tensor,
    active: Tensor,
    y: Tensor,
    H: Tensor,
    codes: Tensor,
    scenario: Scenario,
    *,
    derivatives: bool = True,
    ridge: float = 1e-6,
    G: Tensor | None = None,
    compiled: bool = False,
):
    """Static (deterministic) model with the amplitudes and sigma^2 concentrated out.

    Stacking the L snapshots, y = Psi(eta) g + n with Psi = [G_1 A; ...; G_L A] (L M x K).
    For fixed positions the ML amplitudes are g = Psi^+ y and the residual sum of squares
    RSS = |y - Psi g|^2; with sigma^2 = RSS / (L M) concentrated out,

        NLL = L M log(RSS)   (constants dropped).

    Gauss-Newton (variable projection, Kaufman's approximation): J_i = P_perp dPsi/d eta_i g,
    gradient of RSS = -2 Re(J^H r), normal matrix 2 Re(J^H J); returned scaled to the NLL
    (times L M / RSS). Parameters [phi_1..K, theta_1..K, rho_1..K]. Also returns g ``[B, K]``.
    ``G``: the scenes' stacked maps (:func:`risloc.grids.maps`), where the caller keeps them.
    ``compiled`` (``ml``'s ``compile`` option): the same in real arithmetic through ``torch.compile``
    (:func:`static_eval_parts`), rounded otherwise.
    """
    B, K = phi.shape
    L, M = y.shape[1], y.shape[2]
    cd = y.dtype
    if compiled:
        nll, grad, F, gr, gi = static_eval_parts(phi, theta, rho, active, *_real_inputs(y, H, codes, G, scenario, phi),
                                                 ridge, derivatives, step=compile_step)
        return nll, grad, F, torch.complex(gr, gi)
    a, da_p, da_t, da_r = physics.steering_with_derivatives(phi, theta, rho, scenario, range_param="rho", dtype=cd)
    act = active.to(cd).view(B, 1, K)
    vecs = torch.cat([a, da_p, da_t, da_r], dim=1) if derivatives else a
    V = measure(H, codes, vecs, G).reshape(B, L * M, -1)  # [B, LM, 4K]
    Psi = V[..., :K] * act
    yv = y.reshape(B, L * M, 1)
    Gm = Psi.mH @ Psi
    scale = torch.diagonal(Gm, dim1=-2, dim2=-1).real.mean(-1).clamp_min(1e-30)  # [B]
    inactive = (1 - act.real.view(B, K)).to(cd)
    Gm = Gm + torch.diag_embed(inactive + (ridge * scale).to(cd).view(B, 1))
    g = solve(Gm, Psi.mH @ yv)  # [B, K, 1]
    res = yv - Psi @ g
    rss = res.abs().square().sum((-1, -2)).clamp_min(1e-30)
    LM = L * M
    nll = LM * torch.log(rss)
    if not derivatives:
        return nll, None, None, g.squeeze(-1)
    gk = g.view(B, 1, K) * act
    J = torch.cat([V[..., (j + 1) * K : (j + 2) * K] * gk for j in range(3)], dim=-1)  # [B, LM, 3K]
    # project onto the orthogonal complement of span(Psi)
    J = J - Psi @ solve(Gm, Psi.mH @ J)
    grad = -2 * (J.mH @ res).real.squeeze(-1) * (LM / rss).unsqueeze(-1)
    F = 2 * (J.mH @ J).real * (LM / rss).view(B, 1, 1)
    mask = torch.cat([active, active, active], dim=1)
    grad, F = _mask_parameters(grad, F, mask)
    return nll, grad, F, g.squeeze(-1)


def static_eval_parts(phi: Tensor, theta: Tensor, rho: Tensor, active: Tensor, y: Tensor, H: Tensor, codes: Tensor,
                      G: Tensor | None, e: Tensor, e2: Tensor, k: float, ridge: float = 1e-6, derivatives: bool = True,
                      *, step=None):
    """:func:`static_eval` in real arithmetic only (``ml``'s ``compile`` option; the inputs as in
    :func:`stochastic_eval_parts`). Two steps, each a function that ``step`` (e.g. :func:`compile_step`)
    wraps: V (:func:`measured_vector_parts`), then :func:`_static_from_vectors`. Returns (NLL,
    gradient, normal matrix, Re g, Im g ``[B, K]``)."""
    step = step or (lambda f: f)
    Vr, Vi = step(measured_vector_parts)(phi, theta, rho, H, codes, G, e, e2, k, derivatives)
    return step(_static_from_vectors)(Vr, Vi, y, active, ridge, derivatives)


def _static_from_vectors(Vr: Tensor, Vi: Tensor, y: Tensor, active: Tensor, ridge: float, derivatives: bool):
    """The variable projection of :func:`static_eval` from V = Vr + j Vi ``[B, L, M, 4K or K]``: the
    Gram Psi^H Psi (+ ridge, + 1 on inactive slots) inverted by :func:`hermitian_inverse_parts`,
    g = (Psi^H Psi)^-1 Psi^H y, RSS, and with ``derivatives`` J = P_perp [dPsi/d eta_i g], the
    gradient and normal matrix, all in real arithmetic. A failed inversion gives a NaN NLL (the
    complex form's singular solve)."""
    B, L, M = y.shape[0], y.shape[1], y.shape[2]
    K = active.shape[1]
    LM = L * M
    Vr, Vi = Vr.reshape(B, LM, -1), Vi.reshape(B, LM, -1)
    act = active.to(Vr.dtype).view(B, 1, K)
    Pr, Pi = Vr[..., :K] * act, Vi[..., :K] * act  # Psi
    yr, yi = y[..., 0].reshape(B, LM, 1), y[..., 1].reshape(B, LM, 1)
    mm = torch.matmul  # the products below run over the L M measurements: library products
    Gr, Gi = _adjoint_product(Pr, Pi, Pr, Pi, mm)  # Psi^H Psi
    scale = torch.diagonal(Gr, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # [B]
    Gr = Gr + torch.diag_embed((1 - act.view(B, K)) + ridge * scale.view(B, 1))
    Qr, Qi, _, failed = hermitian_inverse_parts(Gr, Gi)  # (Psi^H Psi)^-1
    hr, hi = _adjoint_product(Pr, Pi, yr, yi, mm)  # Psi^H y, [B, K, 1]
    gr, gi = _complex_product(Qr, Qi, hr, hi)  # g
    fr, fi = _complex_product(Pr, Pi, gr, gi, mm)  # Psi g
    rr, ri = yr - fr, yi - fi  # res = y - Psi g
    rss = (rr.square() + ri.square()).sum((-1, -2)).clamp_min(1e-30)
    nll = (LM * torch.log(rss)).masked_fill(failed, float("nan"))
    gr, gi = gr.squeeze(-1), gi.squeeze(-1)
    if not derivatives:
        return nll, None, None, gr, gi
    gkr, gki = (gr * act.view(B, K)).view(B, 1, K), (gi * act.view(B, K)).view(B, 1, K)
    Dr, Di = Vr[..., K : 4 * K].view(B, LM, 3, K), Vi[..., K : 4 * K].view(B, LM, 3, K)  # dPsi/d(phi, theta, rho)
    Jr = (Dr * gkr.unsqueeze(2) - Di * gki.unsqueeze(2)).flatten(2)  # [B, LM, 3K]: columns (phi_1..K, theta_1..K, rho_1..K)
    Ji = (Dr * gki.unsqueeze(2) + Di * gkr.unsqueeze(2)).flatten(2)
    # project onto the orthogonal complement of span(Psi): J - Psi (Psi^H Psi)^-1 Psi^H J
    Ar, Ai = _adjoint_product(Pr, Pi, Jr, Ji, mm)  # Psi^H J
    Sr, Si = _complex_product(Qr, Qi, Ar, Ai)  # (Psi^H Psi)^-1 Psi^H J
    PSr, PSi = _complex_product(Pr, Pi, Sr, Si, mm)
    Jr, Ji = Jr - PSr, Ji - PSi
    w = (LM / rss).view(B, 1)
    grad = -2 * _adjoint_product(Jr, Ji, rr, ri, mm)[0].squeeze(-1) * w  # -2 Re(J^H res)
    F = 2 * _adjoint_product(Jr, Ji, Jr, Ji, mm)[0] * w.unsqueeze(-1)  # 2 Re(J^H J)
    mask = torch.cat([active, active, active], dim=1)
    grad, F = _mask_parameters(grad, F, mask)
    return nll, grad, F, gr, gi


def mismatch_level(csi_nmse_db: float | None = None, phase_noise_deg: float = 0.0) -> float:
    """The model-error coefficient e~ of the mismatch floor (:func:`mismatch_floor`) for known
    impairment levels: a CSI error of NMSE ``csi_nmse_db`` (H-hat = H + E, E_mn ~ CN(0, eps |H|_F^2 / (M N)),
    eps = 10^(csi_nmse_db / 10)) and RIS phase noise of standard deviation ``phase_noise_deg``
    (c~ = c exp(j delta), delta ~ N(0, s^2)):

        e~ = eps / (1 + eps) + (exp(s^2) - 1).

    Units: per unit of RIS-domain signal energy |diag(c_l) x_l|^2 and of the mean entry power of
    the known channel H-hat. The CSI term: E is the part of H-hat the truth lacks; with H-hat's
    mean power (1 + eps) |H|_F^2 / (M N) its variance is eps / (1 + eps) of that. The phase-noise
    term: c~ = e^(-s^2/2) c + c w with E|w_n|^2 = 1 - e^(-s^2); the mean part scales the signal
    (the fitted powers are e^(-s^2) of the true ones), so relative to the fitted powers the error
    variance is (1 - e^(-s^2)) / e^(-s^2) = e^(s^2) - 1 (its white approximation: see
    :func:`mismatch_floor`).
    """
    if phase_noise_deg < 0 or not math.isfinite(phase_noise_deg):
        raise ValueError(f"ml: phase_noise_deg = {phase_noise_deg}: must be a finite number >= 0")
    level = math.expm1(math.radians(phase_noise_deg) ** 2)
    if csi_nmse_db is not None:
        if not math.isfinite(csi_nmse_db):
            raise ValueError(f"ml: csi_nmse_db = {csi_nmse_db}: must be finite (or None for exact CSI)")
        eps = 10 ** (csi_nmse_db / 10)
        level += eps / (1 + eps)
    return level


def signal_energy(
    phi: Tensor,
    theta: Tensor,
    rho: Tensor,
    logp: Tensor,
    logs: Tensor,
    active: Tensor,
    y: Tensor,
    H: Tensor,
    codes: Tensor,
    scenario: Scenario,
    floor: Tensor | None = None,
    per_element: bool = False,
) -> Tensor:
    """q_l = E[ |diag(c_l) x_l|^2 | y_l ] ``[B, L]``: the posterior mean of the RIS-domain signal
    energy of each snapshot under the stochastic model of :func:`stochastic_eval` (same arguments;
    a white ``floor`` ``[B, L]`` only). ``per_element``: its terms omega_ln = E[|c_ln x_ln|^2 | y_l]
    ``[B, L, N]`` (q_l = sum_n omega_ln), the diagonal of A~_l (Sigma_l + mu_l mu_l^H) A~_l^H.

    With s(l) ~ CN(0, P) and y_l | s ~ CN(B_l s, v_l I), v_l = sigma^2 (+ floor_l), the posterior of
    s(l) is CN(mu_l, Sigma_l) with S_l = v_l P^-1 + B_l^H B_l, mu_l = S_l^-1 B_l^H y_l and
    Sigma_l = v_l S_l^-1; with A~_l = diag(c_l) [a_1 ... a_K] (N x K) and Gamma_l = A~_l^H A~_l,

        q_l = mu_l^H Gamma_l mu_l + tr(Gamma_l Sigma_l).
    """
    B, K = phi.shape
    L = y.shape[1]
    cd = y.dtype
    a = physics.steering(phi, theta, 1.0 / rho, scenario, dtype=cd) * active.to(cd).unsqueeze(-1)  # [B, K, N]
    Bm = measure(H, codes, a)  # [B, L, M, K]
    s2 = torch.exp(logs).view(B, 1)
    v = (s2 if floor is None else s2 + floor).expand(B, L)
    pinv = torch.where(active, 1.0 / torch.exp(logp), torch.ones_like(logp))  # [B, K]
    S = Bm.mH @ Bm + torch.diag_embed((v.unsqueeze(-1) * pinv.unsqueeze(1)).to(cd))  # [B, L, K, K]
    mu = solve(S, Bm.mH @ y.unsqueeze(-1))  # [B, L, K, 1]
    Sig = v.to(cd).view(B, L, 1, 1) * inverse(S)
    At = codes.unsqueeze(2) * a.unsqueeze(1)  # [B, L, K, N]: rows c_l * a_k
    if per_element:
        um = (At.transpose(-1, -2) @ mu).squeeze(-1)  # A~_l mu_l, [B, L, N]
        var = ((At.transpose(-1, -2) @ Sig) * At.conj().transpose(-1, -2)).sum(-1).real  # diag(A~ Sigma A~^H)
        return torch.nan_to_num(um.abs().square() + var, nan=0.0).clamp_min(0.0)
    Gam = At.conj() @ At.transpose(-1, -2)  # Gamma_l[k, k'] = (c_l a_k)^H (c_l a_k'), [B, L, K, K]
    quad = (mu.mH @ Gam @ mu).real.view(B, L)
    tr = (Gam * Sig.transpose(-1, -2)).sum((-1, -2)).real  # tr(Gamma Sigma)
    return torch.nan_to_num(quad + tr, nan=0.0).clamp_min(0.0)


def coloured_floor(level: Tensor, H: Tensor, omega: Tensor) -> Tensor:
    """The phase-noise floor without the white approximation: F_l = e~ H diag(omega_l) H^H
    ``[B, L, M, M]`` from ``level`` e~ ``[B]`` (or a scalar), the channel ``H`` ``[B, M, N]`` and the
    posterior per-element signal energies ``omega`` ``[B, L, N]`` (:func:`signal_energy` with
    ``per_element=True``). Same trace as :func:`mismatch_floor`'s e~ q_l I when every column of H
    has the mean power; the phase-noise error (1 - e^(-s^2)) H diag(|u_l|^2) H^H lies along the
    channel's strong directions, where the signals are too."""
    level = torch.as_tensor(level, dtype=omega.dtype, device=omega.device)
    Hw = H.unsqueeze(1) * omega.to(H.dtype).unsqueeze(-2)  # H diag(omega_l), [B, L, M, N]
    F = Hw @ H.mH.unsqueeze(1)
    return F * (level.reshape(-1, 1, 1, 1) if level.ndim else level).to(H.dtype)


def mismatch_floor(level: Tensor, q: Tensor) -> Tensor:
    """The model-error floor f_l = e~ q_l ``[B, L]`` of each snapshot: ``level`` e~ ``[B]`` (or a scalar)
    times the posterior signal energy ``q`` ``[B, L]`` (:func:`signal_energy`).

    Why: with the known channel H-hat = H + E and realised codes c~_l = c_l exp(j delta_l),

        y_l = H-hat diag(c_l) x_l  - E diag(c_l) x_l  + H diag(c_l (e^(j delta_l) - 1)) x_l + n_l.

    Given the signals, the CSI term -E u_l (u_l = diag(c_l) x_l) has covariance
    E[E u_l u_l'^H E^H] = e^2 (u_l'^H u_l) I_M (e^2 the entry variance of E): white with variance
    e^2 |u_l|^2 within a snapshot. E is shared by all snapshots, so two snapshots' errors correlate
    by u_l'^H u_l = sum_n conj(c_l'n) c_ln |x_n|^2: zero in the mean for stochastic signals (independent
    s(l)), and of relative size ~ N^-1/2 for static signals with random codes (neglected). The phase-noise
    term has covariance (1 - e^(-s^2)) H diag(|u_l|^2) H^H, independent over snapshots and elements;
    its white approximation (equal trace, |h_n|^2 ~ |H|_F^2 / N for every column) is again
    proportional to |u_l|^2. Marginally over stochastic signals the floor averages to
    e~ sum_k p_k |c_l a_k|^2, which a free sigma^2 would absorb; conditionally it is
    signal-dependent: a snapshot carrying more source energy has a proportionally larger
    model error. The likelihood takes the posterior mean of |u_l|^2 given y_l
    (:func:`signal_energy`, from a fitted model held fixed), which keeps the Gaussian form
    C_l = B_l P B_l^H + (sigma^2 + f_l) I.
    """
    level = torch.as_tensor(level, dtype=q.dtype, device=q.device)
    return level.reshape(-1, 1) * q if level.ndim else level * q
