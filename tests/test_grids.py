"""The near-field grid of risloc.grids: axes, dictionary, measured dictionary, search grid."""

from __future__ import annotations

import math

import pytest
import torch

from risloc import Scenario, grids, physics

SC = Scenario()


def test_axes_are_uniform_in_sin_and_inverse_range():
    phi, theta, rho = grids.grid_axes(SC, grids.GridSpec(7, 5, 4))
    for ax, lo, hi in ((phi, SC.phi_min, SC.phi_max), (theta, SC.theta_min, SC.theta_max)):
        s = torch.sin(ax)
        assert abs(s[0].item() - math.sin(lo)) < 1e-15 and abs(s[-1].item() - math.sin(hi)) < 1e-15
        assert torch.allclose(s.diff(), s.diff()[:1].expand(len(ax) - 1), rtol=1e-12, atol=1e-15)
    assert torch.allclose(rho, torch.linspace(1 / SC.r_max, 1 / SC.r_min, 4, dtype=torch.float64))
    # one point: the middle of the interval
    p1, _, r1 = grids.grid_axes(SC, grids.GridSpec(1, 2, 1))
    assert p1.item() == pytest.approx((SC.phi_min + SC.phi_max) / 2) and r1.item() == pytest.approx((1 / SC.r_max + 1 / SC.r_min) / 2)
    with pytest.raises(ValueError, match="n_phi"):
        grids.GridSpec(0, 2, 2)


def test_points_order_dictionary_and_cache():
    spec = grids.GridSpec(3, 4, 5)
    gp, gt, gr = grids.grid_points(SC, spec)
    phi, theta, rho = grids.grid_axes(SC, spec)
    q = (2 * 4 + 1) * 5 + 3  # (i n_theta + j) n_r + m with i=2, j=1, m=3
    assert (gp[q], gt[q], gr[q]) == (phi[2], theta[1], rho[3])
    d = grids.dictionary(SC, spec.shape, dtype=torch.complex128)
    assert d.D.shape == (SC.n_elements, spec.size)
    ref = physics.steering(gp, gt, 1 / gr, SC, dtype=torch.complex128)
    assert (d.D.T - ref).abs().max().item() < 1e-12
    assert grids.dictionary(SC, spec.shape, dtype=torch.complex128) is d


def test_measure_dictionary_is_every_snapshot_map_applied():
    g = torch.Generator().manual_seed(0)
    B, L, M, N, Q = 2, 3, 4, SC.n_elements, 6
    H = torch.randn(B, M, N, dtype=torch.complex128, generator=g)
    codes = torch.exp(1j * torch.rand(B, L, N, dtype=torch.float64, generator=g))
    D = torch.randn(N, Q, dtype=torch.complex128, generator=g)
    Phi = grids.measure_dictionary(H, codes, D)
    G = physics.measurement_matrix(H, codes)  # [B, L, M, N]
    assert (Phi - G @ D).abs().max().item() < 1e-12


def test_search_grid_is_unit_norm_and_cached():
    spec = grids.GridSpec(5, 3, 4)
    g = grids.search_grid(SC, spec)
    assert g.shape == (5, 3, 4) and g.steering.shape == (60, SC.n_elements)
    assert torch.allclose(torch.linalg.vector_norm(g.steering, dim=-1), torch.ones(60), atol=1e-6)
    assert grids.search_grid(SC, spec) is g
