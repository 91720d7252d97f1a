"""Impairments (docs/model.md, "Impairments"): CSI error, RIS phase noise, practical amplitude,
failed elements; off by default, reproducible per scene, stored in scene files."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from risloc import Scenario, io, physics, simulate
from risloc.cli import main
from risloc.data import SceneFileDataset
from risloc.scenes import Truth
from risloc.simulate import RNG_BLOCK, _Draws, _draw_block, _Layout

DATA = Path(__file__).resolve().parent / "data"
SMALL = dict(n_h=8, n_v=6, m_bs=8, snapshots=12)  # N = 48, a quick scenario for statistics
ALL_ON = dict(csi_nmse_db=-15.0, ris_phase_noise_deg=8.0, ris_amplitude="practical", ris_failed_fraction=0.1)


def _reference_module():
    spec = importlib.util.spec_from_file_location("make_simulator_reference", DATA / "make_simulator_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN equal to NaN."""
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a, nan=-9.0), torch.nan_to_num(b, nan=-9.0))


# --- off by default: today's scenes ------------------------------------------------------------------
def test_defaults_are_off():
    sc = Scenario()
    assert sc.csi_nmse_db is None and sc.ris_phase_noise_deg == 0 and sc.ris_amplitude == "ideal" and sc.ris_failed_fraction == 0
    assert not sc.impaired and not sc.csi_error and not sc.code_impairments
    s = simulate(sc, 3, seed=1)
    assert s.truth.H is None and s.truth.codes is None


def test_all_off_reproduces_the_pinned_scenes():
    """The scenes of tests/data/simulator_reference.npz, written by the simulator before impairments
    existed: a change of the draws or their order moves every number by O(1), not by rounding."""
    mod = _reference_module()
    ref = np.load(DATA / "simulator_reference.npz")
    for name, (fields, seed, start, n) in mod.CASES.items():
        off = dict(csi_nmse_db=None, ris_phase_noise_deg=0.0, ris_amplitude="ideal", ris_failed_fraction=0.0, ris_kappa=3.0)
        s = simulate(Scenario(**fields, **off), n, seed=seed, start=start)  # explicitly off (kappa unused while ideal)
        t = s.truth
        assert t.H is None and t.codes is None
        got = dict(y=s.y, H=s.H, codes=s.codes, snr_db=s.snr_db, K=t.K, phi=t.phi, theta=t.theta, r=t.r, power=t.power, noise_var=t.noise_var)
        for key, value in got.items():
            want = torch.from_numpy(ref[f"{name}/{key}"])
            assert value.shape == want.shape and value.dtype == want.dtype, (name, key)
            if key == "K":
                assert torch.equal(value, want)
                continue
            assert torch.equal(torch.isnan(value), torch.isnan(want)), (name, key)
            scale = torch.nan_to_num(want.abs(), nan=0.0).max()
            # bit for bit on the machine that wrote the file; a few float32 ulps of slack for other CPUs' libm
            assert torch.nan_to_num((value - want).abs(), nan=0.0).max() <= 4e-6 * scale, (name, key)


def test_impairments_leave_the_ideal_part_of_a_scene_unchanged():
    ideal = simulate(Scenario(**SMALL), 40, seed=2, start=1000)
    imp = simulate(Scenario(**SMALL, **ALL_ON), 40, seed=2, start=1000)
    for name in ("K", "phi", "theta", "r", "power"):
        assert same(getattr(ideal.truth, name), getattr(imp.truth, name)), name
    assert same(ideal.codes, imp.codes) and same(ideal.snr_db, imp.snr_db)  # commanded codes, nominal SNR
    assert same(ideal.H, imp.truth.H)  # the true channel is the ideal model's
    assert not torch.equal(imp.H, imp.truth.H) and not torch.equal(imp.codes, imp.truth.codes)


def test_each_impairment_has_its_own_draws():
    """Switching one impairment on does not change the draws of another (sweeps compare the same scenes)."""
    csi = simulate(Scenario(**SMALL, csi_nmse_db=-10.0), 20, seed=4)
    both = simulate(Scenario(**SMALL, csi_nmse_db=-10.0, ris_phase_noise_deg=5.0, ris_failed_fraction=0.2), 20, seed=4)
    assert torch.equal(csi.H, both.H)  # same H-hat = H + E
    failed = simulate(Scenario(**SMALL, ris_failed_fraction=0.2), 20, seed=4)
    assert torch.equal(failed.truth.codes == 0, both.truth.codes == 0)  # same failed elements
    assert csi.truth.codes is None and failed.truth.H is None


# --- the model: snapshots with the true H and realised codes, SNR on the realised clean signal -----
@pytest.mark.parametrize("signal", ["stochastic", "static"])
def test_snapshots_use_true_channel_and_realised_codes(signal):
    sc = Scenario(**SMALL, **ALL_ON, signal=signal)
    start = RNG_BLOCK - 3  # rows of two blocks
    s = simulate(sc, 6, seed=8, start=start)
    lay = _Layout(sc)
    wr = 2 ** (lay.code_group * sc.code_bits)
    t = s.truth
    for i in range(len(s)):
        block, row = divmod(start + i, RNG_BLOCK)
        d = _Draws(lay, RNG_BLOCK, torch.device("cpu"))
        _draw_block(d, 0, 8, block, wr)
        K = int(t.K[i])
        A = physics.steering(t.phi[i, :K].double(), t.theta[i, :K].double(), t.r[i, :K].double(), sc, dtype=torch.complex128)
        g = torch.view_as_complex(d.signal[row, :K].double().contiguous())  # [K, L]
        if signal == "static":
            g = g[:, :1].expand(K, sc.snapshots)
        x = A.T @ (g * torch.sqrt(t.power[i, :K].double() / 2).unsqueeze(-1))  # [N, L]
        noise = torch.view_as_complex(d.noise[row].double().contiguous()) * math.sqrt(float(t.noise_var[i]) / 2)

        def clean(H, codes):
            return torch.stack([H.to(torch.complex128) @ (codes[l].to(torch.complex128) * x[:, l]) for l in range(sc.snapshots)])

        true_clean = clean(t.H[i], t.codes[i])
        y = s.y[i].to(torch.complex128)
        scale = y.abs().max()
        assert (y - true_clean - noise).abs().max() < 1e-5 * scale  # y_l = H diag(c~_l) x_l + n_l
        # sigma^2 = P / 10^(SNR/10) with P the realised clean power (true H, realised codes)
        P = true_clean.abs().square().mean()
        assert float(t.noise_var[i]) == pytest.approx(float(P) / 10 ** (float(s.snr_db[i]) / 10), rel=1e-5)
        # what the receiver knows does not make these snapshots: the residual is far above rounding
        assert (y - clean(s.H[i], s.codes[i]) - noise).abs().max() > 1e-2 * scale


# --- each impairment's statistics -------------------------------------------------------------------
def test_csi_error_has_the_stated_nmse():
    nmse_db = -12.0
    eps = 10 ** (nmse_db / 10)
    sc = Scenario(csi_nmse_db=nmse_db)  # M N = 16 * 144 entries per scene
    s = simulate(sc, 512, seed=5)
    H, E = s.truth.H.to(torch.complex128), (s.H - s.truth.H).to(torch.complex128)
    MN = sc.m_bs * sc.n_elements
    per_scene = E.abs().square().sum((1, 2)) / H.abs().square().sum((1, 2))  # eps chi^2_{2MN} / (2MN) per scene
    sd = eps / math.sqrt(MN)  # its standard deviation
    assert abs(per_scene.mean().item() - eps) < 5 * sd / math.sqrt(len(s))
    assert (per_scene - eps).abs().max().item() < 6 * sd  # scaled per scene by |H|_F^2
    # circular: real and imaginary parts of equal power, E[E^2] = 0; uncorrelated with H
    power = E.abs().square().mean()
    assert abs(E.real.square().mean() / power - 0.5) < 0.01
    assert (E.square().mean().abs() / power) < 0.01
    assert ((E * H.conj()).mean().abs() / torch.sqrt(power * H.abs().square().mean())) < 0.01


def test_phase_noise_has_the_stated_standard_deviation():
    sigma_deg = 12.0
    sc = Scenario(**SMALL, ris_phase_noise_deg=sigma_deg)
    s = simulate(sc, 1024, seed=6)
    delta = torch.angle(s.truth.codes / s.codes).double()  # [S, L, N], radians
    n = delta.numel()
    sigma = math.radians(sigma_deg)
    assert abs(delta.std().item() / sigma - 1) < 5 / math.sqrt(2 * n)
    assert abs(delta.mean().item()) < 5 * sigma / math.sqrt(n)
    assert torch.allclose(s.truth.codes.abs(), torch.ones(()), atol=1e-6)  # ideal amplitude: phase only
    # independent over snapshots and elements
    a, b = delta[:, :-1].flatten(), delta[:, 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(len(a))
    a, b = delta[..., :-1].flatten(), delta[..., 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(len(a))
    # Gaussian: E|delta| = sigma sqrt(2/pi)
    assert abs(delta.abs().mean().item() / (sigma * math.sqrt(2 / math.pi)) - 1) < 0.01


@pytest.mark.parametrize("codebook", ["random", "dft"])
def test_practical_amplitude_follows_the_formula(codebook):
    sc = Scenario(**SMALL, codebook=codebook, ris_amplitude="practical", ris_beta_min=0.3, ris_mu=0.4, ris_kappa=2.2)
    s = simulate(sc, 64, seed=7)
    theta = torch.angle(s.codes.to(torch.complex128))  # the commanded phases
    want = (1 - 0.3) * ((torch.sin(theta - 0.4) + 1) / 2) ** 2.2 + 0.3
    got = s.truth.codes.abs().double()
    assert (got - want).abs().max() < 1e-6  # the amplitude model itself (float32 codes)
    assert got.min() >= 0.3 - 1e-6 and got.max() <= 1 + 1e-6
    assert torch.allclose(torch.angle(s.truth.codes / s.codes), torch.zeros(()), atol=1e-5)  # no phase change
    assert torch.allclose(physics.practical_amplitude(theta, sc), want)


def test_practical_amplitude_extremes_and_with_phase_noise():
    sc = Scenario(ris_amplitude="practical")  # beta_min 0.2, mu 0, kappa 1.6
    phase = torch.tensor([-math.pi / 2, 0.0, math.pi / 2], dtype=torch.float64)
    assert torch.allclose(physics.practical_amplitude(phase, sc), torch.tensor([0.2, 0.8 * 0.5**1.6 + 0.2, 1.0], dtype=torch.float64))
    both = Scenario(**SMALL, ris_amplitude="practical", ris_phase_noise_deg=10.0)
    s = simulate(both, 16, seed=3)
    want = physics.practical_amplitude(torch.angle(s.codes), both)  # amplitude of the commanded phase
    assert (s.truth.codes.abs() - want).abs().max() < 1e-6


def test_failed_elements():
    sc = Scenario(**SMALL, ris_failed_fraction=0.23)  # round(0.23 * 48) = round(11.04) = 11
    assert sc.n_failed_elements == 11
    s = simulate(sc, 1024, seed=9)
    dead = s.truth.codes == 0  # [S, L, N]
    assert torch.equal(dead, dead[:, :1].expand_as(dead))  # the same elements in every snapshot
    dead = dead[:, 0]
    assert (dead.sum(1) == 11).all()
    alive = ~dead.unsqueeze(1).expand_as(s.codes)
    assert torch.equal(s.truth.codes[alive], s.codes[alive])  # the others as commanded
    assert len({tuple(row.tolist()) for row in dead}) == len(s)  # a new set in every scene
    counts = dead.sum(0).double()  # each element fails with probability 11/48
    p = 11 / 48
    assert (counts - len(s) * p).abs().max() < 6 * math.sqrt(len(s) * p * (1 - p))


@pytest.mark.parametrize(("fraction", "n_h", "n_v", "want"), [(0.375, 2, 2, 2), (0.125, 2, 2, 1), (0.1, 12, 12, 14), (0.0, 12, 12, 0)])
def test_failed_count_is_rounded_half_up(fraction, n_h, n_v, want):
    assert Scenario(n_h=n_h, n_v=n_v, ris_failed_fraction=fraction).n_failed_elements == want


# --- reproducibility -----------------------------------------------------------------------------------
def test_impaired_scene_is_the_same_at_any_batch():
    sc = Scenario(**SMALL, **ALL_ON)
    batch = simulate(sc, 64, seed=11, start=RNG_BLOCK - 32)  # straddles two blocks
    for i in (0, 31, 32, 63):
        one = simulate(sc, 1, seed=11, start=RNG_BLOCK - 32 + i)
        for name in ("y", "H", "codes", "snr_db"):
            assert torch.equal(getattr(one, name)[0], getattr(batch, name)[i]), (i, name)
        for name in ("H", "codes", "noise_var", "phi", "r"):
            assert same(getattr(one.truth, name)[0], getattr(batch.truth, name)[i]), (i, name)


def test_complex128_matches_complex64():
    sc = Scenario(**SMALL, **ALL_ON)
    a, b = simulate(sc, 8, seed=12), simulate(sc, 8, seed=12, dtype=torch.complex128)
    assert b.truth.H.dtype == b.truth.codes.dtype == torch.complex128
    for x, y in ((a.y, b.y), (a.H, b.H), (a.truth.H, b.truth.H), (a.truth.codes, b.truth.codes)):
        assert (x.to(torch.complex128) - y).abs().max() < 1e-5 * y.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_and_has_the_statistics():
    sc = Scenario(**SMALL, **ALL_ON)
    s = simulate(sc, 256, seed=13, device="cuda")
    assert s.truth.H.is_cuda and s.truth.codes.is_cuda
    assert ((s.truth.codes[:, 0] == 0).sum(1) == sc.n_failed_elements).all()
    nmse = ((s.H - s.truth.H).abs().square().sum((1, 2)) / s.truth.H.abs().square().sum((1, 2))).mean().item()
    assert abs(nmse / 10 ** (-1.5) - 1) < 0.05
    one = simulate(sc, 1, seed=13, start=5, device="cuda")
    assert torch.equal(one.y[0], s.y[5]) and torch.equal(one.truth.codes[0], s.truth.codes[5])


# --- containers and files ------------------------------------------------------------------------------
def test_slicing_and_concatenation_keep_the_true_quantities():
    s = simulate(Scenario(**SMALL, **ALL_ON), 10, seed=14)
    part = s[3:7]
    assert torch.equal(part.truth.H, s.truth.H[3:7]) and torch.equal(part.truth.codes, s.truth.codes[3:7])
    again = type(s).cat([s[:4], s[4:]])
    assert torch.equal(again.truth.H, s.truth.H) and torch.equal(again.truth.codes, s.truth.codes)
    plain = simulate(Scenario(**SMALL), 3, seed=14)
    with pytest.raises(ValueError, match="'H' is None in some items"):
        Truth.cat([s.truth[:2], plain.truth])


def test_files_round_trip_the_true_quantities(tmp_path):
    sc = Scenario(**SMALL, **ALL_ON)
    s = simulate(sc, 20, seed=15)
    path = tmp_path / "imp.h5"
    with io.ScenesWriter(path) as w:  # written in chunks
        for a in range(0, 20, 7):
            w.write(s[a : a + 7])
    with h5py.File(path, "r") as f:
        assert f["truth/H"].dtype == np.complex64 and f["truth/H"].shape == (20, sc.m_bs, sc.n_elements)
        assert f["truth/codes"].dtype == np.complex64 and f["truth/codes"].shape == (20, sc.snapshots, sc.n_elements)
    info = io.validate_scenes_file(path)
    assert info.truth_inputs == ("H", "codes") and info.scenario == sc
    r = io.load_scenes(path)
    assert torch.equal(r.truth.H, s.truth.H) and torch.equal(r.truth.codes, s.truth.codes) and torch.equal(r.H, s.H)
    chunks = list(io.iter_scenes(path, 6, start=2))
    assert torch.equal(torch.cat([c.truth.codes for c in chunks]), s.truth.codes[2:])
    batch = SceneFileDataset(path)[[1, 6, 19]]  # the training dataset's reads
    assert torch.equal(batch.truth.H, s.truth.H[[1, 6, 19]]) and torch.equal(batch.truth.codes, s.truth.codes[[1, 6, 19]])
    # only the one that differs from what the receiver knows is stored
    only_codes = simulate(Scenario(**SMALL, ris_phase_noise_deg=5.0), 4, seed=15)
    io.save_scenes(only_codes, tmp_path / "codes.h5")
    with h5py.File(tmp_path / "codes.h5", "r") as f:
        assert "truth/codes" in f and "truth/H" not in f
    back = io.load_scenes(tmp_path / "codes.h5")
    assert back.truth.H is None and torch.equal(back.truth.codes, only_codes.truth.codes)
    # ideal scenes: neither, and they read as before
    io.save_scenes(simulate(Scenario(**SMALL), 4, seed=15), tmp_path / "ideal.h5")
    with h5py.File(tmp_path / "ideal.h5", "r") as f:
        assert "truth/H" not in f and "truth/codes" not in f
    plain = io.load_scenes(tmp_path / "ideal.h5")
    assert plain.truth.H is None and plain.truth.codes is None


def test_writer_refuses_chunks_that_disagree(tmp_path):
    sc = Scenario(**SMALL, ris_phase_noise_deg=5.0)
    s = simulate(sc, 6, seed=16)
    stripped = dataclasses.replace(s, truth=dataclasses.replace(s.truth, codes=None))
    with pytest.raises(ValueError, match="true H/codes"):
        with io.ScenesWriter(tmp_path / "x.h5") as w:
            w.write(s[:3])
            w.write(stripped[3:])
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("truth/H", (5, 8, 47), r"dataset 'truth/H' has shape \[5, 8, 47\]"),
        ("truth/codes", (4, 12, 48), r"dataset 'truth/codes' has shape \[4, 12, 48\]"),
    ],
)
def test_reader_refuses_badly_shaped_true_quantities(tmp_path, name, shape, message):
    s = simulate(Scenario(**SMALL, **ALL_ON), 5, seed=17)
    path = tmp_path / "bad.h5"
    io.save_scenes(s, path)
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=np.zeros(shape, np.complex64))
    for read in (io.validate_scenes_file, io.load_scenes, io.scenes_file_info):
        with pytest.raises(ValueError, match=message) as err:
            read(path)
        assert str(path) in str(err.value)


def test_reader_refuses_non_finite_true_channel(tmp_path):
    s = simulate(Scenario(**SMALL, csi_nmse_db=-10.0), 5, seed=18)
    path = tmp_path / "nan.h5"
    io.save_scenes(s, path)
    with h5py.File(path, "a") as f:
        f["truth/H"][3, 0, 0] = np.complex64(complex("nan+0j"))
    with pytest.raises(ValueError, match=r"dataset 'truth/H', scene 3: non-finite"):
        io.validate_scenes_file(path)


# --- the scenario fields: TOML, --set, JSON, validation -------------------------------------------------
def test_toml_json_and_set_round_trip(tmp_path):
    sc = Scenario(**ALL_ON, ris_beta_min=0.1, ris_mu=-0.3, ris_kappa=2.0)
    sc.save(tmp_path / "s.toml")
    assert Scenario.load(tmp_path / "s.toml") == sc
    assert Scenario.from_json(sc.to_json()) == sc
    off = Scenario()
    off.save(tmp_path / "off.toml")
    assert Scenario.load(tmp_path / "off.toml") == off and Scenario.load(tmp_path / "off.toml").csi_nmse_db is None
    assert Scenario.from_json(off.to_json()).csi_nmse_db is None
    got = Scenario().with_overrides(
        ["csi_nmse_db=-20", "ris_phase_noise_deg=10", "ris_amplitude=practical", "ris_beta_min=0.25", "ris_mu=0.1", "ris_kappa=1", "ris_failed_fraction=0.05"]
    )
    assert (got.csi_nmse_db, got.ris_phase_noise_deg, got.ris_amplitude) == (-20.0, 10.0, "practical")
    assert (got.ris_beta_min, got.ris_mu, got.ris_kappa, got.ris_failed_fraction) == (0.25, 0.1, 1.0, 0.05)
    assert got.with_overrides(["csi_nmse_db=none"]).csi_nmse_db is None
    assert got.with_overrides(["csi_nmse_db=off"]).csi_nmse_db is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(ris_failed_fraction=-0.1), "ris_failed_fraction"),
        (dict(ris_failed_fraction=1.0), "ris_failed_fraction"),
        (dict(ris_failed_fraction=0.999), "ris_failed_fraction"),  # round(0.999 * 144) = 144: nothing left
        (dict(ris_amplitude="lossy"), "ris_amplitude"),
        (dict(ris_phase_noise_deg=-1.0), "ris_phase_noise_deg"),
        (dict(ris_phase_noise_deg=float("nan")), "ris_phase_noise_deg"),
        (dict(csi_nmse_db=float("inf")), "csi_nmse_db"),
        (dict(csi_nmse_db=float("nan")), "csi_nmse_db"),
        (dict(ris_beta_min=1.5), "ris_beta_min"),
        (dict(ris_kappa=-1.0), "ris_kappa"),
        (dict(ris_mu=float("inf")), "ris_mu"),
    ],
)
def test_bad_values_are_refused(change, field):
    with pytest.raises(ValueError, match=f"Scenario.{field} = "):
        Scenario(**change)


def test_set_refuses_unreadable_values():
    with pytest.raises(ValueError, match="field 'csi_nmse_db': cannot read 'loud' as float"):
        Scenario().with_overrides(["csi_nmse_db=loud"])
    with pytest.raises(ValueError, match="field 'ris_failed_fraction'"):
        Scenario().with_overrides(["ris_failed_fraction=many"])


def test_cli_simulate_with_impairments(tmp_path, capsys):
    out = tmp_path / "imp.h5"
    sets = ["--set", "ris_phase_noise_deg=10", "--set", "csi_nmse_db=-20", "--set", "ris_failed_fraction=0.05"]
    assert main(["simulate", "--out", str(out), "--scenes", "12", "--seed", "3", "--chunk", "5", "--quiet", *sets]) == 0
    s = io.load_scenes(out)
    assert (s.scenario.ris_phase_noise_deg, s.scenario.csi_nmse_db, s.scenario.ris_failed_fraction) == (10.0, -20.0, 0.05)
    ref = simulate(s.scenario, 12, seed=3)
    assert torch.equal(s.y, ref.y) and torch.equal(s.truth.H, ref.truth.H) and torch.equal(s.truth.codes, ref.truth.codes)
    assert main(["simulate", "--out", str(tmp_path / "bad.h5"), "--scenes", "2", "--set", "ris_failed_fraction=1"]) != 0
    assert "ris_failed_fraction" in capsys.readouterr().err
    assert "ris_phase_noise_deg" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    return capsys.readouterr().out
