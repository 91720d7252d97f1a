"""The physics of docs/model.md: geometry, steering vectors, BS-RIS channel, codebooks.

Every function is batched over leading dimensions, differentiable with autograd, and
runs on whatever device its tensor arguments live on. Complex results are complex64
unless ``dtype=torch.complex128`` is asked for; real intermediate work is then done
in float64.

Symbols (docs/model.md):

* element (i, j) at ``e = ((i - (N_H-1)/2) d_H, (j - (N_V-1)/2) d_V, 0)``, flat index
  ``n = j N_H + i``;
* a point ``p = r (cos(theta) sin(phi), sin(theta), cos(theta) cos(phi))``;
* exact steering ``a_n = (r / d_n) exp(-j 2 pi (d_n - r) / lambda)``, ``d_n = |p - e_n|``;
* BS steering ``a_BS,m(psi) = exp(j 2 pi (d_BS/lambda) (m - (M-1)/2) sin(psi))``;
* channel ``H = sqrt(kappa/(1+kappa)) a_BS(psi) b^T + sqrt(1/(1+kappa)) W``;
* the optional impairments (all off by default): realised RIS codes ``c~`` from the commanded
  ones (:func:`realised_codes`: phase noise, phase-dependent amplitude, failed elements) and
  the receiver's channel estimate ``H-hat = H + E`` (:func:`csi_estimate`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .cuda_graphs import cache_entry, register_cache
from .scenario import Scenario

Approximation = Literal["exact", "fresnel"]


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype that matches a complex one (complex64 -> float32, complex128 -> float64)."""
    return torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype that matches a real one."""
    return torch.complex128 if dtype in (torch.complex128, torch.float64) else torch.complex64


def unit_phasor(phase: Tensor) -> Tensor:
    """``exp(j phase)`` as a complex tensor of the matching precision (``torch.complex(cos, sin)``,
    several times faster on CPU than ``torch.polar``)."""
    return torch.complex(torch.cos(phase), torch.sin(phase))


def element_positions(scenario: Scenario, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """RIS element positions ``[N, 3]`` in metres, in the flat order ``n = j * n_h + i``."""
    i = torch.arange(scenario.n_h, dtype=dtype, device=device)
    j = torch.arange(scenario.n_v, dtype=dtype, device=device)
    x = (i - (scenario.n_h - 1) / 2) * scenario.spacing_h
    y = (j - (scenario.n_v - 1) / 2) * scenario.spacing_v
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # [n_v, n_h]: row j, column i -> flat j*n_h + i
    return torch.stack([xx.reshape(-1), yy.reshape(-1), torch.zeros_like(xx).reshape(-1)], dim=-1)


_GEOMETRY: dict = register_cache({})


def element_geometry(scenario: Scenario, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(:func:`element_positions` ``[N, 3]``, their squared norms |e_n|^2 ``[N]``), cached per
    array, dtype and device: the ``e``, ``e2`` inputs of :func:`steering_parts` (every steering call
    of the likelihood's refinement needs them and they would otherwise cost a dozen small
    operations, device kernels, each time). The cached tensors are shared: do not modify them."""
    key = (scenario.n_h, scenario.n_v, scenario.spacing_h, scenario.spacing_v, dtype, str(device))

    def build():
        e = element_positions(scenario, dtype=dtype, device=device)
        return e, (e * e).sum(-1)

    return cache_entry(_GEOMETRY, key, build)


def direction(phi: Tensor, theta: Tensor) -> Tensor:
    """Unit direction ``u = (cos(theta) sin(phi), sin(theta), cos(theta) cos(phi))``, shape ``[..., 3]``."""
    ct = torch.cos(theta)
    return torch.stack([ct * torch.sin(phi), torch.sin(theta), ct * torch.cos(phi)], dim=-1)


def position(phi: Tensor, theta: Tensor, r: Tensor) -> Tensor:
    """Cartesian position ``p = r u(phi, theta)`` [m], shape ``[..., 3]``."""
    return r.unsqueeze(-1) * direction(phi, theta)


def angle_between(phi1: Tensor, theta1: Tensor, phi2: Tensor, theta2: Tensor) -> Tensor:
    """Angle [rad] between the directions (phi1, theta1) and (phi2, theta2) (broadcast).

    Computed as ``2 asin(|u1 - u2| / 2)``, accurate also for tiny angles.
    """
    chord = torch.linalg.vector_norm(direction(phi1, theta1) - direction(phi2, theta2), dim=-1)
    return 2 * torch.asin(torch.clamp(chord / 2, max=1.0))


def _as_tensors(phi, theta, r, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    rd = real_dtype(dtype)
    ref = next((t for t in (phi, theta, r) if isinstance(t, Tensor)), None)
    device = device if device is not None else (ref.device if ref is not None else None)
    # Python numbers become tensors of the working precision directly (not via float32).
    phi, theta, r = (
        t.to(device=device, dtype=rd) if isinstance(t, Tensor) else torch.as_tensor(t, dtype=rd, device=device)
        for t in (phi, theta, r)
    )
    return torch.broadcast_tensors(phi, theta, r)


def steering(
    phi,
    theta,
    r,
    scenario: Scenario,
    *,
    approximation: Approximation = "exact",
    dtype: torch.dtype = torch.complex64,
    device=None,
) -> Tensor:
    """RIS-side steering vectors ``a(phi, theta, r)``, shape ``[..., N]`` (broadcast of the inputs).

    ``approximation="exact"`` (the model of docs/model.md, the simulator's only choice)::

        a_n = (r / d_n) exp(-j 2 pi (d_n - r) / lambda),   d_n = |p - e_n|,

    with ``d_n - r = (|e_n|^2 - 2 p.e_n) / (d_n + r)`` evaluated in that cancellation-free form.

    ``approximation="fresnel"`` (for estimators only) keeps the second-order (Fresnel)
    expansion of the path difference and unit amplitude::

        d_n - r ~ -u.e_n + (|e_n|^2 - (u.e_n)^2) / (2 r).

    Angles in radians, range in metres; differentiable in all three.
    """
    phi, theta, r = _as_tensors(phi, theta, r, dtype, device)
    if approximation not in ("exact", "fresnel"):
        raise ValueError(f"approximation must be 'exact' or 'fresnel', not {approximation!r}")
    path, amplitude = _path_difference(phi, theta, r, scenario, approximation)
    phase = (-2 * math.pi / scenario.wavelength) * path
    return torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))


def _path_difference(phi: Tensor, theta: Tensor, r: Tensor, scenario: Scenario, approximation: Approximation) -> tuple[Tensor, Tensor]:
    """Path difference ``d_n - r`` [m] and amplitude ``r / d_n`` (1 for Fresnel), each ``[..., N]``."""
    rd = phi.dtype
    e, e2 = element_geometry(scenario, rd, phi.device)  # [N, 3], |e_n|^2 [N]
    u = direction(phi, theta)  # [..., 3]
    ue = u @ e.T  # [..., N]
    rr = r.unsqueeze(-1)
    if approximation == "exact":
        # d_n^2 = r^2 - 2 r u.e + |e|^2
        d = torch.sqrt(torch.clamp(rr * rr - 2 * rr * ue + e2, min=torch.finfo(rd).tiny))
        return (e2 - 2 * rr * ue) / (d + rr), rr / d
    path = -ue + (e2 - ue * ue) / (2 * rr)
    return path, torch.ones_like(path)


RangeParam = Literal["r", "rho"]


def steering_with_derivatives(
    phi,
    theta,
    r_or_rho,
    scenario: Scenario,
    *,
    range_param: RangeParam = "r",
    approximation: Approximation = "exact",
    dtype: torch.dtype = torch.complex64,
    device=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Steering ``a`` and its partial derivatives, ``(a, da/dphi, da/dtheta, da/dr)`` (or ``da/drho``).

    Each is ``[..., N]`` (broadcast of the inputs) in ``dtype``; ``a`` is :func:`steering`.
    The range coordinate is ``range_param``:

    * ``"r"`` (the third argument is the range r [m]): used by the Cramér–Rao bound
      (:mod:`risloc.crb`), whose parameters are (phi, theta, r);
    * ``"rho"`` (the third argument is the inverse range rho = 1/r [1/m]): used by ``ml``'s
      likelihood (:mod:`risloc.estimators.ml_core`) and the refinement of the spectrum searches
      (:func:`risloc.estimators.search.refine_peaks`), whose range coordinate is rho (range
      resolution is nearly uniform in 1/r). ``da/drho = -r^2 da/dr``.

    With ``u = (cos theta sin phi, sin theta, cos theta cos phi)``,
    ``u_phi = du/dphi = (cos theta cos phi, 0, -cos theta sin phi)``,
    ``u_theta = du/dtheta = (-sin theta sin phi, cos theta, -sin theta cos phi)``,
    ``k = 2 pi / lambda`` and, for element n, ``d_n = |r u - e_n|``:

    ``approximation="exact"``, ``a_n = (r / d_n) exp(-j k (d_n - r))`` (``d_n - r`` in the
    cancellation-free form of :func:`steering`)::

        dd/dphi = -r (u_phi.e) / d,   dd/dtheta = -r (u_theta.e) / d,   dd/dr = (r - u.e) / d
        d log a / dxi = -(dd/dxi) (1/d + j k)                              xi in {phi, theta}
        d log a / dr  = 1/r - (r - u.e) / d^2 - j k ((r - u.e) / d - 1)

    ``approximation="fresnel"``, ``a_n = exp(-j k (-u.e + (|e|^2 - (u.e)^2) / (2 r)))``::

        d log a / dxi = j k (u_xi.e) (1 + u.e / r),    d log a / dr = j k (|e|^2 - (u.e)^2) / (2 r^2)

    and ``da = a d log a``. The imaginary part of ``d log a / dr`` carries a relative rounding
    error ~ eps / (1 - (r - u.e)/d), ~1e-13 in float64 at 20 m (in float32 ~1e-4: use
    complex128 where the range derivative must be accurate, e.g. for bounds). Angles in
    radians; checked against finite differences and autograd in float64 (tests).
    """
    if range_param not in ("r", "rho"):
        raise ValueError(f"range_param must be 'r' or 'rho', not {range_param!r}")
    if approximation not in ("exact", "fresnel"):
        raise ValueError(f"approximation must be 'exact' or 'fresnel', not {approximation!r}")
    phi, theta, x = _as_tensors(phi, theta, r_or_rho, dtype, device)
    e, e2 = element_geometry(scenario, phi.dtype, phi.device)  # [N, 3] (e_z = 0), |e_n|^2 [N]
    amp, phase, l_re, l_im = steering_parts(phi, theta, x, e, e2, 2 * math.pi / scenario.wavelength,
                                            range_param=range_param, approximation=approximation)
    a = torch.polar(amp, phase)
    da = a * torch.complex(l_re, l_im)  # [3, ..., N]: a d log a / d(phi, theta, r or rho)
    return a, da[0], da[1], da[2]


def steering_parts(
    phi: Tensor,
    theta: Tensor,
    r_or_rho: Tensor,
    e: Tensor,
    e2: Tensor,
    k: float,
    *,
    range_param: RangeParam = "r",
    approximation: Approximation = "exact",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The real quantities behind :func:`steering_with_derivatives`: ``a = amp exp(j phase)`` and
    ``da/dxi = a (l_re + j l_im)`` for xi = (phi, theta, r or rho).

    Inputs: real tensors of one shape ``[...]``, the element positions ``e`` ``[N, 3]`` (e_z = 0) and
    their squared norms ``e2`` ``[N]``, the wavenumber ``k = 2 pi / lambda``. Returns ``amp`` and
    ``phase`` ``[..., N]`` and ``l_re``, ``l_im`` ``[3, ..., N]`` (the formulas of
    :func:`steering_with_derivatives`). Plain real arithmetic without caches or checks, so that a
    compiled caller (``ml``'s ``compile`` option) can fuse it.
    """
    ex, ey = e[:, 0], e[:, 1]
    angles = torch.stack([phi, theta])
    (sp, st), (cp, ct) = torch.sin(angles), torch.cos(angles)
    r = (1.0 / r_or_rho if range_param == "rho" else r_or_rho).unsqueeze(-1)
    ue = (ct * sp).unsqueeze(-1) * ex + st.unsqueeze(-1) * ey  # u.e
    up_e = (ct * cp).unsqueeze(-1) * ex  # u_phi.e
    ut_e = ct.unsqueeze(-1) * ey - (st * sp).unsqueeze(-1) * ex  # u_theta.e
    u_xi_e = torch.stack([up_e, ut_e])  # [2, ..., N]: u_phi.e, u_theta.e
    if approximation == "exact":
        r2, rue2 = r * r, 2 * r * ue
        d = torch.sqrt(torch.clamp(r2 - rue2 + e2, min=torch.finfo(phi.dtype).tiny))
        path = (e2 - rue2) / (d + r)
        amp = r / d
        g = u_xi_e * amp  # -dd/dxi = r (u_xi.e) / d, xi in {phi, theta}
        q = (r - ue) / d  # dd/dr
        if range_param == "rho":  # d/drho = -r^2 d/dr: -r^2 (1/r - q/d) = r^2 q/d - r
            lr_re, lr_im = r2 * q / d - r, (k * r2) * (q - 1.0)
        else:
            lr_re, lr_im = 1.0 / r - q / d, -k * (q - 1.0)
        l_re = torch.cat([g / d, lr_re.unsqueeze(0)])
        l_im = torch.cat([k * g, lr_im.unsqueeze(0)])
    else:
        path = -ue + (e2 - ue * ue) / (2 * r)
        amp = torch.ones_like(path)
        half_e = (e2 - ue * ue) / 2
        lr_im = -k * half_e if range_param == "rho" else k * half_e / (r * r)
        l_re = torch.zeros((3,) + path.shape, dtype=path.dtype, device=path.device)
        l_im = torch.cat([u_xi_e * (k * (1 + ue / r)), lr_im.unsqueeze(0)])
    return amp, -k * path, l_re, l_im


def far_field_steering(phi, theta, scenario: Scenario, *, dtype: torch.dtype = torch.complex64, device=None) -> Tensor:
    """Plane-wave limit ``a_n = exp(j 2 pi u.e_n / lambda)`` of :func:`steering` as r -> infinity."""
    phi, theta, _ = _as_tensors(phi, theta, 1.0, dtype, device)
    e = element_positions(scenario, dtype=phi.dtype, device=phi.device)
    ue = direction(phi, theta) @ e.T
    return unit_phasor(2 * math.pi / scenario.wavelength * ue)


def bs_steering(psi: Tensor, scenario: Scenario, *, dtype: torch.dtype = torch.complex64) -> Tensor:
    """BS array response ``a_BS,m(psi) = exp(j 2 pi (d_BS/lambda) (m - (M-1)/2) sin(psi))``, ``[..., M]``.

    With the default spacing d_BS = lambda/2 this is ``exp(j pi (m - (M-1)/2) sin(psi))``.
    """
    rd = real_dtype(dtype)
    psi = psi.to(rd)
    m = torch.arange(scenario.m_bs, dtype=rd, device=psi.device) - (scenario.m_bs - 1) / 2
    phase = 2 * math.pi * scenario.bs_spacing / scenario.wavelength * m * torch.sin(psi).unsqueeze(-1)
    return unit_phasor(phase)


def bs_ris_phase(phi_b: Tensor, theta_b: Tensor, scenario: Scenario, *, dtype: torch.dtype = torch.complex64) -> Tensor:
    """Unit-modulus RIS response to the BS, ``b_n = exp(-j 2 pi (|p_B - e_n| - r_B) / lambda)``, ``[..., N]``.

    The phase of the exact steering vector at range ``r_B = scenario.bs_range`` (its amplitude dropped).
    """
    phi_b, theta_b, r_b = _as_tensors(phi_b, theta_b, scenario.bs_range, dtype, None)
    path, _ = _path_difference(phi_b, theta_b, r_b, scenario, "exact")
    phase = (-2 * math.pi / scenario.wavelength) * path
    return unit_phasor(phase)


def channel(
    psi: Tensor,
    phi_b: Tensor,
    theta_b: Tensor,
    kappa: Tensor,
    scatter: Tensor,
    scenario: Scenario,
) -> Tensor:
    """BS-RIS Rician channel ``H = sqrt(kappa/(1+kappa)) a_BS(psi) b^T + sqrt(1/(1+kappa)) W``.

    ``psi, phi_b, theta_b, kappa``: ``[B]``; ``scatter`` = W, ``[B, M, N]`` with CN(0, 1) entries.
    Returns ``[B, M, N]`` in W's dtype.
    """
    dtype = scatter.dtype
    los = bs_steering(psi, scenario, dtype=dtype).unsqueeze(-1) * bs_ris_phase(phi_b, theta_b, scenario, dtype=dtype).unsqueeze(-2)
    kappa = kappa.to(real_dtype(dtype)).view(-1, 1, 1)
    return torch.sqrt(kappa / (1 + kappa)) * los + torch.sqrt(1 / (1 + kappa)) * scatter


def quantise_phase(phase: Tensor, bits: int) -> Tensor:
    """Round phases [rad] to the nearest of the 2^b levels ``2 pi q / 2^b``; returns the level index q."""
    levels = 2**bits
    return torch.remainder(torch.round(phase * (levels / (2 * math.pi))), levels).to(torch.int64)


def phase_codes(q: Tensor, bits: int, *, dtype: torch.dtype = torch.complex64) -> Tensor:
    """Unit-modulus codes ``exp(j 2 pi q / 2^b)`` from level indices q."""
    phase = q.to(real_dtype(dtype)) * (2 * math.pi / 2**bits)
    return unit_phasor(phase)


def dft_codes(scenario: Scenario, *, dtype: torch.dtype = torch.complex64, device=None) -> Tensor:
    """The ``dft`` codebook ``[L, N]``: 2-D DFT beams on a regular (u, v) sub-grid, b-bit quantised.

    ``c_l,n = exp(j 2 pi (u_l i / N_H + v_l j / N_V))``. The sub-grid (docs/model.md):
    risloc factors L = L_u * L_v as close to square as possible (L_u <= L_v) and takes
    ``u = round(a N_H / L_u)``, ``v = round(b N_V / L_v)`` for a = 0..L_u-1, b = 0..L_v-1,
    ordered with u fastest (16 codes on 12 x 12: u, v in {0, 3, 6, 9}). The codes are the
    same for every scene.
    """
    L = scenario.snapshots
    l_u = max(d for d in range(1, int(math.isqrt(L)) + 1) if L % d == 0)
    l_v = L // l_u
    rd = real_dtype(dtype)
    u = torch.round(torch.arange(l_u, dtype=rd, device=device) * scenario.n_h / l_u)
    v = torch.round(torch.arange(l_v, dtype=rd, device=device) * scenario.n_v / l_v)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    uu, vv = uu.reshape(-1, 1), vv.reshape(-1, 1)  # [L, 1], u fastest
    e_i = torch.arange(scenario.n_h, dtype=rd, device=device).repeat(scenario.n_v)  # i of flat n
    e_j = torch.arange(scenario.n_v, dtype=rd, device=device).repeat_interleave(scenario.n_h)  # j of flat n
    phase = 2 * math.pi * (uu * e_i / scenario.n_h + vv * e_j / scenario.n_v)
    return phase_codes(quantise_phase(phase, scenario.code_bits), scenario.code_bits, dtype=dtype)


def measurement_matrix(H: Tensor, codes: Tensor) -> Tensor:
    """Per-snapshot RIS-to-BS maps ``G_l = H diag(c_l)``, ``[B, L, M, N]`` from H ``[B, M, N]``, codes ``[B, L, N]``."""
    return H.unsqueeze(-3) * codes.unsqueeze(-2)


# ------------------------------------------------------------------------------------------------
# Impairments (docs/model.md, "Impairments"): what the hardware does and the receiver does not know
# ------------------------------------------------------------------------------------------------
def practical_amplitude(phase: Tensor, scenario: Scenario) -> Tensor:
    """Phase-dependent RIS amplitude ``(1 - beta_min) ((sin(theta - mu) + 1) / 2)^kappa + beta_min``.

    ``phase``: the commanded phase theta [rad] (any shape, real); ``beta_min, mu, kappa`` are
    ``scenario.ris_beta_min``, ``ris_mu`` [rad] and ``ris_kappa``. The amplitude is 1 at
    theta = mu + pi/2 and beta_min at theta = mu - pi/2.
    """
    return _amplitude_of_sine(torch.sin(phase - scenario.ris_mu), scenario)


def _amplitude_of_sine(sine: Tensor, scenario: Scenario) -> Tensor:
    """:func:`practical_amplitude` from ``sin(theta - mu)``."""
    base = (sine + 1) / 2
    return (1 - scenario.ris_beta_min) * base.clamp(min=0).pow(scenario.ris_kappa) + scenario.ris_beta_min


def realised_codes(codes: Tensor, scenario: Scenario, *, phase_error: Tensor | None = None, failed: Tensor | None = None) -> Tensor:
    """The codes the RIS realises, ``c~_ln``, from the commanded unit-modulus codes ``c_ln = exp(j theta_ln)``::

        c~_ln = g(theta_ln) c_ln exp(j delta_ln) (1 - f_n)

    * ``g = 1`` for ``scenario.ris_amplitude == "ideal"``, :func:`practical_amplitude` of the
      commanded phase theta_ln for ``"practical"`` (with ``sin(theta_ln - mu) = Im(c_ln e^(-j mu))``,
      exact for unit-modulus codes, which the commanded codes are);
    * ``phase_error``: delta_ln [rad], real, broadcastable to ``codes`` ``[..., L, N]`` (None: 0);
    * ``failed``: boolean ``[..., N]``, True for a failed element (f_n = 1, c~ = 0 in every
      snapshot; None: none failed).

    Returns a new tensor of ``codes``' shape and dtype.
    """
    rd = real_dtype(codes.dtype)
    gain = None
    if scenario.ris_amplitude == "practical":
        sine = codes.imag * math.cos(scenario.ris_mu) - codes.real * math.sin(scenario.ris_mu)  # Im(c e^(-j mu))
        gain = _amplitude_of_sine(sine, scenario)
    elif scenario.ris_amplitude != "ideal":
        raise ValueError(f"Scenario.ris_amplitude = {scenario.ris_amplitude!r}: must be 'ideal' or 'practical'")
    if phase_error is not None:
        phase_error = phase_error.to(rd)
        cos, sin = torch.cos(phase_error), torch.sin(phase_error)
        if gain is not None:
            cos, sin = cos * gain, sin * gain
        out = codes * torch.complex(cos, sin)
    elif gain is not None:
        out = torch.view_as_complex(torch.view_as_real(codes) * gain.unsqueeze(-1))
    else:
        out = codes.clone()
    if failed is not None:
        out.masked_fill_(failed.unsqueeze(-2).expand_as(out), 0)
    return out


def csi_estimate(H: Tensor, error: Tensor, nmse_db: float) -> Tensor:
    """The receiver's channel ``H-hat = H + E`` with ``E_mn ~ CN(0, eps |H|_F^2 / (M N))``, ``eps = 10^(nmse_db / 10)``.

    ``H``: the true channel ``[..., M, N]``; ``error``: standard complex normal entries
    (CN(0, 1)) of the same shape, scaled here per matrix by ``sqrt(eps |H|_F^2 / (M N))``, so
    that ``E |H-hat - H|_F^2 / |H|_F^2 = eps`` (the normalised MSE of the estimate).
    """
    M, N = H.shape[-2], H.shape[-1]
    eps = 10.0 ** (nmse_db / 10.0)
    power = torch.linalg.vector_norm(torch.view_as_real(H).flatten(-3), dim=-1).square() / (M * N)  # |H|_F^2 / (M N)
    scale = torch.sqrt(eps * power).to(real_dtype(H.dtype))
    return H + torch.view_as_complex(torch.view_as_real(error.to(H.dtype)) * scale[..., None, None, None])
