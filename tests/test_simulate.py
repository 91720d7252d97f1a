"""The simulator against docs/model.md: signal model, SNR, distributions, reproducibility."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from risloc import Scenario, Scenes, physics, simulate, simulate_chunks, source_covariance
from risloc.simulate import RNG_BLOCK, _channel_inplace, _Draws, _draw_block, _Layout, _separated, _sources_from, packed_code_table

SC = Scenario()
DEG = math.pi / 180


@pytest.fixture(scope="module")
def big() -> Scenes:
    return simulate(SC, 4 * RNG_BLOCK, seed=123)


def equal(a: Scenes, b: Scenes) -> None:
    """Bit-for-bit equality of every field."""
    for name in ("y", "H", "codes", "snr_db"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("K", "phi", "theta", "r", "power", "noise_var"):
        x, y = getattr(a.truth, name), getattr(b.truth, name)
        assert torch.equal(torch.nan_to_num(x, nan=-9.0), torch.nan_to_num(y, nan=-9.0)), name


def block_draws(sc: Scenario, seed: int, block: int) -> _Draws:
    """The raw random numbers of one RNG block, re-drawn as simulate does (cached)."""
    return _block_draws(sc.to_json(), seed, block)


@functools.lru_cache(maxsize=4)
def _block_draws(sc_json: str, seed: int, block: int) -> _Draws:
    sc = Scenario.from_json(sc_json)
    lay = _Layout(sc)
    d = _Draws(lay, RNG_BLOCK, torch.device("cpu"))
    _draw_block(d, 0, seed, block, 2 ** (lay.code_group * sc.code_bits) if lay.code_group else 1)
    return d


def draws_of(sc: Scenario, seed: int, index: int):
    """The raw random numbers of scene ``index``: (block draws, row in the block)."""
    block, row = divmod(index, RNG_BLOCK)
    return block_draws(sc, seed, block), row


def recompute(scenes: Scenes, seed: int, start: int):
    """For each scene, rebuild x_l = sum_k a_k s_k(l) and n_l from the raw draws and physics.steering,
    independently of the simulator's arithmetic. Returns clean [S, L, M] and noise [S, L, M] (complex128)."""
    sc = scenes.scenario
    t = scenes.truth
    clean, noise = [], []
    for i in range(len(scenes)):
        d, row = draws_of(sc, seed, start + i)
        K = int(t.K[i])
        A = physics.steering(t.phi[i, :K].double(), t.theta[i, :K].double(), t.r[i, :K].double(), sc, dtype=torch.complex128)
        g = torch.view_as_complex(d.signal[row, :K].double().contiguous())  # [K, L] standard CN(0, 2)
        if sc.signal == "static":
            g = g[:, :1].expand(K, sc.snapshots)
        s = g * torch.sqrt(t.power[i, :K].double() / 2).unsqueeze(-1)
        x = A.T @ s  # [N, L]
        H, c = scenes.H[i].to(torch.complex128), scenes.codes[i].to(torch.complex128)
        clean.append(torch.stack([H @ (c[l] * x[:, l]) for l in range(sc.snapshots)]))
        n = torch.view_as_complex(d.noise[row].double().contiguous())  # [L, M]
        noise.append(n * math.sqrt(float(t.noise_var[i]) / 2))
    return torch.stack(clean), torch.stack(noise)


# --- the measurement model and the SNR definition ------------------------------------------------------
@pytest.mark.parametrize("signal", ["stochastic", "static"])
def test_snapshots_follow_the_model_and_snr_is_nominal(signal):
    sc = Scenario(signal=signal)
    start = 3 * RNG_BLOCK - 4
    scenes = simulate(sc, 8, seed=9, start=start)
    clean, noise = recompute(scenes, 9, start)
    y = scenes.y.to(torch.complex128)
    scale = y.abs().amax(dim=(1, 2), keepdim=True)
    assert ((y - clean - noise).abs() / scale).max() < 1e-5  # y_l = H diag(c_l) sum_k a_k s_k(l) + n_l
    # sigma^2 = P / 10^(SNR/10), P = (1/(L M)) sum_l |y_l - n_l|^2 (the realised clean power)
    P = (y - noise).abs().square().mean(dim=(1, 2))
    assert torch.allclose(scenes.truth.noise_var.double(), P / 10 ** (scenes.snr_db.double() / 10), rtol=1e-5)


def test_noise_power_statistics(big):
    # E|y|^2 = P + sigma^2 = sigma^2 (10^(SNR/10) + 1) per scene, on average over 4096 scenes
    t = big.truth
    ratio = big.y.abs().square().mean(dim=(1, 2)) / (t.noise_var * (10 ** (big.snr_db / 10) + 1))
    assert abs(ratio.mean().item() - 1) < 0.01
    assert abs(big.H.abs().square().mean().item() - 1) < 0.01  # kappa/(1+kappa) + 1/(1+kappa)


def test_static_signals_are_identical_over_snapshots():
    # y_l = G_l x + n_l with ONE x: the stacked least-squares fit leaves only noise (K/(LM) of it absorbed)
    sc = Scenario(signal="static", snr_db_min=10, snr_db_max=10)
    static, stochastic = simulate(sc, 24, seed=2), simulate(sc.replace(signal="stochastic"), 24, seed=2)
    for scenes, expect_noise_only in ((static, True), (stochastic, False)):
        t = scenes.truth
        for i in range(len(scenes)):
            K = int(t.K[i])
            A = physics.steering(t.phi[i, :K].double(), t.theta[i, :K].double(), t.r[i, :K].double(), sc, dtype=torch.complex128)
            G = scenes.H[i].to(torch.complex128).unsqueeze(0) * scenes.codes[i].to(torch.complex128).unsqueeze(1)  # [L, M, N]
            Phi = (G @ A.T).reshape(-1, K)
            y = scenes.y[i].to(torch.complex128).reshape(-1, 1)
            resid = (y - Phi @ torch.linalg.lstsq(Phi, y).solution).abs().square().mean()
            ratio = (resid / t.noise_var[i]).item()
            if expect_noise_only:
                assert 0.6 < ratio < 1.4, (i, ratio)
            elif K >= 1:
                assert ratio > 3, (i, ratio)  # new signals every snapshot do not fit one x at 10 dB


# --- distributions -------------------------------------------------------------------------------------------
def test_number_of_sources_uniform(big):
    counts = torch.bincount(big.truth.K, minlength=6)[1:].numpy()
    assert big.truth.K.min() >= 1 and big.truth.K.max() <= 5
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    active = torch.isfinite(big.truth.phi)
    assert torch.equal(active.sum(1), big.truth.K)  # NaN exactly after the first K
    assert torch.equal(active, torch.arange(5) < big.truth.K.unsqueeze(1))


def test_positions_powers_and_snr_uniform(big):
    t = big.truth
    single = t.K == 1  # no separation rejection: exactly uniform
    for name, lo, hi in (("phi", -60 * DEG, 60 * DEG), ("theta", -30 * DEG, 30 * DEG), ("r", 0.5, 10.0)):
        x = getattr(t, name)
        xa = x[torch.isfinite(x)]
        assert xa.min() >= lo and xa.max() <= hi, name
        assert stats.kstest(x[single, 0].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name
    p_db = 10 * torch.log10(t.power[torch.isfinite(t.power)].double())
    assert p_db.min() >= -6 - 1e-6 and p_db.max() <= 1e-9
    assert stats.kstest(p_db.numpy(), stats.uniform(-6, 6).cdf).pvalue > 1e-3
    assert stats.kstest(big.snr_db.numpy(), stats.uniform(-5, 25).cdf).pvalue > 1e-3


def test_separation_rule_holds_for_every_pair(big):
    t = big.truth
    phi, theta = t.phi.double(), t.theta.double()
    ang = physics.angle_between(phi.unsqueeze(2), theta.unsqueeze(2), phi.unsqueeze(1), theta.unsqueeze(1))  # [S, K, K]
    k = torch.arange(5)
    pair = (k.view(-1, 1) < k.view(1, -1)) & (k.view(1, -1) < t.K.view(-1, 1, 1))
    assert pair.sum() > 10_000
    assert ang[pair].min() >= 5 * DEG - 1e-6


def test_crowded_field_uses_the_keyed_fallback():
    # a field of view so small that the 8 pre-drawn candidate sets often all fail
    sc = Scenario(k_fixed=4, phi_min=-8 * DEG, phi_max=8 * DEG, theta_min=-6 * DEG, theta_max=6 * DEG, min_separation=5 * DEG)
    a = simulate(sc, 48, seed=1, start=1000)
    t = a.truth
    ang = physics.angle_between(t.phi.double().unsqueeze(2), t.theta.double().unsqueeze(2), t.phi.double().unsqueeze(1), t.theta.double().unsqueeze(1))
    off = ~torch.eye(4, dtype=torch.bool)
    assert ang[:, :4, :4][:, off].min() >= 5 * DEG - 1e-6
    lay = _Layout(sc)
    d = block_draws(sc, 1, 0)
    phi, theta, r = _sources_from(d.uniform[1000:1024, lay.positions], sc)
    ok = _separated(phi, theta, torch.full((24,), 4), sc.min_separation)
    assert (~ok.any(1)).sum() > 0  # the fallback was needed for some scenes ...
    equal(a[20:30], simulate(sc, 10, seed=1, start=1020))  # ... and keeps them reproducible


def test_k_fixed_and_k_max():
    s = simulate(Scenario(k_fixed=2), 50, seed=0)
    assert (s.truth.K == 2).all() and s.truth.phi.shape == (50, 5)
    s = simulate(Scenario(k_max=3), 300, seed=0)
    assert s.truth.phi.shape == (300, 3) and set(s.truth.K.tolist()) == {1, 2, 3}


# --- codes and channel ------------------------------------------------------------------------------------------
def test_random_codes_on_2b_levels(big):
    q = big.codes.angle() / (2 * math.pi / 8)
    assert torch.allclose(big.codes.abs(), torch.ones(()), atol=1e-6)
    assert (q - q.round()).abs().max() < 1e-4
    counts = torch.bincount(torch.remainder(q.round().long(), 8).flatten(), minlength=8).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    # neighbouring elements and snapshots are independent: no correlation between adjacent levels
    lev = torch.remainder(q.round(), 8).flatten()
    assert abs(np.corrcoef(lev[:-1].numpy(), lev[1:].numpy())[0, 1]) < 0.01


@pytest.mark.parametrize("bits, n_h, n_v, L", [(3, 5, 5, 3), (1, 4, 3, 2), (5, 3, 3, 7), (13, 2, 2, 3)])
def test_packed_codes_other_sizes(bits, n_h, n_v, L):
    sc = Scenario(code_bits=bits, n_h=n_h, n_v=n_v, snapshots=L)
    s = simulate(sc, 2000, seed=3)
    q = torch.remainder(torch.round(s.codes.angle() / (2 * math.pi / 2**bits)), 2**bits)
    assert torch.allclose(s.codes, physics.phase_codes(q.long(), bits), atol=1e-5)
    assert len(torch.unique(q)) == min(2**bits, q.numel()) or 2**bits > 1000
    assert abs(q.mean().item() - (2**bits - 1) / 2) < 0.05 * 2**bits  # uniform levels


def test_packed_code_table_layout():
    table = packed_code_table(3, 4, dtype=torch.complex128)
    assert table.shape == (4096, 8)
    w = 0b101_011_000_111  # levels (t = 0..3): 7, 0, 3, 5
    codes = torch.view_as_complex(table[w].view(4, 2))
    assert torch.allclose(codes, physics.phase_codes(torch.tensor([7, 0, 3, 5]), 3, dtype=torch.complex128))


def test_dft_codebook_in_every_scene():
    s = simulate(Scenario(codebook="dft"), 5, seed=0)
    assert torch.equal(s.codes, physics.dft_codes(SC).expand(5, 16, 144))


def test_channel_built_in_place_equals_physics_channel():
    gen = torch.Generator().manual_seed(0)
    B = 4
    psi, phi_b, theta_b = (torch.rand(B, generator=gen) - 0.5 for _ in range(3))
    kappa = 0.5 + 9.5 * torch.rand(B, generator=gen)
    W = torch.randn(B, 16, 144, dtype=torch.complex64, generator=gen)
    ref = physics.channel(psi, phi_b, theta_b, kappa, W, SC)
    assert torch.allclose(_channel_inplace(W.clone(), psi, phi_b, theta_b, kappa, SC), ref, atol=1e-5)


# --- reproducibility ------------------------------------------------------------------------------------------
def test_chunking_invariance_bit_for_bit(big):
    equal(big[1000:1100], simulate(SC, 100, seed=123, start=1000))  # across a block boundary
    equal(big[7:8], simulate(SC, 1, seed=123, start=7))
    equal(big[2040:2200], Scenes.cat(list(simulate_chunks(SC, 160, seed=123, start=2040, chunk=37))))
    other = simulate(SC, 16, seed=124)
    assert not torch.equal(other.H, big.H[:16])


def test_reproducible_for_other_models():
    for sc in (Scenario(signal="static"), Scenario(codebook="dft", k_fixed=3)):
        a = simulate(sc, 30, seed=5, start=1010, with_covariance=True)
        b = Scenes.cat([simulate(sc, 14, seed=5, start=1010, with_covariance=True), simulate(sc, 16, seed=5, start=1024, with_covariance=True)])
        equal(a, b)
        assert torch.equal(a.truth.covariance, b.truth.covariance)


def test_with_covariance_is_sum_of_p_a_aH():
    s = simulate(SC, 6, seed=8, with_covariance=True)
    t = s.truth
    assert s.truth.covariance.shape == (6, 144, 144)
    for i in range(6):
        R = torch.zeros(144, 144, dtype=torch.complex128)
        for k in range(int(t.K[i])):
            a = physics.steering(t.phi[i, k].double(), t.theta[i, k].double(), t.r[i, k].double(), SC, dtype=torch.complex128)
            R += float(t.power[i, k]) * torch.outer(a, a.conj())
        assert torch.allclose(t.covariance[i].to(torch.complex128), R, rtol=1e-4, atol=1e-4 * R.abs().max().item())
    assert torch.allclose(source_covariance(t, SC), t.covariance, atol=1e-4)


def test_complex128_matches_complex64():
    a = simulate(SC, 10, seed=1)
    b = simulate(SC, 10, seed=1, dtype=torch.complex128)
    assert b.y.dtype == torch.complex128 and b.truth.phi.dtype == torch.float64
    assert torch.equal(a.truth.K, b.truth.K)
    assert ((b.y - a.y.to(torch.complex128)).abs().amax(dim=(1, 2)) / b.y.abs().amax(dim=(1, 2))).max() < 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_scenes"):
        simulate(SC, 0)
    with pytest.raises(ValueError, match="start"):
        simulate(SC, 1, start=-1)
    with pytest.raises(ValueError, match="dtype"):
        simulate(SC, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        next(simulate_chunks(SC, 10, chunk=0))
