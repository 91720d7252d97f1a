"""The near-field grid of risloc.grids: axes, dictionary, measured dictionary (materialised, and
through back-projection and atom norms), search grid."""

from __future__ import annotations

import math

import numpy as np
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


def _maps(B=3, L=3, M=4, Q=37, seed=1):
    """Random maps (H, codes) and a dictionary in complex128, as torch and numpy."""
    g = torch.Generator().manual_seed(seed)
    N = SC.n_elements
    H = torch.randn(B, M, N, dtype=torch.complex128, generator=g)
    codes = torch.exp(1j * 2 * math.pi * torch.rand(B, L, N, dtype=torch.float64, generator=g))
    D = torch.randn(N, Q, dtype=torch.complex128, generator=g)
    return H, codes, D


def _numpy_norms(H, codes, D):
    """|phi_lq|^2 = sum_m |sum_n H_mn c_ln D_nq|^2, element by element in numpy complex128."""
    H, codes, D = H.numpy(), codes.numpy(), D.numpy()
    B, M, N = H.shape
    L, Q = codes.shape[1], D.shape[1]
    out = np.zeros((B, L, Q))
    for b in range(B):
        for l in range(L):
            for q in range(Q):
                phi = np.array([np.sum(H[b, m, :] * codes[b, l, :] * D[:, q]) for m in range(M)])
                out[b, l, q] = np.sum(phi.real**2 + phi.imag**2)
    return out


@pytest.mark.parametrize("dtype, tensor_cores, onednn, rtol", [
    (torch.complex128, False, False, 1e-12),
    (torch.complex64, False, False, 2e-6),  # the complex matmul
    (torch.complex64, False, True, 2e-6),  # oneDNN's real product (the CPU's default for complex64)
    (torch.complex64, True, False, 2e-6),  # split-TF32 product: float32-accurate (on the CPU, plain float32 with split operands)
])
def test_atom_norms_are_the_measured_atoms_norms(dtype, tensor_cores, onednn, rtol):
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    H, codes, D = _maps()
    ref = _numpy_norms(H, codes, D)
    for chunk in (2, None):  # chunks of 2 of 3 scenes, and the default
        n = grids.atom_norms(H.to(dtype), codes.to(dtype), D.to(dtype), tensor_cores=tensor_cores, onednn=onednn, chunk=chunk)
        assert n.dtype == physics.real_dtype(dtype) and n.shape == ref.shape and n.is_contiguous()
        assert np.abs(n.double().numpy() - ref).max() / ref.max() < rtol
    with pytest.raises(ValueError, match="complex64"):
        grids.atom_norms(H, codes, D, tensor_cores=True)
    with pytest.raises(ValueError, match="onednn needs a complex64 dictionary on the CPU"):
        grids.atom_norms(H, codes, D, onednn=True)  # complex128


def test_atom_norms_route_on_the_cpu(monkeypatch):
    """complex64 on the CPU takes oneDNN's product unless an input needs a gradient (then the
    complex matmul, through which the gradient flows)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    H, codes, D = (t.to(torch.complex64) for t in _maps())
    calls = []
    conv = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or conv(*a))
    grids.atom_norms(H, codes, D)
    assert calls, "the default route on the CPU is oneDNN's product"
    calls.clear()
    Hg = H.clone().requires_grad_()
    n = grids.atom_norms(Hg, codes, D)
    assert not calls
    n.sum().backward()
    assert Hg.grad is not None and torch.isfinite(Hg.grad).all()


def test_split_dictionary_cache_follows_the_tensor():
    H, codes, D = (t.to(torch.complex64) for t in _maps())
    n1 = grids.atom_norms(H, codes, D, tensor_cores=True)
    D.mul_(2)  # same storage, new contents: the cached split form must not be reused
    n2 = grids.atom_norms(H, codes, D, tensor_cores=True)
    assert torch.allclose(n2, 4 * n1, rtol=1e-5)


def test_back_project_is_the_adjoint_map_and_gives_the_atoms_inner_products():
    H, codes, D = _maps(B=2, L=3, M=4, Q=5)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 3, 4, dtype=torch.complex128, generator=g)  # one vector per snapshot
    V = torch.randn(2, 3, 2, 4, dtype=torch.complex128, generator=g)  # two per snapshot
    w, W = grids.back_project(v, H, codes), grids.back_project(V, H, codes)
    Hn, cn, Dn, vn, Vn = H.numpy(), codes.numpy(), D.numpy(), v.numpy(), V.numpy()
    for b in range(2):
        for l in range(3):
            for n in range(SC.n_elements):
                # (G_l^H v)_n = conj(c_ln) sum_m conj(H_mn) v_m
                ref = np.conj(cn[b, l, n]) * np.sum(np.conj(Hn[b, :, n]) * vn[b, l, :])
                assert abs(w[b, l, n].item() - ref) < 1e-12 * (1 + abs(ref))
                for j in range(2):
                    ref = np.conj(cn[b, l, n]) * np.sum(np.conj(Hn[b, :, n]) * Vn[b, l, j, :])
                    assert abs(W[b, l, j, n].item() - ref) < 1e-12 * (1 + abs(ref))
            for q in range(5):
                # v^H phi_lq with phi_lq = G_l d_q, element by element, = conj(G_l^H v)^T d_q
                phi = np.array([np.sum(Hn[b, m, :] * cn[b, l, :] * Dn[:, q]) for m in range(4)])
                ref = np.sum(np.conj(vn[b, l, :]) * phi)
                got = (w[b, l].conj() @ D[:, q]).item()
                assert abs(got - ref) < 1e-11 * (1 + abs(ref))


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4, 5)])
def test_dictionary_product_on_tensor_cores_is_the_complex_product(shape):
    """The split-TF32 route (run here in float32 on the CPU, as on the tensor cores) gives w @ D
    to float32 accuracy, for any leading shape, and refuses other dtypes."""
    H, codes, D = _maps()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape[:-1], D.shape[0], dtype=torch.complex128, generator=g)
    ref = (w @ D).numpy()
    out = grids.dictionary_product(w.to(torch.complex64), D.to(torch.complex64), tensor_cores=True)
    assert out.dtype == torch.complex64 and out.shape == ref.shape
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 2e-6
    conj = grids.dictionary_product(w.to(torch.complex64).conj(), D.to(torch.complex64), tensor_cores=True)
    assert np.abs(conj.numpy() - (w.conj() @ D).numpy()).max() / np.abs(ref).max() < 2e-6
    plain = grids.dictionary_product(w, D, tensor_cores=False)
    assert torch.equal(plain, w @ D)
    with pytest.raises(ValueError, match="complex64"):
        grids.dictionary_product(w, D, tensor_cores=True)


def test_sum_abs2_is_the_summed_squared_modulus_and_rounds_a_scene_alike_at_any_batch():
    """grids.sum_abs2 (the scans' |.|^2): sum over an axis of |z|^2 and |z|^2 elementwise against
    complex128 moduli; on the CPU a scene's values are the same bits alone or in a batch."""
    g = torch.Generator().manual_seed(4)
    z = torch.view_as_complex(torch.randn(5, 16, 4, 300, 2, generator=g))
    ref = z.to(torch.complex128).abs().square()
    assert torch.allclose(grids.sum_abs2(z, 2).double(), ref.sum(2), rtol=1e-6)
    assert torch.allclose(grids.sum_abs2(z).double(), ref, rtol=1e-6)
    for b in range(5):
        assert torch.equal(grids.sum_abs2(z[b : b + 1], 2), grids.sum_abs2(z, 2)[b : b + 1])
        assert torch.equal(grids.sum_abs2(z[b : b + 1]), grids.sum_abs2(z)[b : b + 1])
    # over trailing axes (the Frobenius norms of the likelihood's C^-1 [B, L, M, M]): the same at any batch
    C = torch.view_as_complex(torch.randn(37, 16, 16, 16, 2, generator=g))
    C = C @ C.mH  # Hermitian, as C^-1
    fro = grids.sum_abs2(C, (-2, -1))
    assert torch.allclose(fro.double(), C.to(torch.complex128).abs().square().sum((-2, -1)), rtol=1e-6)
    assert torch.allclose(grids.sum_abs2(C, (2, 3)), fro)
    for a, b in ((0, 1), (3, 5), (5, 12), (12, 37)):
        assert torch.equal(grids.sum_abs2(C[a:b], (-2, -1)), fro[a:b])
    with pytest.raises(ValueError, match="trailing axes"):
        grids.sum_abs2(C, (1, 2))
