"""Tests of risloc.crb: textbook closed forms, brute-force Fisher matrices, padding, scaling, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from risloc import Scenario, physics, simulate
from risloc.crb import crb, crb_for_scenes, fisher_information

f64, c128 = torch.float64, torch.complex128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _t(*rows, dtype=f64):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# reduced configuration: far-field ULA, y_l = a s(l) + n_l (H = I, codes = 1)
# ---------------------------------------------------------------------------------------------
def _ula(N=8, L=10):
    sc = Scenario(n_h=N, n_v=1, m_bs=N, snapshots=L)
    H = torch.eye(N, dtype=c128).unsqueeze(0)
    codes = torch.ones(1, L, N, dtype=c128)
    return sc, H, codes


def _ula_sum_i2(N):
    i = torch.arange(N, dtype=f64)
    return float(((i - i.mean()) ** 2).sum())


@pytest.mark.parametrize("phi0", [0.0, 0.4, -0.9])
def test_stochastic_single_source_matches_stoica_nehorai(phi0):
    # Stoica & Nehorai (1990): CRB = sigma^2/(2L) [Re((D^H P_A^perp D) o (P A^H R^-1 A P)^T)]^-1; for
    # one source on a centred ULA: (1/(2L)) (s2/p) (1 + s2/(N p)) / ((k d cos phi)^2 sum (i - i_bar)^2).
    N, L, p, s2 = 8, 10, 0.7, 0.3
    sc, H, codes = _ula(N, L)
    res = crb(H, codes, _t([phi0]), _t([0.0]), _t([1e6]), _t([p]), _t(s2), sc, params=("phi",))
    k, d = 2 * math.pi / sc.wavelength, sc.spacing_h
    closed = (1 / (2 * L)) * (s2 / p) * (1 + s2 / (N * p)) / ((k * d * math.cos(phi0)) ** 2 * _ula_sum_i2(N))
    assert res.phi.item() ** 2 == pytest.approx(closed, rel=1e-6)
    assert torch.isnan(res.theta).all() and torch.isnan(res.r).all()  # declared known
    assert bool(res.regular.all())


def test_static_single_source_matches_deterministic_closed_form():
    # Deterministic CRB, one source, s(l) = g for all l: sigma^2 / (2 L |g|^2 ||P_a^perp da/dphi||^2).
    N, L, s2, phi0 = 8, 10, 0.3, 0.4
    g = 0.6 * complex(math.cos(1.1), math.sin(1.1))
    sc, H, codes = _ula(N, L)
    res = crb(H, codes, _t([phi0]), _t([0.0]), _t([1e6]), _t([abs(g) ** 2]), _t(s2), sc,
              signal="static", gain=_t([g], dtype=c128), params=("phi",))
    k, d = 2 * math.pi / sc.wavelength, sc.spacing_h
    closed = s2 / (2 * L * abs(g) ** 2 * (k * d * math.cos(phi0)) ** 2 * _ula_sum_i2(N))
    assert res.phi.item() ** 2 == pytest.approx(closed, rel=1e-6)
    # the default amplitude sqrt(p) gives the same single-source bound (the phase of g drops out)
    res0 = crb(H, codes, _t([phi0]), _t([0.0]), _t([1e6]), _t([abs(g) ** 2]), _t(s2), sc, signal="static", params=("phi",))
    assert res0.phi.item() == pytest.approx(res.phi.item(), rel=1e-9)


def test_static_two_sources_match_deterministic_matrix_formula():
    # Stoica & Nehorai (1989): CRB = sigma^2/(2L) [Re((D^H P_A^perp D) o (g g^H)^T)]^-1 for s(l) = g.
    N, L, s2 = 10, 6, 0.2
    sc, H, codes = _ula(N, L)
    phis = [0.2, 0.55]
    g = torch.tensor([0.8 + 0.3j, -0.4 + 0.5j], dtype=c128)
    res = crb(H, codes, _t(phis), _t([0.0, 0.0]), _t([1e9, 1e9]), g.abs().square().unsqueeze(0), _t(s2), sc,
              signal="static", gain=g.unsqueeze(0), params=("phi",), full=True)
    A = physics.far_field_steering(torch.tensor(phis, dtype=f64), torch.zeros(2, dtype=f64), sc, dtype=c128).T
    x = physics.element_positions(sc, dtype=f64)[:, 0]
    D = A * (1j * 2 * math.pi / sc.wavelength * x.unsqueeze(1) * torch.cos(torch.tensor(phis, dtype=f64)))
    Pperp = torch.eye(N, dtype=c128) - A @ torch.linalg.solve(A.mH @ A, A.mH)
    M = ((D.mH @ Pperp @ D) * (g.unsqueeze(1) * g.conj().unsqueeze(0)).T).real
    closed = s2 / (2 * L) * torch.linalg.inv(M)
    assert torch.allclose(res.position_cov[0], closed, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# brute force on a small configuration: autograd of C_l(eta) and mu(eta)
# ---------------------------------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    sc = Scenario(n_h=4, n_v=3, m_bs=5, snapshots=3)
    S, L, M, N = 2, 3, 5, 12
    H = torch.randn(S, M, N, dtype=c128)
    codes = torch.polar(torch.ones(S, L, N, dtype=f64), 2 * math.pi * torch.rand(S, L, N, dtype=f64))
    phi, theta = _t([0.3, -0.4], [0.1, 0.5]), _t([0.2, -0.1], [0.0, 0.3])
    r, p, s2 = _t([1.0, 2.5], [0.7, 3.0]), _t([1.0, 0.5], [0.3, 0.8]), torch.tensor([0.2, 0.05], dtype=f64)
    return sc, H, codes, phi, theta, r, p, s2


def test_stochastic_fim_matches_brute_force_slepian_bangs():
    sc, H, codes, phi, theta, r, p, s2 = _small()
    F = fisher_information(H, codes, phi, theta, r, p, s2, sc)
    K, M = 2, 5
    for s in range(2):
        G = H[s].unsqueeze(0) * codes[s].unsqueeze(1)

        def C_of(eta):
            A = physics.steering(eta[:K], eta[K:2 * K], eta[2 * K:3 * K], sc, dtype=c128).T
            B = G @ A
            C = (B * eta[3 * K:4 * K].to(c128)) @ B.mH + eta[-1] * torch.eye(M, dtype=f64)
            return torch.view_as_real(C)

        eta = torch.cat([phi[s], theta[s], r[s], p[s], s2[s:s + 1]])
        J = torch.func.jacfwd(C_of)(eta)
        dC = torch.complex(J[..., 0, :], J[..., 1, :]).permute(3, 0, 1, 2)  # [n, L, M, M]
        Z = torch.linalg.inv(torch.view_as_complex(C_of(eta)))
        ZdC = Z.unsqueeze(0) @ dC
        Fb = torch.einsum("ilab,jlba->ij", ZdC, ZdC).real
        assert ((F[s] - Fb).abs().max() / Fb.abs().max()).item() < 1e-11


def test_static_fim_matches_brute_force_deterministic():
    sc, H, codes, phi, theta, r, p, s2 = _small()
    g = torch.tensor([[1 + 0.5j, 0.3 - 0.7j], [0.4j, 0.9]], dtype=c128)
    F = fisher_information(H, codes, phi, theta, r, p, s2, sc, signal="static", gain=g)
    K = 2
    for s in range(2):
        G = H[s].unsqueeze(0) * codes[s].unsqueeze(1)

        def mu(eta):
            A = physics.steering(eta[:K], eta[K:2 * K], eta[2 * K:3 * K], sc, dtype=c128).T
            return torch.view_as_real((G @ A) @ torch.complex(eta[3 * K:4 * K], eta[4 * K:]))

        eta = torch.cat([phi[s], theta[s], r[s], g[s].real, g[s].imag])
        J = torch.func.jacfwd(mu)(eta)
        Jc = torch.complex(J[..., 0, :], J[..., 1, :]).reshape(-1, eta.shape[0])
        Fb = 2 / s2[s] * (Jc.mH @ Jc).real
        assert ((F[s] - Fb).abs().max() / Fb.abs().max()).item() < 1e-12


# ---------------------------------------------------------------------------------------------
# padding, batching, degenerate cases
# ---------------------------------------------------------------------------------------------
def test_padding_and_batching_do_not_change_the_bound():
    sc, H, codes, phi, theta, r, p, s2 = _small()
    nan = float("nan")
    # scene 0 with one source padded to K_max = 3, scene 1 with two sources
    P3 = lambda t, fill=nan: torch.cat([t, torch.full((2, 1), fill, dtype=t.dtype)], 1)  # noqa: E731
    phi3, theta3, r3, p3 = P3(phi), P3(theta), P3(r), P3(p)
    phi3[0, 1] = theta3[0, 1] = r3[0, 1] = p3[0, 1] = nan
    for signal in ("stochastic", "static"):
        res = crb(H, codes, phi3, theta3, r3, p3, s2, sc, signal=signal, full=True)
        one = crb(H[:1], codes[:1], phi[:1, :1], theta[:1, :1], r[:1, :1], p[:1, :1], s2[:1], sc, signal=signal)
        two = crb(H[1:], codes[1:], phi[1:], theta[1:], r[1:], p[1:], s2[1:], sc, signal=signal)
        b1 = crb(H, codes, phi3, theta3, r3, p3, s2, sc, signal=signal, batch=1)
        for name in ("phi", "theta", "r"):
            got = getattr(res, name)
            assert got.shape == (2, 3)
            assert torch.isnan(got[0, 1:]).all() and torch.isnan(got[1, 2:]).all()
            assert torch.allclose(got[0, :1], getattr(one, name)[0], rtol=1e-10)
            assert torch.allclose(got[1, :2], getattr(two, name)[0], rtol=1e-10)
            assert torch.allclose(getattr(b1, name), got, rtol=1e-10, equal_nan=True)
        assert res.position_cov.shape == (2, 9, 9)
        assert torch.isnan(res.position_cov[0, 1]).all() and torch.isfinite(res.position_cov[0, 0, [0, 3, 6]]).all()
        assert bool(res.regular.all())


def test_identical_sources_give_inf_not_a_crash():
    sc, H, codes, phi, theta, r, p, s2 = _small()
    phi[0, 1], theta[0, 1], r[0, 1] = phi[0, 0], theta[0, 0], r[0, 0]
    for signal in ("stochastic", "static"):
        res = crb(H, codes, phi, theta, r, p, s2, sc, signal=signal)
        assert not bool(res.regular[0]) and bool(res.regular[1])
        assert torch.isinf(res.phi[0]).all() and torch.isinf(res.theta[0]).all() and torch.isinf(res.r[0]).all()
        assert torch.isfinite(res.phi[1]).all()


def test_bad_input_is_refused_with_scene_and_field():
    sc, H, codes, phi, theta, r, p, s2 = _small()
    bad = s2.clone()
    bad[1] = 0.0
    with pytest.raises(ValueError, match="noise_var of scene 1"):
        crb(H, codes, phi, theta, r, p, bad, sc)
    with pytest.raises(ValueError, match="signal"):
        crb(H, codes, phi, theta, r, p, s2, sc, signal="coherent")
    with pytest.raises(ValueError, match="K must"):
        crb(H, codes, phi, theta, r, p, s2, sc, K=torch.tensor([1, 3]))
    rr = r.clone()
    rr[1, 0] = float("nan")
    with pytest.raises(ValueError, match="r of scene 1, source 0"):
        crb(H, codes, phi, theta, rr, p, s2, sc, K=torch.tensor([2, 2]))


# ---------------------------------------------------------------------------------------------
# behaviour on the default scenario
# ---------------------------------------------------------------------------------------------
def _at_snr(scenes, snr_db):
    """Same scenes with sigma^2 set from the realised clean power at the given SNR."""
    t = scenes.truth
    # P = sigma^2_old * 10^(snr_old/10) is the realised clean power of each scene (docs/model.md)
    P = t.noise_var.double() * 10 ** (scenes.snr_db.double() / 10)
    return P / 10 ** (snr_db / 10)


def test_scaling_with_snr_and_snapshots():
    sc = Scenario(k_fixed=2)
    scenes = simulate(sc, 6, seed=3)
    t = scenes.truth
    args = (scenes.H, scenes.codes, t.phi, t.theta, t.r, t.power)
    for signal in ("stochastic", "static"):
        v = [crb(*args, _at_snr(scenes, snr), sc, signal=signal).phi[:, :2].square() for snr in (30.0, 40.0, 50.0)]
        assert (v[1] < v[0]).all() and (v[2] < v[1]).all()
        ratio = v[1] / v[2]  # 1/SNR law at high SNR
        assert torch.allclose(ratio, torch.full_like(ratio, 10.0), rtol=0.02)
    # more snapshots (repeat the codes of each scene): the information adds, the bound falls
    s2 = _at_snr(scenes, 10.0)
    short = crb(scenes.H, scenes.codes[:, :8], t.phi, t.theta, t.r, t.power, s2, sc)
    full = crb(scenes.H, scenes.codes, t.phi, t.theta, t.r, t.power, s2, sc)
    double = crb(scenes.H, scenes.codes.repeat(1, 2, 1), t.phi, t.theta, t.r, t.power, s2, sc)
    for name in ("phi", "theta", "r"):
        a, b, c = (getattr(x, name)[:, :2] for x in (short, full, double))
        assert (b < a).all() and torch.allclose(c, b / math.sqrt(2), rtol=1e-9)


# median sqrt(CRB) at 20 dB of the 64 default scenes of seed 0 (phi [deg], theta [deg], r/r),
# computed in float64, so the same on any machine to far better than the 10 % band of the test;
# a factor 2 in the Fisher information (a lost conjugate term, a snapshot count) moves them by 41 %
MEDIAN_SQRT_CRB_20DB = {"stochastic": (0.157, 0.125, 0.0304), "static": (0.086, 0.065, 0.0175)}


def test_default_scenes_give_plausible_bounds():
    """The bounds of the default scenes at 20 dB: finite exactly on the sources, medians pinned
    within 10 %, and the deterministic (static) model, whose amplitudes are not nuisance
    parameters, bounds tighter than the stochastic one."""
    sc = Scenario()
    scenes = simulate(sc, 64, seed=0)
    scenes.truth.noise_var = _at_snr(scenes, 20.0).float()
    medians = {}
    for signal in ("stochastic", "static"):
        res = crb_for_scenes(scenes, signal=signal)
        K = scenes.truth.K
        active = torch.arange(sc.k_max).view(1, -1) < K.view(-1, 1)
        assert torch.equal(torch.isfinite(res.phi), active)  # finite exactly on the real sources
        med_phi = math.degrees(res.phi[active].median().item())
        med_theta = math.degrees(res.theta[active].median().item())
        med_rel_r = (res.r / scenes.truth.r.double())[active].median().item()
        print(f"{signal}: median sqrt CRB at 20 dB: phi {med_phi:.3f} deg, theta {med_theta:.3f} deg, r/r {med_rel_r:.4f}")
        medians[signal] = (med_phi, med_theta, med_rel_r)
        for got, want in zip(medians[signal], MEDIAN_SQRT_CRB_20DB[signal]):
            assert abs(got / want - 1) < 0.1, (signal, medians[signal])
    assert all(a > b for a, b in zip(medians["stochastic"], medians["static"]))
    assert crb_for_scenes(scenes).signal == "stochastic"
    scenes.truth = None
    with pytest.raises(ValueError, match="truth"):
        crb_for_scenes(scenes)


def test_woodbury_fim_matches_explicit_inverse_at_high_and_low_snr():
    from risloc.crb import _whitened_products, stochastic_fisher

    sc = Scenario(k_fixed=3)
    scenes = simulate(sc, 4, seed=5)
    t = scenes.truth
    a, *d = physics.steering_with_derivatives(t.phi[:, :3], t.theta[:, :3], t.r[:, :3], sc, dtype=c128)
    vecs = torch.cat([a, *d], 1)
    G = scenes.H.to(c128).unsqueeze(1) * scenes.codes.to(c128).unsqueeze(2)
    V = G @ vecs.mT.unsqueeze(1)  # [S, L, M, 4K]
    p = t.power[:, :3].double()
    M = sc.m_bs
    for snr in (-10.0, 20.0, 60.0):
        s2 = _at_snr(scenes, snr)
        Fw = stochastic_fisher(*_whitened_products(V.mH @ V, p, s2, 3, M), p, s2, 3)
        # reference: explicit C_l^-1
        B = V[..., :3]
        C = (B * p.view(4, 1, 1, 3).to(c128)) @ B.mH + s2.view(4, 1, 1, 1) * torch.eye(M, dtype=c128)
        Z = torch.linalg.inv(C)
        ZV = Z @ V
        Fd = stochastic_fisher(V.mH @ ZV, ZV.mH @ ZV, Z.abs().square().sum((1, 2, 3)), p, s2, 3)
        rel = (Fw - Fd).abs().amax((1, 2)) / Fd.abs().amax((1, 2))
        assert (rel < 1e-9).all(), (snr, rel)
        cw = torch.linalg.inv(Fw).diagonal(dim1=1, dim2=2)[:, :9]
        cd = torch.linalg.inv(Fd).diagonal(dim1=1, dim2=2)[:, :9]
        assert torch.allclose(cw, cd, rtol=1e-6), snr


# ---------------------------------------------------------------------------------------------
# files and CLI
# ---------------------------------------------------------------------------------------------
def test_cli_writes_crb_file_and_load_crb_reads_it(tmp_path, capsys):
    from risloc import io
    import h5py

    from risloc.cli import main
    from risloc.io import load_crb

    sc = Scenario(k_max=3)
    scenes = simulate(sc, 21, seed=2)
    src = tmp_path / "scenes.h5"
    io.save_scenes(scenes, src)
    out = tmp_path / "crb.h5"
    assert main(["crb", str(src), "--out", str(out), "--batch", "8", "--no-progress"]) == 0
    back = load_crb(out)
    ref = crb_for_scenes(io.load_scenes(src))
    for name in ("phi", "theta", "r"):
        got = getattr(back, name)
        assert got.dtype == torch.float32 and got.shape == (21, 3)
        assert torch.allclose(got.double(), getattr(ref, name), rtol=1e-6, equal_nan=True)
    assert torch.equal(back.regular, ref.regular)
    with h5py.File(src, "r") as f_in, h5py.File(out, "r") as f_out:
        for key in ("format", "version", "scenario"):
            assert f_out.attrs[key] == f_in.attrs[key]
        assert f_out.attrs["content"] == "crb" and f_out.attrs["signal"] == "stochastic"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    # static on request; the evaluator's reader accepts the file
    assert main(["crb", str(src), "--out", str(out), "--signal", "static", "--no-progress"]) == 0
    assert load_crb(out).signal == "static"
    from risloc.cli.evaluate import read_crb

    assert read_crb(str(out), 21).phi.shape == (21, 3)

    # no truth group: a clear error, no output file
    bare = tmp_path / "bare.h5"
    scenes.truth = None
    io.save_scenes(scenes, bare)
    out2 = tmp_path / "none.h5"
    assert main(["crb", str(bare), "--out", str(out2), "--no-progress"]) == 2
    assert "truth" in capsys.readouterr().err and not out2.exists()


def test_crb_and_ml_stochastic_fisher_information_agree():
    """The Fisher matrix of the bound (phi, theta, r, p, sigma^2) and the one ml's scoring uses
    (phi, theta, rho = 1/r, log p, log sigma^2) are one matrix in two parametrisations:
    F_ml = T F_crb T with T = diag(1, 1, dr/drho = -r^2, p, sigma^2), on random scenes in float64."""
    from risloc.estimators.ml_core import stochastic_eval

    sc = Scenario(k_fixed=3)
    scenes = simulate(sc, 6, seed=11)
    t = scenes.truth
    K = 3
    phi, theta, r, p = (v[:, :K].double() for v in (t.phi, t.theta, t.r, t.power))
    active = torch.ones(6, K, dtype=torch.bool)
    active[1, 2] = False  # a scene with two sources in a three-slot model
    for snr in (-5.0, 20.0, 50.0):
        s2 = _at_snr(scenes, snr)
        F_crb = fisher_information(scenes.H, scenes.codes, phi, theta, r, p, s2, sc, active=active)
        y = scenes.y.to(c128)  # the Fisher matrix does not depend on y
        _, _, F_ml = stochastic_eval(phi, theta, 1 / r, p.log(), s2.log(), active, y, scenes.H.to(c128), scenes.codes.to(c128), sc)
        T = torch.cat([torch.ones(6, 2 * K, dtype=f64), -r * r, p, s2.view(-1, 1)], 1)
        F_t = T.unsqueeze(-1) * F_crb * T.unsqueeze(-2)
        keep = torch.cat([active.repeat(1, 4), torch.ones(6, 1, dtype=torch.bool)], 1)  # masked slots: identity in ml
        for s in range(6):
            k = keep[s]
            a, b = F_t[s][k][:, k], F_ml[s][k][:, k]
            d = torch.diagonal(b).abs().sqrt()
            rel = ((a - b) / (d.unsqueeze(-1) * d.unsqueeze(-2))).abs().max().item()
            assert rel < 1e-9, (snr, s, rel)
