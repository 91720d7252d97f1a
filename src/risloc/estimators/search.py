"""Shared spectrum search over (phi, theta, r) for the subspace estimators (MUSIC, MVDR, ...).

Everything here works on a *weighted subspace* ``W`` ``[B, N, k]`` and the null spectrum

    q(phi, theta, r) = 1 - |W^H a_hat|^2,        a_hat = a / |a|,                       (1)

with ``a = a(phi, theta, r)`` the exact steering vector of physics.md (or its Fresnel
approximation). The pseudo-spectrum is ``P = 1 / q``.

* MUSIC (Schmidt 1986): ``W = E_s`` (the K dominant orthonormal eigenvectors), so ``q`` is
  the squared distance of ``a_hat`` from the signal subspace and
  ``P = |a|^2 / (|a|^2 - |E_s^H a|^2)``.
* MVDR / Capon (Capon 1969): with ``R = E diag(lam) E^H + c (I - E E^H)``,
  ``c a_hat^H R^-1 a_hat = 1 - sum_i (1 - c / lam_i) |e_i^H a_hat|^2``, i.e. (1) with
  ``W = E diag(sqrt(1 - c / lam))``; ``1/q`` is then the Capon power relative to the
  noise floor ``c``.

Steps of :func:`subspace_search`:

1. **Coarse grid** (:class:`~risloc.grids.GridSpec`, :func:`risloc.grids.search_grid`, the near-field
   grid of :mod:`risloc.grids`): ``n_phi x n_theta x n_r`` points,
   azimuth and elevation uniform in ``sin`` (or in angle) over the scenario's field of
   view, range uniform in inverse range ``rho = 1/r`` over ``[1/r_max, 1/r_min]`` (the
   near-field range resolution of the aperture is roughly uniform in ``rho``: a step of
   0.1 m^-1 keeps >= 0.87 correlation with the nearest grid point, a 2 deg angular step
   >= 0.89 at broadside; the beamwidth is ~2/N_H rad ~ 9.5 deg). The default
   49 x 25 x 20 = 24 500 points. The unit-norm steering matrix ``[G, N]`` is cached per
   (scenario, grid, device, dtype).
2. **Spectrum** on the grid: one batched product ``W^H A_grid^T`` ``[B, k, G]``.
3. **Peaks**: local minima of q in the 3x3x3 neighbourhood (``max_pool3d`` on ``-q``,
   edges padded with -inf so a peak at the border of the field of view counts), the
   ``n_candidates`` deepest kept per scene.
4. **Refinement** of all three coordinates of every candidate, batched over scenes and
   candidates (:func:`refine_peaks`): Levenberg-Marquardt on ``q`` written as a sum of
   squares ``q = |rho|^2`` in the scaled coordinates ``(phi/h_phi, theta/h_theta, rho/h_rho)``
   (h = grid step), Jacobian by forward differences, steps capped at one grid step and
   accepted only when q decreases; float64. With an exact covariance the residual is zero
   at a source and the iteration is Gauss-Newton (quadratic convergence): errors of
   ~1e-5 deg. **Prior**: the refined points are clamped to the field of view
   ``[phi_min, phi_max] x [theta_min, theta_max]`` and the range interval
   ``[r_min, r_max]`` of the scenario.
5. **Selection** (non-maximum suppression on the refined peaks): candidates sorted by q
   (deepest first); a candidate closer than ``min_separation`` in direction to one kept
   before it is dropped (two refined candidates that converged onto the same source).

:func:`rap_search` (RAP-MUSIC, Mosher & Leahy 1999) runs steps 1-5 once per source,
projecting the sources already found out of the subspace and the steering vectors; it
resolves pairs closer than ~2 grid steps that the joint search can merge.

References: R. O. Schmidt, "Multiple emitter location and signal parameter estimation",
IEEE Trans. Antennas Propag. 34(3), 1986; J. Capon, "High-resolution frequency-wavenumber
spectrum analysis", Proc. IEEE 57(8), 1969; J. C. Mosher and R. M. Leahy, "Source
localization using recursively applied and projected (RAP) MUSIC", IEEE Trans. Signal
Process. 47(2), 1999.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import physics
from ..grids import GridSpec, SearchGrid, search_grid
from ..scenario import Scenario

__all__ = [
    "GridSpec",
    "SearchGrid",
    "SearchResult",
    "search_grid",
    "NullSpectrum",
    "rap_search",
    "find_peaks",
    "refine_peaks",
    "select_peaks",
    "subspace_search",
    "music_spectrum",
    "mask_columns",
]


# ----------------------------------------------------------------------------------------------
# Null spectra
# ----------------------------------------------------------------------------------------------
def mask_columns(E: Tensor, k: Tensor) -> Tensor:
    """Zero the columns ``i >= k[b]`` of ``E`` ``[B, N, r]`` (per-scene subspace dimension)."""
    idx = torch.arange(E.shape[-1], device=E.device)
    keep = idx.view(1, 1, -1) < k.to(E.device).view(-1, 1, 1)
    return E * keep.to(E.dtype)


@dataclass
class NullSpectrum:
    """``q(a_hat) = |(I - Q Q^H - V D V^H) a_hat|^2 / |(I - Q Q^H) a_hat|^2`` for a batch of scenes.

    ``V`` ``[B, N, m]`` orthonormal columns (zero columns allowed: they drop out),
    ``d`` ``[B, m]`` in [0, 1], ``Q`` ``[B, N, j]`` orthonormal and orthogonal to ``V``, or
    ``None``. The numerator is ``1 - |Q^H a_hat|^2 - sum_i w_i |v_i^H a_hat|^2`` with
    ``w = 2d - d^2``, so

    * MUSIC: ``V = E_s``, ``d = 1`` (``w = 1``): ``q = 1 - |E_s^H a_hat|^2``;
    * MVDR: ``V = E``, ``w_i = 1 - c / lam_i`` (``d = 1 - sqrt(1 - w)``): ``q = c a_hat^H R^-1 a_hat``;
    * RAP-MUSIC (Mosher & Leahy 1999): ``Q`` spans the steering vectors found so far and ``V``
      the projected signal subspace; ``q = 1 - |V^H P a|^2 / |P a|^2``, ``P = I - Q Q^H``.

    Where ``1 - |Q^H a_hat|^2 < blocked`` (on top of an already found source) ``q = 1``.
    """

    V: Tensor
    d: Tensor
    Q: Tensor | None = None
    blocked: float = 0.05

    @classmethod
    def subspace(cls, Es: Tensor) -> "NullSpectrum":
        """MUSIC on the (column-masked) signal subspace ``Es``."""
        return cls(Es, torch.ones(Es.shape[0], Es.shape[-1], dtype=physics.real_dtype(Es.dtype), device=Es.device))

    @classmethod
    def weighted(cls, E: Tensor, w: Tensor) -> "NullSpectrum":
        """``q = 1 - sum_i w_i |e_i^H a_hat|^2`` for orthonormal ``E`` and ``w`` in [0, 1]."""
        w = w.clamp(0.0, 1.0)
        return cls(E, 1.0 - torch.sqrt(1.0 - w))

    def __getitem__(self, index) -> "NullSpectrum":
        return NullSpectrum(self.V[index], self.d[index], None if self.Q is None else self.Q[index], self.blocked)

    def grid(self, grid: SearchGrid, *, chunk_elements: int = 2**26) -> Tensor:
        """``q`` on the coarse grid, ``[B, n_phi, n_theta, n_r]``: one ``[B, m + j, G]`` product per chunk."""
        A = grid.steering  # [G, N]
        B, m = self.V.shape[0], self.V.shape[-1]
        cols = self.V if self.Q is None else torch.cat([self.V, self.Q], -1)
        cols = cols.to(A.dtype)
        w = (2 * self.d - self.d * self.d).to(physics.real_dtype(A.dtype))
        G = A.shape[0]
        out = torch.empty(B, G, dtype=physics.real_dtype(A.dtype), device=cols.device)
        step = max(1, chunk_elements // max(1, cols.shape[-1] * G))
        At = A.transpose(0, 1)  # [N, G]
        for s in range(0, B, step):
            z = cols[s : s + step].mH @ At  # [b, m + j, G]
            p = z.real.square() + z.imag.square()
            num = 1.0 - (w[s : s + step].unsqueeze(-1) * p[:, :m]).sum(1)
            if self.Q is not None:
                den = 1.0 - p[:, m:].sum(1)
                num = torch.where(den > self.blocked, (num - p[:, m:].sum(1)) / den.clamp(min=self.blocked), torch.ones_like(num))
            out[s : s + step] = num
        return out.view(B, *grid.shape)

    def residual(self, a_hat: Tensor) -> Tensor:
        """Residual ``rho`` ``[B, P, N]`` with ``q = |rho|^2`` for unit-norm points ``a_hat`` ``[B, P, N]``."""
        V = self.V.to(a_hat.dtype)
        z = a_hat @ V.conj()  # [B, P, m] = (V^H a)^T
        r = a_hat - (z * self.d.to(z.real.dtype).unsqueeze(1)) @ V.transpose(-2, -1)
        if self.Q is not None:
            Q = self.Q.to(a_hat.dtype)
            zq = a_hat @ Q.conj()
            den = 1.0 - zq.abs().square().sum(-1, keepdim=True)
            r = r - zq @ Q.transpose(-2, -1)
            r = torch.where(den > self.blocked, r / den.clamp(min=self.blocked).sqrt(), a_hat)
        return r

    def at(self, a_hat: Tensor) -> Tensor:
        """``q`` at per-scene unit-norm points ``a_hat`` ``[B, P, N]``, ``[B, P]``."""
        return self.residual(a_hat).abs().square().sum(-1)


def _unit_steering(phi: Tensor, theta: Tensor, r: Tensor, scenario: Scenario, approximation: str, dtype: torch.dtype) -> Tensor:
    a = physics.steering(phi, theta, r, scenario, approximation=approximation, dtype=dtype)
    return a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)


def music_spectrum(Es: Tensor, phi, theta, r, scenario: Scenario, *, approximation: str = "exact") -> Tensor:
    """MUSIC pseudo-spectrum ``P = |a|^2 / (|a|^2 - |E_s^H a|^2)`` at points shared by every scene.

    ``Es`` ``[B, N, k]`` orthonormal signal subspace (zero columns allowed); ``phi, theta, r``
    broadcastable to a common shape ``S`` (radians, metres). Returns ``[B, *S]`` (float64).
    For plots and tests; the search itself uses the grid and :func:`refine_peaks`.
    """
    phi, theta, r = (torch.as_tensor(t, device=Es.device, dtype=torch.float64) for t in (phi, theta, r))
    phi, theta, r = torch.broadcast_tensors(phi, theta, r)
    shape = phi.shape
    a_hat = _unit_steering(phi.reshape(-1), theta.reshape(-1), r.reshape(-1), scenario, approximation, torch.complex128)
    a_hat = a_hat.unsqueeze(0).expand(Es.shape[0], -1, -1)
    q = NullSpectrum.subspace(Es.to(torch.complex128)).at(a_hat)
    return (1.0 / q.clamp(min=torch.finfo(torch.float64).tiny)).view(Es.shape[0], *shape)


# ----------------------------------------------------------------------------------------------
# Peaks and refinement
# ----------------------------------------------------------------------------------------------
def find_peaks(q: Tensor, grid: SearchGrid, n_peaks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``n_peaks`` deepest local minima of the grid null spectrum ``q`` ``[B, n_phi, n_theta, n_r]``.

    A grid point is a local minimum when no point of its 3x3x3 neighbourhood is lower
    (outside the grid counts as higher). Returns ``phi, theta, rho, valid`` ``[B, n_peaks]``
    ordered deepest first; ``valid`` is False where a scene has fewer local minima.
    """
    B = q.shape[0]
    neg = -q.unsqueeze(1)  # [B, 1, n_phi, n_theta, n_r]
    pooled = F.max_pool3d(neg, kernel_size=3, stride=1, padding=1)
    flat = neg.reshape(B, -1)
    score = torch.where((neg >= pooled).reshape(B, -1), flat, torch.full_like(flat, -math.inf))
    n_peaks = min(n_peaks, score.shape[1])
    val, idx = torch.topk(score, n_peaks, dim=1)
    valid = torch.isfinite(val)
    n_t, n_r = grid.shape[1], grid.shape[2]
    return grid.phi[idx // (n_t * n_r)], grid.theta[(idx // n_r) % n_t], grid.rho[idx % n_r], valid


def refine_peaks(
    spectrum: NullSpectrum,
    phi: Tensor,
    theta: Tensor,
    rho: Tensor,
    scenario: Scenario,
    grid: SearchGrid,
    *,
    iterations: int = 12,
    tol: float = 1e-7,
    approximation: str = "exact",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Refine candidate minima of ``q`` by Levenberg-Marquardt, batched over scenes and candidates.

    ``q = |rho(x)|^2`` is a sum of squares (:meth:`NullSpectrum.residual`), minimised in the
    scaled coordinates ``x = (phi/h_phi, theta/h_theta, (1/r)/h_rho)`` (``h`` = grid step)::

        J = d rho / d x  (forward differences, step 1e-6),  A = Re(J^H J),  b = Re(J^H rho)
        dx = -(A + mu diag(A))^-1 b,   |dx| <= 1 (one grid step),   x <- clamp(x + dx)

    accepting a step only when it lowers q (then ``mu /= 3``, else ``mu *= 4``); at most
    ``iterations`` steps; a candidate whose proposed step is below ``tol`` grid steps has converged
    and stays where it is (so its answer does not depend on the other candidates and scenes of the
    batch), and the loop ends once every candidate has. With an
    exact covariance the residual vanishes at a source and the iteration converges
    quadratically (Gauss-Newton). Float64 throughout. **Prior**: every point is clamped
    to the field of view and the range interval of the scenario (``grid.bounds``).

    Args: ``phi, theta, rho`` ``[B, C]`` start points (rho = 1/r). Returns refined
    ``phi, theta, r, q`` ``[B, C]`` (float64).
    """
    B, C = phi.shape
    dev = phi.device
    spec = NullSpectrum(
        spectrum.V.to(torch.complex128), spectrum.d.to(torch.float64), None if spectrum.Q is None else spectrum.Q.to(torch.complex128), spectrum.blocked
    )
    h = torch.tensor(grid.step, dtype=torch.float64, device=dev)
    lo = torch.tensor([b[0] for b in grid.bounds], dtype=torch.float64, device=dev) / h
    hi = torch.tensor([b[1] for b in grid.bounds], dtype=torch.float64, device=dev) / h
    x = torch.stack([phi, theta, rho], -1).to(torch.float64) / h  # [B, C, 3]
    x = torch.minimum(torch.maximum(x, lo), hi)
    delta = 1e-6
    offsets = torch.cat([torch.zeros(1, 3, dtype=torch.float64, device=dev), delta * torch.eye(3, dtype=torch.float64, device=dev)])  # [4, 3]

    def evaluate(xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # -> rho0 [B,C,N], J [B,C,N,3], q [B,C]
        p = (xc.unsqueeze(2) + offsets) * h  # [B, C, 4, 3]
        a_hat = _unit_steering(p[..., 0], p[..., 1], 1.0 / p[..., 2].clamp(min=1e-6), scenario, approximation, torch.complex128)
        res = spec.residual(a_hat.reshape(B, C * 4, -1)).view(B, C, 4, -1)
        r0 = res[:, :, 0]
        J = ((res[:, :, 1:] - r0.unsqueeze(2)) / delta).transpose(-2, -1)
        return r0, J, r0.abs().square().sum(-1)

    r0, J, q = evaluate(x)
    mu = torch.full((B, C), 1e-3, dtype=torch.float64, device=dev)
    eye = torch.eye(3, dtype=torch.float64, device=dev)
    moving = torch.ones(B, C, dtype=torch.bool, device=dev)
    for _ in range(iterations):
        A = (J.mH @ J).real
        b = (J.mH @ r0.unsqueeze(-1)).real.squeeze(-1)
        damp = mu.view(B, C, 1, 1) * (torch.diagonal(A, dim1=-2, dim2=-1).unsqueeze(-1) * eye + 1e-12 * eye)
        step = -torch.linalg.solve(A + damp, b.unsqueeze(-1)).squeeze(-1)
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        norm = torch.linalg.vector_norm(step, dim=-1, keepdim=True)
        moving = moving & (norm.squeeze(-1) >= tol)  # converged candidates stay put
        step = step * torch.clamp(1.0 / norm.clamp(min=1e-30), max=1.0)
        x_try = torch.minimum(torch.maximum(x + step, lo), hi)
        r_try, J_try, q_try = evaluate(x_try)
        ok = (q_try < q) & moving
        x = torch.where(ok.unsqueeze(-1), x_try, x)
        r0 = torch.where(ok.unsqueeze(-1), r_try, r0)
        J = torch.where(ok.view(B, C, 1, 1), J_try, J)
        q = torch.where(ok, q_try, q)
        mu = torch.where(ok, mu / 3, mu * 4).clamp(1e-12, 1e12)
        if not bool(moving.any()):  # every candidate has converged (one sync per iteration)
            break
    p = x * h
    return p[..., 0], p[..., 1], 1.0 / p[..., 2], q


def select_peaks(
    phi: Tensor,
    theta: Tensor,
    r: Tensor,
    q: Tensor,
    valid: Tensor,
    *,
    min_separation: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Non-maximum suppression on refined candidates ``[B, C]``.

    Sorted by ``q`` (deepest first); a candidate whose direction is within
    ``min_separation`` [rad] of an earlier kept one is dropped (the angle between the
    unit direction vectors). Returns the candidates reordered with the kept ones first
    (deepest first) and the mask ``kept`` ``[B, C]``.
    """
    key = torch.where(valid, q, torch.full_like(q, math.inf))
    order = torch.argsort(key, dim=1)
    phi, theta, r, q, valid = (t.gather(1, order) for t in (phi, theta, r, q, valid))
    C = phi.shape[1]
    u = physics.direction(phi, theta)  # [B, C, 3]
    chord = torch.linalg.vector_norm(u.unsqueeze(2) - u.unsqueeze(1), dim=-1)  # [B, C, C]
    close = chord < 2 * math.sin(min_separation / 2)
    kept = torch.zeros_like(valid)
    for i in range(C):  # loop over candidates (a handful), vectorised over scenes
        clash = (close[:, i, :i] & kept[:, :i]).any(1) if i else torch.zeros_like(valid[:, 0])
        kept[:, i] = valid[:, i] & ~clash
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
    phi, theta, r, q, kept = (t.gather(1, order) for t in (phi, theta, r, q, kept))
    return phi, theta, r, q, kept


@dataclass
class SearchResult:
    """Refined peaks per scene: ``phi, theta, r, q`` ``[B, C]`` (radians, metres, null spectrum),
    the kept ones first and deepest first; ``kept`` ``[B, C]`` marks the peaks that survived NMS."""

    phi: Tensor
    theta: Tensor
    r: Tensor
    q: Tensor
    kept: Tensor
    q_median: Tensor | None = None
    """Median of q over the coarse grid ``[B]`` (the spectrum's floor; joint search only)."""

    @property
    def count(self) -> Tensor:
        return self.kept.sum(1)

    @classmethod
    def cat(cls, parts: list["SearchResult"]) -> "SearchResult":
        fields = [torch.cat([getattr(p, f) for p in parts]) for f in ("phi", "theta", "r", "q", "kept")]
        med = torch.cat([p.q_median for p in parts]) if all(p.q_median is not None for p in parts) else None
        return cls(*fields, q_median=med)


def _default_separation(scenario: Scenario, min_separation: float | None) -> float:
    if min_separation is not None:
        return min_separation
    return 0.5 * scenario.min_separation if scenario.min_separation > 0 else math.radians(1.0)


def _check_subspace(W: Tensor, scenario: Scenario, who: str) -> None:
    if W.dim() != 3:
        raise ValueError(f"{who}: the subspace must be [B, N, k], got shape {tuple(W.shape)}")
    if W.shape[1] != scenario.n_elements:
        raise ValueError(f"{who}: the subspace has {W.shape[1]} rows, the scenario has {scenario.n_elements} elements")


def subspace_search(
    spectrum: NullSpectrum,
    scenario: Scenario,
    *,
    n_candidates: int = 8,
    grid: GridSpec = GridSpec(),
    refine_iterations: int = 12,
    min_separation: float | None = None,
    chunk: int = 1024,
) -> SearchResult:
    """Joint search: grid -> ``n_candidates`` deepest local minima -> refinement -> NMS.

    ``min_separation`` [rad] of the NMS defaults to half the scenario's
    ``min_separation`` (2.5 deg for physics.md), or 1 deg when that is zero. Works in
    chunks of ``chunk`` scenes (bounded memory). Returns ``[B, n_candidates]`` results.
    """
    _check_subspace(spectrum.V, scenario, "subspace_search")
    sep = _default_separation(scenario, min_separation)
    dtype = torch.complex128 if spectrum.V.dtype == torch.complex128 else torch.complex64
    g = search_grid(scenario, grid, device=spectrum.V.device, dtype=dtype)
    parts = []
    for s in range(0, spectrum.V.shape[0], chunk):
        sp = spectrum[s : s + chunk]
        qg = sp.grid(g)
        phi, theta, rho, valid = find_peaks(qg, g, n_candidates)
        phi, theta, r, q = refine_peaks(sp, phi, theta, rho, scenario, g, iterations=refine_iterations, approximation=grid.approximation)
        med = qg.reshape(qg.shape[0], -1).median(1).values.to(torch.float64)
        parts.append(SearchResult(*select_peaks(phi, theta, r, q, valid, min_separation=sep), q_median=med))
    return SearchResult.cat(parts)


def _orthonormal_basis(X: Tensor, k: Tensor) -> Tensor:
    """The ``k[b]`` dominant left singular vectors of ``X`` ``[B, N, m]`` (via the m x m Gram
    matrix), as ``[B, N, m]`` with zero columns after the first ``k[b]``."""
    lam, Vg = torch.linalg.eigh(X.mH @ X)
    lam, Vg = lam.flip(-1), Vg.flip(-1)
    scale = lam.amax(-1, keepdim=True).clamp(min=1e-300)
    good = lam > scale * 1e-10
    inv = torch.where(good, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
    return mask_columns(X @ (Vg * inv.unsqueeze(-2).to(Vg.dtype)), k)


def rap_search(
    Es: Tensor,
    n_sources: Tensor,
    scenario: Scenario,
    *,
    n_candidates: int = 3,
    grid: GridSpec = GridSpec(),
    refine_iterations: int = 12,
    min_separation: float | None = None,
    chunk: int = 1024,
) -> SearchResult:
    """RAP-MUSIC (Mosher & Leahy 1999): find the sources one at a time.

    Pass j (j = 0..K-1) projects the sources found so far out of both the signal subspace
    and the steering vectors, ``P = I - Q Q^H`` (``Q`` an orthonormal basis of
    ``a(found)``), takes ``V`` = the K - j dominant left singular vectors of ``P E_s`` and
    searches ``q_j(a) = 1 - |V^H P a|^2 / |P a|^2`` (grid, ``n_candidates`` local minima,
    refinement of each, the deepest one farther than ``min_separation`` from the found
    ones is kept). The main lobe of a found source no longer hides a weaker source next
    to it, which the joint search of :func:`subspace_search` can miss when two sources are
    closer than ~2 grid steps. Each pass costs one grid product of K columns.

    ``Es`` ``[B, N, k]`` orthonormal, ``n_sources`` ``[B]`` (K per scene, <= k). Returns
    ``[B, k]`` results, the distinct sources first in the order found (``kept`` True), then the
    passes that found nothing distinct (``kept`` False): their position is the pass's deepest
    refined candidate all the same (next to a found source), finite and inside the prior, so a
    caller that needs exactly K sources has one; NaN only in the slots beyond a scene's K.
    """
    _check_subspace(Es, scenario, "rap_search")
    sep = _default_separation(scenario, min_separation)
    dev = Es.device
    dtype = torch.complex128 if Es.dtype == torch.complex128 else torch.complex64
    g = search_grid(scenario, grid, device=dev, dtype=dtype)
    n_sources = n_sources.to(dev).clamp(0, Es.shape[-1])
    parts = []
    for s in range(0, Es.shape[0], chunk):
        E = mask_columns(Es[s : s + chunk].to(torch.complex128), n_sources[s : s + chunk])
        K = n_sources[s : s + chunk]
        b, N, k = E.shape
        out = {f: torch.full((b, k), math.nan, dtype=torch.float64, device=dev) for f in ("phi", "theta", "r")}
        out_q = torch.full((b, k), math.inf, dtype=torch.float64, device=dev)
        kept = torch.zeros(b, k, dtype=torch.bool, device=dev)
        Q = torch.zeros(b, N, 0, dtype=torch.complex128, device=dev)
        n_passes = int(K.max()) if b else 0
        for j in range(n_passes):
            rows = (K > j).nonzero().squeeze(1)  # scenes that still need a source
            Ej, Qj, Kj = E[rows], Q[rows], K[rows]
            ones = torch.ones(Ej.shape[0], k, dtype=torch.float64, device=dev)
            if j == 0:
                sp = NullSpectrum(Ej, ones)
            else:
                V = _orthonormal_basis(Ej - Qj @ (Qj.mH @ Ej), Kj - j)
                sp = NullSpectrum(V, ones, Qj)
            phi, theta, rho, valid = find_peaks(sp.grid(g), g, n_candidates)
            phi, theta, r, q = refine_peaks(sp, phi, theta, rho, scenario, g, iterations=refine_iterations, approximation=grid.approximation)
            # drop candidates on top of found sources, then keep the deepest
            u = physics.direction(phi, theta)  # [n, C, 3]
            uf = physics.direction(torch.nan_to_num(out["phi"][rows, :j]), torch.nan_to_num(out["theta"][rows, :j]))  # [n, j, 3]
            chord = torch.linalg.vector_norm(u.unsqueeze(2) - uf.unsqueeze(1), dim=-1)  # [n, C, j]
            clash = ((chord < 2 * math.sin(sep / 2)) & kept[rows, :j].unsqueeze(1)).any(-1)
            ok = valid & ~clash
            # the deepest distinct candidate; where every candidate clashes, the deepest one all the
            # same (a refined point of this pass, kept False), so every pass gives a finite position
            key = torch.where(ok, q, torch.where(valid, q + 2.0, torch.full_like(q, 4.0)))
            best = key.argmin(1, keepdim=True)
            found = ok.gather(1, best).squeeze(1)
            pick = lambda t: t.gather(1, best).squeeze(1)
            out["phi"][rows, j] = pick(phi)
            out["theta"][rows, j] = pick(theta)
            out["r"][rows, j] = pick(r)
            out_q[rows, j] = torch.where(found, pick(q), torch.full_like(pick(q), math.inf))
            kept[rows, j] = found
            # extend Q by the new steering vector (Gram-Schmidt; zero column where nothing was found)
            a = _unit_steering(pick(phi), pick(theta), pick(r), scenario, grid.approximation, torch.complex128)
            v = a - (Qj @ (Qj.mH @ a.unsqueeze(-1))).squeeze(-1)
            nv = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
            v = torch.where(found.unsqueeze(-1) & (nv > 1e-6), v / nv.clamp(min=1e-6), torch.zeros_like(v))
            Q = torch.cat([Q, torch.zeros(b, N, 1, dtype=Q.dtype, device=dev)], -1)
            Q[rows, :, j] = v
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
        res = [out["phi"], out["theta"], out["r"], out_q, kept]
        parts.append(SearchResult(*(t.gather(1, order) for t in res)))
    return SearchResult.cat(parts)
