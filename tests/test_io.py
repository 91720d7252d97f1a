"""Scene and estimates files (docs/scene-files.md), the reference files, and risloc.data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from risloc import Estimates, Scenario, Scenes, io, physics, simulate
from risloc.data import SceneFileDataset, SimulatedScenes

DATA = Path(__file__).resolve().parent / "data"  # tests/data/README.md
REF_DEFAULT = DATA / "reference-scenes-default.h5"
REF_K1 = DATA / "reference-scenes-k1-static-30db.h5"

SC = Scenario()


@pytest.fixture(scope="module")
def scenes() -> Scenes:
    return simulate(SC, 40, seed=11, start=1000)  # crosses an RNG block boundary (1024)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b.to(a.dtype), nan=-7.0))


def assert_same_scenes(a: Scenes, b: Scenes) -> None:
    assert a.scenario == b.scenario
    for name in ("y", "H", "codes", "snr_db"):
        assert same(getattr(a, name), getattr(b, name)), name
    for name in ("K", "phi", "theta", "r", "power", "noise_var"):
        assert same(getattr(a.truth, name), getattr(b.truth, name)), name


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- round trips -------------------------------------------------------------------------------------
def test_round_trip(tmp_path, scenes):
    path = tmp_path / "s.h5"
    io.save_scenes(scenes, path)
    assert listing(tmp_path) == ["s.h5"]
    with h5py.File(path) as f:
        assert f.attrs["format"] == "risloc-scenes" and int(f.attrs["version"]) == 1
        assert json.loads(f.attrs["scenario"]) == SC.to_dict()  # every field
        assert f["y"].dtype == np.complex64 and f["H"].dtype == np.complex64 and f["codes"].dtype == np.complex64
        assert f["y"].shape == (40, 16, 16) and f["H"].shape == (40, 16, 144) and f["codes"].shape == (40, 16, 144)
        assert f["truth/K"].dtype == np.int32 and f["truth/phi"].dtype == np.float32 and f["snr_db"].dtype == np.float32
        assert f["truth/phi"].shape == (40, 5) and f["truth/noise_var"].shape == (40,)
        assert f["H"].chunks is not None and f["H"].maxshape[0] is None  # chunked, resizable
        assert f["H"].chunks[0] <= 64  # no chunk larger than the file needs (40 scenes): each is allocated whole
        assert f["H"].dtype.names is None or set(f["H"].dtype.names) == {"r", "i"}
    back = io.load_scenes(path)
    assert back.y.dtype == torch.complex64 and back.truth.K.dtype == torch.int64
    assert_same_scenes(scenes, back)
    assert_same_scenes(scenes[5:17], io.load_scenes(path, 5, 17))
    chunks = list(io.iter_scenes(path, 16))
    assert [len(c) for c in chunks] == [16, 16, 8]
    assert_same_scenes(scenes, Scenes.cat(chunks))
    assert_same_scenes(scenes[30:], Scenes.cat(list(io.iter_scenes(path, 3, start=30))))
    with pytest.raises(ValueError, match="scene range"):
        io.load_scenes(path, 10, 50)


def test_writer_appends_chunks_and_complex128(tmp_path, scenes):
    path = tmp_path / "w.h5"
    with io.ScenesWriter(path) as w:
        for a in range(0, 40, 13):
            w.write(scenes[a : a + 13])
    assert_same_scenes(scenes, io.load_scenes(path))
    # complex128 input is stored as complex64 (expected= pre-sizes, close() trims)
    s128 = simulate(SC, 3, seed=2, dtype=torch.complex128)
    with io.ScenesWriter(tmp_path / "d.h5", SC, expected=10) as w:
        w.write(s128)
    back = io.load_scenes(tmp_path / "d.h5")
    assert len(back) == 3 and torch.allclose(back.H, s128.H.to(torch.complex64))


def test_without_truth_and_snr(tmp_path, scenes):
    bare = Scenes(y=scenes.y, H=scenes.H, codes=scenes.codes, scenario=SC)
    io.save_scenes(bare, tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5") as f:
        assert "truth" not in f and "snr_db" not in f
    back = io.load_scenes(tmp_path / "m.h5")
    assert back.truth is None and back.snr_db is None and torch.equal(back.y, scenes.y)


def test_writer_refuses_mixed_chunks(tmp_path, scenes):
    with pytest.raises(ValueError, match="truth"):
        with io.ScenesWriter(tmp_path / "x.h5") as w:
            w.write(scenes[:3])
            w.write(Scenes(y=scenes.y[3:6], H=scenes.H[3:6], codes=scenes.codes[3:6], scenario=SC, snr_db=scenes.snr_db[3:6]))
    with pytest.raises(ValueError, match="scenario"):
        with io.ScenesWriter(tmp_path / "x.h5") as w:
            w.write(scenes[:3])
            w.write(simulate(Scenario(k_max=3), 2))
    assert listing(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path, scenes):
    path = tmp_path / "big.h5"
    with pytest.raises(RuntimeError, match="crash"):
        with io.ScenesWriter(path, SC) as w:
            w.write(scenes[:20])
            assert any(name.endswith(".tmp") for name in listing(tmp_path))  # writing under a temporary name
            raise RuntimeError("crash")
    assert listing(tmp_path) == []  # neither the final name nor the temporary file
    # an existing file under the final name survives a failed rewrite untouched
    io.save_scenes(scenes[:5], path)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with io.ScenesWriter(path, SC) as w:
            w.write(scenes)
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["big.h5"] and path.read_bytes() == before


def test_estimates_round_trip(tmp_path):
    nan = float("nan")
    est = Estimates(
        K=torch.tensor([2, 0, 1]),
        phi=torch.tensor([[0.1, -0.2, nan], [nan, nan, nan], [0.3, nan, nan]]),
        theta=torch.tensor([[0.0, 0.1, nan], [nan, nan, nan], [-0.3, nan, nan]]),
        r=torch.tensor([[1.0, 2.0, nan], [nan, nan, nan], [9.0, nan, nan]]),
        method="music",
    )
    path = tmp_path / "e.h5"
    io.save_estimates(est, path, SC)
    with h5py.File(path) as f:
        assert f.attrs["format"] == "risloc-estimates" and int(f.attrs["version"]) == 1 and f.attrs["method"] == "music"
        assert f["est/K"].dtype == np.int32 and f["est/phi"].shape == (3, 5) and f["est/phi"].dtype == np.float32
    back = io.load_estimates(path)
    assert back.method == "music" and back.K.tolist() == [2, 0, 1]
    assert back.phi.shape == (3, 5) and same(back.phi[:, :3], est.phi) and torch.isnan(back.phi[:, 3:]).all()
    with pytest.raises(ValueError, match="est/K: scene 0"):
        io.save_estimates(Estimates(torch.tensor([6]), *(torch.zeros(1, 6),) * 3), tmp_path / "f.h5", SC)
    assert not (tmp_path / "f.h5").exists()


# --- validation: every rule, with the dataset and the scene named -------------------------------------
def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f[name] = data


def _set_row(name: str, row: int, value):
    def fn(f):
        data = f[name][:]
        data[row] = value
        _replace(f, name, data)

    return fn


CASES = [
    ("format", lambda f: f.attrs.__setitem__("format", "other"), r"attribute 'format' is 'other'"),
    ("no format", lambda f: f.attrs.__delitem__("format"), r"root attribute 'format' is missing"),
    ("version", lambda f: f.attrs.__setitem__("version", 2), r"attribute 'version' is 2"),
    ("no scenario", lambda f: f.attrs.__delitem__("scenario"), r"root attribute 'scenario' is missing"),
    ("bad scenario", lambda f: f.attrs.__setitem__("scenario", "{not json"), r"attribute 'scenario' is not a valid"),
    ("missing H", lambda f: f.__delitem__("H"), r"dataset 'H' is missing"),
    ("missing codes", lambda f: f.__delitem__("codes"), r"dataset 'codes' is missing"),
    ("L vs scenario", lambda f: f.attrs.__setitem__("scenario", json.dumps({**SC.to_dict(), "snapshots": 8})), r"dataset 'y' has shape \[12, 16, 16\], expected \[S, 8, 16\]"),
    ("N vs scenario", lambda f: f.attrs.__setitem__("scenario", json.dumps({**SC.to_dict(), "n_h": 6})), r"dataset 'H' has shape \[12, 16, 144\], expected \[12, 16, 72\]"),
    ("S disagree", lambda f: _replace(f, "codes", f["codes"][:10]), r"dataset 'codes' has shape \[10, 16, 144\], expected \[12, 16, 144\]"),
    ("K_max", lambda f: _replace(f, "truth/phi", f["truth/phi"][:, :3]), r"dataset 'truth/phi' has shape \[12, 3\], expected \[12, 5\]"),
    ("dtype", lambda f: _replace(f, "y", f["y"][:].real), r"dataset 'y' has dtype float32, expected complex"),
    ("nan y", _set_row("y", 7, np.nan), r"dataset 'y', scene 7: non-finite"),
    ("inf H", _set_row("H", 3, np.inf), r"dataset 'H', scene 3: non-finite"),
    ("nan codes", _set_row("codes", 11, complex(0, np.nan)), r"dataset 'codes', scene 11: non-finite"),
    ("nan snr", _set_row("snr_db", 2, np.nan), r"dataset 'snr_db', scene 2: non-finite"),
    ("zero H", _set_row("H", 9, 0), r"dataset 'H', scene 9: channel is all zero"),
    ("zero codes", _set_row("codes", 4, 0), r"dataset 'codes', scene 4: RIS codes are all zero"),
    ("truth K", _set_row("truth/K", 5, 9), r"dataset 'truth/K', scene 5: K = 9 outside 0..k_max=5"),
    ("truth padding", _set_row("truth/r", 6, 1.0), r"dataset 'truth/r', scene 6: need finite values for the first K"),
    ("truth missing", _set_row("truth/theta", 8, np.nan), r"dataset 'truth/theta', scene 8"),
    ("noise var", _set_row("truth/noise_var", 1, -1.0), r"dataset 'truth/noise_var', scene 1"),
    ("truth part", lambda f: f.__delitem__("truth/power"), r"dataset 'truth/power' is missing"),
]


@pytest.mark.parametrize("name, edit, message", CASES, ids=[c[0] for c in CASES])
def test_validation_refuses(tmp_path, scenes, name, edit, message):
    path = tmp_path / "bad.h5"
    io.save_scenes(scenes[:12], path)
    io.validate_scenes_file(path)  # valid before the edit
    _edit(path, edit)
    with pytest.raises(ValueError, match=message):
        io.validate_scenes_file(path)
    with pytest.raises(ValueError, match=message):
        io.load_scenes(path)


def test_validation_streams_and_runs_before_work(tmp_path, scenes):
    path = tmp_path / "late.h5"
    io.save_scenes(scenes, path)
    _edit(path, _set_row("H", 37, 0))
    with pytest.raises(ValueError, match="dataset 'H', scene 37: channel is all zero"):
        io.validate_scenes_file(path, chunk=8)  # found in the fifth chunk, index is absolute
    with pytest.raises(ValueError, match="scene 37"):
        io.iter_scenes(path, 4)  # refused at the call, before the first chunk is read
    with pytest.raises(FileNotFoundError):
        io.load_scenes(tmp_path / "absent.h5")


def test_estimates_validation(tmp_path):
    est = Estimates(torch.tensor([1, 2]), *(torch.tensor([[0.1, 0.2], [0.3, 0.4]]),) * 3, method="x")
    est.phi = torch.tensor([[0.1, float("nan")], [0.3, 0.4]])
    est.theta, est.r = est.phi.clone(), est.phi.clone()
    path = tmp_path / "e.h5"
    io.save_estimates(est, path, SC)
    assert io.validate_estimates_file(path).n_scenes == 2
    for edit, message in [
        (lambda f: f.attrs.__setitem__("format", "risloc-scenes"), "attribute 'format'"),
        (_set_row("est/K", 1, 7), r"dataset 'est/K', scene 1: K-hat = 7"),
        (_set_row("est/r", 0, 1.0), r"dataset 'est/r', scene 0: need finite values for the first K-hat"),
        (lambda f: f.__delitem__("est/theta"), r"dataset 'est/theta' is missing"),
    ]:
        io.save_estimates(est, path, SC)
        _edit(path, edit)
        with pytest.raises(ValueError, match=message):
            io.load_estimates(path)


def test_scenario_json_of_other_tools(tmp_path, scenes):
    path = tmp_path / "s.h5"
    io.save_scenes(scenes[:4], path)
    required = {k: SC.to_dict()[k] for k in ("wavelength", "n_h", "n_v", "spacing_h", "spacing_v", "m_bs", "snapshots", "k_max", "signal")}
    _edit(path, lambda f: f.attrs.__setitem__("scenario", json.dumps({**required, "made_by": "another tool"})))
    assert io.load_scenes(path).scenario == SC  # unknown keys ignored, missing fields take defaults


# --- the reference files of an independent implementation --------------------------------------------------
def _ls_fit(scenes: Scenes, static: bool):
    """Least-squares fit of y with the true source positions: returns (fitted clean y, residual power).

    static: y = Phi g with Phi = [H diag(c_l) a_k]_l stacked over snapshots (K unknowns);
    stochastic: each snapshot y_l = H diag(c_l) A s_l on its own (K unknowns per snapshot).
    """
    t = scenes.truth
    sc = scenes.scenario
    fitted = torch.zeros_like(scenes.y, dtype=torch.complex128)
    for i in range(len(scenes)):
        K = int(t.K[i])
        A = physics.steering(t.phi[i, :K].double(), t.theta[i, :K].double(), t.r[i, :K].double(), sc, dtype=torch.complex128)  # [K, N]
        G = scenes.H[i].to(torch.complex128).unsqueeze(0) * scenes.codes[i].to(torch.complex128).unsqueeze(1)  # [L, M, N]
        cols = G @ A.T  # [L, M, K]
        y = scenes.y[i].to(torch.complex128)
        if static:
            Phi = cols.reshape(-1, K)
            g = torch.linalg.lstsq(Phi, y.reshape(-1, 1)).solution
            fitted[i] = (Phi @ g).view_as(y)
        else:
            s = torch.linalg.lstsq(cols, y.unsqueeze(-1)).solution  # [L, K, 1]
            fitted[i] = (cols @ s).squeeze(-1)
    resid = (scenes.y.to(torch.complex128) - fitted).abs().square().mean(dim=(1, 2))
    return fitted, resid


def test_reference_files_load_and_validate():
    for path, n, signal in ((REF_DEFAULT, 48, "stochastic"), (REF_K1, 16, "static")):
        info = io.validate_scenes_file(path)
        assert info.n_scenes == n and info.has_truth and info.has_snr and info.scenario.signal == signal
        s = io.load_scenes(path)
        assert s.y.shape == (n, 16, 16) and s.H.shape == (n, 16, 144) and s.codes.shape == (n, 16, 144)
        assert s.scenario == Scenario(signal=signal)
        # codes: unit modulus on the 8 levels 2 pi q / 8
        q = s.codes.angle() / (2 * math.pi / 8)
        assert torch.allclose(s.codes.abs(), torch.ones(()), atol=1e-6)
        assert (q - q.round()).abs().max() < 1e-4
        assert len(torch.unique(torch.remainder(q.round(), 8))) == 8
        # channel normalised: E |H_mn|^2 = kappa/(1+kappa) + 1/(1+kappa) = 1
        assert abs(s.H.abs().square().mean().item() - 1) < 0.05


def test_reference_k1_static_explained_by_truth():
    s = io.load_scenes(REF_K1)
    assert (s.truth.K == 1).all() and torch.allclose(s.snr_db, torch.tensor(30.0))
    fitted, resid = _ls_fit(s, static=True)
    L, M = 16, 16
    ratio = resid / s.truth.noise_var.double() / ((L * M - 1) / (L * M))
    assert (ratio > 0.6).all() and (ratio < 1.4).all(), ratio  # chi^2 with 510 dof: sd ~ 6%
    assert abs(ratio.mean().item() - 1) < 0.08
    # SNR definition of docs/model.md: sigma^2 = P / 10^(SNR/10), P = mean |clean|^2 (fit error ~ 1e-3 at 30 dB)
    P = fitted.abs().square().mean(dim=(1, 2))
    assert torch.allclose(P / 10 ** (s.snr_db.double() / 10), s.truth.noise_var.double(), rtol=0.01)


def test_reference_default_consistent_with_truth():
    s = io.load_scenes(REF_DEFAULT)
    fitted, resid = _ls_fit(s, static=False)
    K, M = s.truth.K.double(), 16
    sigma2 = s.truth.noise_var.double()
    ratio = resid / sigma2 / ((M - K) / M)  # residual of a K-column projection per snapshot
    assert (ratio > 0.6).all() and (ratio < 1.45).all(), ratio
    assert abs(ratio.mean().item() - 1) < 0.05
    # the fit holds the clean signal plus K/M of the noise: P = |fit|^2 - sigma^2 K / M
    P = fitted.abs().square().mean(dim=(1, 2)) - sigma2 * K / M
    ratio_snr = P / (sigma2 * 10 ** (s.snr_db.double() / 10))
    assert abs(ratio_snr.mean().item() - 1) < 0.05, ratio_snr


def test_risloc_matches_reference_statistics():
    ref = io.load_scenes(REF_DEFAULT)
    ours = simulate(SC, 1024, seed=5)
    for s in (ref, ours):
        assert abs(s.H.abs().square().mean().item() - 1) < 0.05
        assert abs(s.truth.power.nanmean().item() - 0.6) < 0.1  # E[10^(u/10)], u ~ U[-6, 0]: 0.624
    # same SNR definition: E|y|^2 = P (1 + 10^(-SNR/10)) per scene
    for s in (ref, ours):
        P = s.truth.noise_var * 10 ** (s.snr_db / 10)
        ratio = s.y.abs().square().mean(dim=(1, 2)) / (P + s.truth.noise_var)
        assert abs(ratio.mean().item() - 1) < 0.1


# --- torch datasets -----------------------------------------------------------------------------------------
def test_scene_file_dataset(tmp_path, scenes):
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    path = tmp_path / "s.h5"
    io.save_scenes(scenes, path)
    ds = SceneFileDataset(path)
    assert len(ds) == 40 and ds.scenario == SC
    assert_same_scenes(scenes[3:4], ds[3])
    assert_same_scenes(scenes[-1:], ds[-1])
    assert_same_scenes(scenes[10:20], ds[10:20])
    idx = [17, 2, 17, 39]
    assert_same_scenes(scenes[torch.tensor(idx)], ds[idx])  # bounding-slice read, order and repeats kept
    assert_same_scenes(scenes[torch.tensor([0, 39])], ds[[0, 39]])  # sparse: fancy read
    with pytest.raises(IndexError):
        ds[40]
    loader = DataLoader(ds, batch_size=None, sampler=BatchSampler(SequentialSampler(ds), 16, False))
    assert_same_scenes(scenes, Scenes.cat(list(loader)))


def test_simulated_stream_is_seeded_and_resumable():
    stream = SimulatedScenes(SC, 8, seed=4, start=1020, stop=1040)
    batches = list(stream)
    assert [len(b) for b in batches] == [8, 8, 4] and stream.position == 1040
    assert_same_scenes(simulate(SC, 20, seed=4, start=1020), Scenes.cat(batches))
    resumed = next(iter(SimulatedScenes(SC, 8, seed=4, start=1028)))  # resume after two batches
    assert_same_scenes(batches[1], resumed)
    endless = iter(SimulatedScenes(SC, 2, seed=1))
    assert len([next(endless) for _ in range(3)]) == 3
