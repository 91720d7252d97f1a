"""Conventions of docs/model.md: geometry, steering vectors, channel and codebooks."""

from __future__ import annotations

import cmath
import json
import math
from pathlib import Path

import pytest
import torch

from risloc import Scenario, physics

SC = Scenario()
DATA = Path(__file__).resolve().parent / "data"  # tests/data/README.md
STEERING_JSON = DATA / "steering-vectors.json"


def direct_steering(phi: float, theta: float, r: float, sc: Scenario = SC) -> list[complex]:
    """a_n = (r / d_n) exp(-j 2 pi (d_n - r) / lambda), written out element by element."""
    p = (r * math.cos(theta) * math.sin(phi), r * math.sin(theta), r * math.cos(theta) * math.cos(phi))
    out = []
    for j in range(sc.n_v):
        for i in range(sc.n_h):  # flat n = j * n_h + i
            e = ((i - (sc.n_h - 1) / 2) * sc.spacing_h, (j - (sc.n_v - 1) / 2) * sc.spacing_v, 0.0)
            d = math.dist(p, e)
            out.append((r / d) * cmath.exp(-2j * math.pi * (d - r) / sc.wavelength))
    return out


# --- reference vectors of an independent implementation -----------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.complex64, 1e-5), (torch.complex128, 1e-10)])
def test_steering_matches_reference_vectors(dtype, tol):
    points = json.loads(STEERING_JSON.read_text())["points"]
    assert len(points) >= 4
    for p in points:
        ref = torch.tensor(p["re"], dtype=torch.float64) + 1j * torch.tensor(p["im"], dtype=torch.float64)
        a = physics.steering(p["phi_rad"], p["theta_rad"], p["r_m"], SC, dtype=dtype)
        assert a.dtype == dtype and a.shape == (144,)
        err = (a.to(torch.complex128) - ref).abs().max().item()
        assert err < tol, (p["phi_rad"], p["theta_rad"], p["r_m"], err)


@pytest.mark.parametrize("phi, theta, r", [(0.0, 0.0, 1.0), (0.7, -0.35, 0.5), (-1.0, 0.5, 9.0), (0.2, 0.1, 3.3)])
def test_steering_matches_direct_formula(phi, theta, r):
    ref = torch.tensor(direct_steering(phi, theta, r), dtype=torch.complex128)
    a = physics.steering(phi, theta, r, SC, dtype=torch.complex128)
    assert (a - ref).abs().max().item() < 1e-12
    a32 = physics.steering(torch.tensor(phi), torch.tensor(theta), torch.tensor(r), SC)
    assert a32.dtype == torch.complex64
    assert (a32.to(torch.complex128) - ref).abs().max().item() < 1e-5


def test_hand_computed_corner_element():
    # source on boresight at 1 m; element (0, 0) at (-0.825, -0.825, 0): d = sqrt(1 + 2 * 0.825^2)
    d = math.sqrt(1 + 2 * 0.825**2)
    expected = (1 / d) * cmath.exp(-2j * math.pi * (d - 1) / 0.3)
    a = physics.steering(0.0, 0.0, 1.0, SC, dtype=torch.complex128)
    assert abs(complex(a[0]) - expected) < 1e-13
    # by symmetry, all four corners are equal on boresight, and the centre four too
    for n in (11, 132, 143):
        assert abs(complex(a[n]) - expected) < 1e-13
    centre = [5 * 12 + 5, 5 * 12 + 6, 6 * 12 + 5, 6 * 12 + 6]
    assert torch.allclose(a[centre], a[centre[0]].expand(4))


def test_point_convention():
    p = physics.position(torch.tensor(math.pi / 2), torch.tensor(0.0), torch.tensor(2.0))
    assert torch.allclose(p, torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)  # phi = 90 deg: +x
    p = physics.position(torch.tensor(0.0), torch.tensor(math.pi / 2), torch.tensor(2.0))
    assert torch.allclose(p, torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)  # theta = 90 deg: +y
    p = physics.position(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(2.0))
    assert torch.allclose(p, torch.tensor([0.0, 0.0, 2.0]))  # boresight +z


# --- element order ---------------------------------------------------------------------------------
def test_element_positions_flat_order():
    sc = Scenario(n_h=4, n_v=3, spacing_h=0.2, spacing_v=0.1)
    e = physics.element_positions(sc, dtype=torch.float64)
    assert e.shape == (12, 3)
    for j in range(3):
        for i in range(4):
            assert torch.allclose(e[j * 4 + i], torch.tensor([(i - 1.5) * 0.2, (j - 1.0) * 0.1, 0.0], dtype=torch.float64))


def test_steering_reshaped_varies_along_the_right_axis():
    # plane wave from azimuth only: phase varies with i (columns), constant along j (rows)
    a = physics.far_field_steering(0.3, 0.0, SC, dtype=torch.complex128).view(SC.n_v, SC.n_h)
    assert torch.allclose(a, a[:1].expand_as(a))
    assert not torch.allclose(a, a[:, :1].expand_as(a))
    step = a[0, 1] / a[0, 0]
    assert abs(cmath.phase(complex(step)) - 2 * math.pi * 0.15 * math.sin(0.3) / 0.3) < 1e-12
    # elevation only: varies with j (rows), constant along i
    a = physics.far_field_steering(0.0, 0.2, SC, dtype=torch.complex128).view(SC.n_v, SC.n_h)
    assert torch.allclose(a, a[:, :1].expand_as(a))
    step = a[1, 0] / a[0, 0]
    assert abs(cmath.phase(complex(step)) - 2 * math.pi * 0.15 * math.sin(0.2) / 0.3) < 1e-12
    # an exact (near-field) vector on an asymmetric grid keeps the same layout
    sc = Scenario(n_h=5, n_v=3)
    a = physics.steering(0.4, 0.0, 3.0, sc, dtype=torch.complex128).view(3, 5)
    assert torch.allclose(a[0], a[2])  # rows j = 0 and j = 2 mirror each other about y = 0


# --- limits and approximations ------------------------------------------------------------------------
def test_far_field_limit():
    # d_n - r -> -u.e_n, r / d_n -> 1: the exact vector tends to exp(+j 2 pi u.e / lambda), no common phase
    ff = physics.far_field_steering(0.5, 0.2, SC, dtype=torch.complex128)
    err5 = (physics.steering(0.5, 0.2, 1e5, SC, dtype=torch.complex128) - ff).abs().max().item()
    err6 = (physics.steering(0.5, 0.2, 1e6, SC, dtype=torch.complex128) - ff).abs().max().item()
    assert err5 < 3e-4  # second-order term |e|^2 / (2 r) ~ 7e-6 m -> 1.4e-4 rad
    assert 8 < err5 / err6 < 12  # decays as 1 / r
    assert (physics.steering(0.5, 0.2, 1e5, SC) - ff.to(torch.complex64)).abs().max().item() < 1e-3


def test_fresnel_option():
    def phase_err(r):
        exact = physics.steering(0.5, 0.2, r, SC, dtype=torch.complex128)
        fres = physics.steering(0.5, 0.2, r, SC, approximation="fresnel", dtype=torch.complex128)
        assert torch.allclose(fres.abs(), torch.ones(144, dtype=torch.float64))
        return (exact / fres).angle().abs().max().item()

    assert phase_err(10.0) < 0.1
    assert phase_err(1e4) < 1e-6  # third-order term ~ 1 / r^2
    assert phase_err(0.5) > 10 * phase_err(10.0)
    with pytest.raises(ValueError, match="approximation"):
        physics.steering(0.0, 0.0, 1.0, SC, approximation="parabolic")


def test_steering_batched_broadcast_and_dtype():
    phi = torch.linspace(-1, 1, 6).view(2, 3)
    a = physics.steering(phi, torch.tensor(0.1), torch.tensor(2.0), SC)
    assert a.shape == (2, 3, 144) and a.dtype == torch.complex64
    for k in range(3):
        assert torch.allclose(a[1, k], physics.steering(phi[1, k], 0.1, 2.0, SC), atol=1e-6)
    a128 = physics.steering(phi.double(), 0.1, 2.0, SC, dtype=torch.complex128)
    assert a128.dtype == torch.complex128
    assert (a128 - a).abs().max() < 1e-5


def test_autograd_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(144, dtype=torch.complex128, generator=gen)

    def f(x):
        return (w * physics.steering(x[0], x[1], x[2], SC, dtype=torch.complex128)).sum().real

    for point in ([0.3, -0.2, 1.5], [-0.9, 0.4, 7.0]):
        x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(f(x), x)
        assert torch.isfinite(grad).all()
        h = 1e-6
        fd = torch.stack([(f(x.detach() + h * e) - f(x.detach() - h * e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64)])
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-6), (grad, fd)
    assert torch.autograd.gradcheck(f, (torch.tensor([0.1, 0.2, 0.8], dtype=torch.float64, requires_grad=True),))


# --- channel ------------------------------------------------------------------------------------------------
def test_bs_steering_and_ris_phase():
    a = physics.bs_steering(torch.tensor([0.4]), SC, dtype=torch.complex128)[0]
    m = torch.arange(16, dtype=torch.float64) - 7.5
    assert torch.allclose(a, torch.exp(1j * math.pi * m * math.sin(0.4)))
    b = physics.bs_ris_phase(torch.tensor([0.3]), torch.tensor([-0.1]), SC, dtype=torch.complex128)[0]
    assert torch.allclose(b.abs(), torch.ones(144, dtype=torch.float64))
    ref = torch.tensor(direct_steering(0.3, -0.1, 30.0), dtype=torch.complex128)
    assert torch.allclose(b, ref / ref.abs(), atol=1e-12)


def test_channel_los_part_is_rank_one():
    B = 3
    gen = torch.Generator().manual_seed(0)
    psi, phi_b, theta_b = (torch.rand(B, generator=gen, dtype=torch.float64) - 0.5 for _ in range(3))
    kappa = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    zero = torch.zeros(B, 16, 144, dtype=torch.complex128)
    los = physics.channel(psi, phi_b, theta_b, kappa, zero, SC)
    sv = torch.linalg.svdvals(los)
    assert torch.allclose(sv[:, 0], torch.sqrt(kappa / (1 + kappa)) * math.sqrt(16 * 144))
    assert (sv[:, 1:] < 1e-9).all()
    W = torch.randn(B, 16, 144, dtype=torch.complex128, generator=gen)
    H = physics.channel(psi, phi_b, theta_b, kappa, W, SC)
    assert torch.allclose(H - los, W / torch.sqrt(1 + kappa).view(-1, 1, 1))


# --- codebooks -------------------------------------------------------------------------------------------------
def test_phase_codes_and_quantiser():
    q = torch.arange(8)
    c = physics.phase_codes(q, 3, dtype=torch.complex128)
    assert torch.allclose(c.abs(), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(c, torch.exp(2j * math.pi * q.double() / 8))
    phase = torch.tensor([0.0, 0.3, 0.5, 2 * math.pi - 0.1, -0.2, math.pi])
    assert physics.quantise_phase(phase, 3).tolist() == [0, 0, 1, 0, 0, 4]


def test_dft_codebook_per_docstring():
    codes = physics.dft_codes(SC, dtype=torch.complex128)
    assert codes.shape == (16, 144)
    assert torch.allclose(codes.abs(), torch.ones_like(codes.abs()))
    i = torch.arange(12, dtype=torch.float64).repeat(12)
    j = torch.arange(12, dtype=torch.float64).repeat_interleave(12)
    for l in range(16):
        u, v = 3 * (l % 4), 3 * (l // 4)  # u fastest, u, v in {0, 3, 6, 9}
        beam = torch.exp(2j * math.pi * (u * i / 12 + v * j / 12))
        assert torch.allclose(codes[l], beam, atol=1e-12)  # multiples of pi/2: 3-bit quantisation is exact
    gram = codes.conj() @ codes.T
    assert torch.allclose(gram, 144 * torch.eye(16, dtype=torch.complex128), atol=1e-9)  # orthogonal beams
    # a coarser quantiser rounds to its own levels
    q1 = physics.dft_codes(Scenario(code_bits=1), dtype=torch.complex128)
    assert set(torch.round(q1.real).tolist()[3]) <= {-1.0, 1.0} and torch.allclose(q1.imag, torch.zeros(()).double(), atol=1e-12)


def test_measurement_matrix():
    H = torch.randn(2, 16, 144, dtype=torch.complex64)
    c = physics.phase_codes(torch.randint(0, 8, (2, 16, 144)), 3)
    G = physics.measurement_matrix(H, c)
    assert G.shape == (2, 16, 16, 144)
    assert torch.allclose(G[1, 5], H[1] @ torch.diag(c[1, 5]), atol=1e-6)


@pytest.mark.parametrize("approximation", ["exact", "fresnel"])
@pytest.mark.parametrize("range_param", ["r", "rho"])
def test_steering_with_derivatives_match_finite_differences_and_autograd(approximation, range_param):
    g = torch.Generator().manual_seed(1)
    phi = (torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5) * 2.0
    theta = (torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5) * 1.0
    r = 0.5 + 20 * torch.rand(5, 3, generator=g, dtype=torch.float64)
    x = 1 / r if range_param == "rho" else r
    to_r = (lambda t: 1 / t) if range_param == "rho" else (lambda t: t)

    def f(p_, t_, x_):
        return physics.steering(p_, t_, to_r(x_), SC, approximation=approximation, dtype=torch.complex128)

    a, *ders = physics.steering_with_derivatives(phi, theta, x, SC, range_param=range_param,
                                                 approximation=approximation, dtype=torch.complex128)
    assert a.shape == (5, 3, SC.n_elements) and a.dtype == torch.complex128
    assert (a - f(phi, theta, x)).abs().max().item() < 1e-12
    args = [phi, theta, x]
    for i, d in enumerate(ders):
        h = 1e-6 * args[i].abs().clamp(min=1e-2)
        up = [t + h if j == i else t for j, t in enumerate(args)]
        dn = [t - h if j == i else t for j, t in enumerate(args)]
        fd = (f(*up) - f(*dn)) / (2 * h.unsqueeze(-1))
        assert ((fd - d).abs().max() / d.abs().max()).item() < 1e-6, (i, approximation, range_param)
        tangent = [torch.ones_like(t) if j == i else torch.zeros_like(t) for j, t in enumerate(args)]
        _, jvp = torch.func.jvp(f, tuple(args), tuple(tangent))
        assert ((jvp - d).abs().max() / d.abs().max()).item() < 1e-11, (i, approximation, range_param)


def test_steering_with_derivatives_chain_rule_between_range_parametrisations():
    phi, theta, r = torch.tensor([0.3, -0.6], dtype=torch.float64), torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([1.3, 7.0], dtype=torch.float64)
    *_, d_r = physics.steering_with_derivatives(phi, theta, r, SC, dtype=torch.complex128)
    *_, d_rho = physics.steering_with_derivatives(phi, theta, 1 / r, SC, range_param="rho", dtype=torch.complex128)
    assert torch.allclose(d_rho, -(r * r).unsqueeze(-1) * d_r, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="range_param"):
        physics.steering_with_derivatives(phi, theta, r, SC, range_param="1/r")
