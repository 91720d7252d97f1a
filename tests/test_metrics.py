"""Tests of risloc.metrics (hand-made scenes) and the `risloc evaluate` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import erf

from risloc import metrics
from risloc.metrics import k_confusion, match, score, success_mask, wrap_angle
from risloc.scenes import Estimates, Truth

DEG = math.pi / 180
NAN = float("nan")


def _pad(rows, k_max, scale=1.0):
    out = torch.full((len(rows), k_max), NAN, dtype=torch.float32)
    for s, row in enumerate(rows):
        for k, v in enumerate(row):
            out[s, k] = v * scale
    return out


def make_truth(scenes, k_max=5):
    """``scenes``: list of lists of (phi_deg, theta_deg, r_m)."""
    K = torch.tensor([len(s) for s in scenes], dtype=torch.int64)
    phi = _pad([[p for p, _, _ in s] for s in scenes], k_max, DEG)
    theta = _pad([[t for _, t, _ in s] for s in scenes], k_max, DEG)
    r = _pad([[q for _, _, q in s] for s in scenes], k_max)
    power = torch.where(torch.isnan(r), r, torch.ones_like(r))
    return Truth(K, phi, theta, r, power, torch.ones(len(scenes)))


def make_est(scenes, k_max=5, K=None):
    K = torch.tensor([len(s) for s in scenes] if K is None else K, dtype=torch.int64)
    phi = _pad([[p for p, _, _ in s] for s in scenes], k_max, DEG)
    theta = _pad([[t for _, t, _ in s] for s in scenes], k_max, DEG)
    r = _pad([[q for _, _, q in s] for s in scenes], k_max)
    return Estimates(K, phi, theta, r, "test")


T3 = [(-30.0, 10.0, 2.0), (0.0, 0.0, 5.0), (40.0, -20.0, 8.0)]


def test_wrap_angle():
    x = np.array([math.pi, -math.pi, 3 * math.pi, 0.1, -0.1, 2 * math.pi + 0.1])
    w = wrap_angle(x)
    assert np.allclose(w, [math.pi, math.pi, math.pi, 0.1, -0.1, 0.1])
    assert torch.allclose(wrap_angle(torch.tensor(x)), torch.tensor(w))
    assert wrap_angle(-math.pi) == pytest.approx(math.pi)


def test_perfect_estimates():
    t = make_truth([T3, T3[:1], T3[:2]])
    s = score(t, make_est([T3, T3[:1], T3[:2]]), snr_db=torch.tensor([0.0, 7.0, 12.0]))
    o = s.overall
    assert o.success == 1 and o.K_acc == 1 and o.K_under == 0 and o.K_over == 0
    assert o.precision == 1 and o.recall == 1 and o.f1 == 1
    assert o.rmse_phi_deg == 0 and o.rmse_theta_deg == 0 and o.rmse_r_m == 0 and o.rmse_rel_r == 0
    assert o.n_pairs == 6 and o.n_hits == 6
    assert list(s.by_snr) == [(0.0, 5.0), (5.0, 10.0), (10.0, 15.0)]
    assert {k: m.n_scenes for k, m in s.by_k.items()} == {1: 1, 2: 1, 3: 1}
    assert success_mask(t, make_est([T3, T3[:1], T3[:2]])).tolist() == [True, True, True]


def test_wrap_around_is_a_hit():
    t = make_truth([[(179.5, 0.0, 3.0)]])
    e = make_est([[(-179.5, 0.0, 3.0)]])
    m = match(t, e)
    assert m.dphi[0] == pytest.approx(1 * DEG, abs=1e-6)
    assert m.hit.tolist() == [True]
    s = score(t, e)
    assert s.overall.success == 1
    assert s.overall.rmse_phi_deg == pytest.approx(1.0, abs=1e-4)


def test_errors_rmse_and_hits_by_hand():
    # one scene, two sources: source 0 off by (1 deg, -1 deg, +0.1 m at r = 2): hit;
    # source 1 off by 3 deg in phi: not a hit.
    t = make_truth([[(0.0, 0.0, 2.0), (30.0, 10.0, 6.0)]])
    e = make_est([[(33.0, 10.0, 6.0), (1.0, -1.0, 2.1)]])  # estimates listed in swapped order
    m = match(t, e)
    assert m.truth_index.tolist() == [0, 1] and m.est_index.tolist() == [1, 0]
    assert m.hit.tolist() == [True, False]
    o = score(t, e).overall
    assert o.success == 0 and o.K_acc == 1 and o.n_hits == 1
    assert o.precision == 0.5 and o.recall == 0.5 and o.f1 == 0.5
    assert o.rmse_phi_deg == pytest.approx(math.sqrt((1 + 9) / 2), rel=1e-5)
    assert o.rmse_theta_deg == pytest.approx(math.sqrt(1 / 2), rel=1e-5)
    assert o.rmse_r_m == pytest.approx(math.sqrt(0.01 / 2), rel=1e-4)
    assert o.rmse_rel_r == pytest.approx(math.sqrt((0.1 / 2) ** 2 / 2), rel=1e-4)


def test_range_tolerance_uses_true_range():
    t = make_truth([[(0.0, 0.0, 1.0)], [(0.0, 0.0, 1.0)]])
    e = make_est([[(0.0, 0.0, 1.09)], [(0.0, 0.0, 1.11)]])
    assert match(t, e).hit.tolist() == [True, False]


def test_misses_extras_and_empty_estimates():
    t = make_truth([T3, T3, T3[:2], T3[:1]])
    e = make_est([T3[:2], T3 + [(-50.0, 25.0, 9.0), (50.0, 25.0, 1.0)], [], T3[:1]])
    m = match(t, e)
    assert m.K_hat.tolist() == [2, 5, 0, 1]
    assert np.bincount(m.scene, minlength=4).tolist() == [2, 3, 0, 1]
    assert m.hit.all()
    s = score(t, e)
    o = s.overall
    assert o.K_acc == 0.25 and o.K_under == 0.5 and o.K_over == 0.25
    assert o.success == 0.25
    assert o.n_true == 9 and o.n_est == 8 and o.n_hits == 6
    assert o.precision == pytest.approx(6 / 8) and o.recall == pytest.approx(6 / 9)
    assert o.f1 == pytest.approx(2 * 6 / 17)
    assert o.n_pairs == 1  # only the scene with K-hat = K contributes to the RMSEs
    assert k_confusion(t, e, 5)[3].tolist() == [0, 0, 1, 0, 0, 1]
    assert k_confusion(t, e).shape == (6, 6)
    assert k_confusion(t, e, 3)[3, 3] == 1  # K-hat = 5 clipped into the last column


def test_all_empty_estimates_give_nan_precision_and_rmse():
    t = make_truth([T3, T3[:1]])
    e = Estimates.empty(2, 5)
    o = score(t, e).overall
    assert math.isnan(o.precision)  # 0 / 0
    assert o.recall == 0 and o.f1 == 0 and o.success == 0 and o.K_under == 1
    assert o.n_pairs == 0 and math.isnan(o.rmse_phi_deg) and math.isnan(o.rmse_r_m)
    s = score(t, e)
    assert "NaN" in s.format_table()
    d = json.loads(s.to_json())
    assert d["overall"]["precision"] is None and d["overall"]["n_pairs"] == 0


def test_hungarian_beats_greedy():
    # truth at phi = 0 and 2 deg; estimates at 1.9 and 3 deg (costs (dphi / 2 deg)^2).
    # Greedy (cheapest pair first) takes (t1, e0) = 0.0025, then (t0, e1) = 2.25: total 2.2525 and
    # t0 is missed (3 deg). Hungarian takes (t0, e0) = 0.9025 + (t1, e1) = 0.25: both hits.
    t = make_truth([[(0.0, 0.0, 5.0), (2.0, 0.0, 5.0)]])
    e = make_est([[(1.9, 0.0, 5.0), (3.0, 0.0, 5.0)]])
    _, _, _, cost = metrics._deltas(metrics._validated_truth(t), metrics._positions(e, "est"))
    c = cost[0, :2, :2]
    assert np.argmin(c) == 2  # the cheapest pair is (t1, e0)
    assert c[0, 0] + c[1, 1] < c[1, 0] + c[0, 1]
    m = match(t, e)
    assert m.truth_index.tolist() == [0, 1] and m.est_index.tolist() == [0, 1]
    assert m.hit.tolist() == [True, True]
    assert score(t, e).overall.success == 1


def test_vectorised_matching_equals_scipy():
    rng = np.random.default_rng(0)
    S, k_max = 400, 5
    K = rng.integers(0, k_max + 1, S)
    Kh = rng.integers(0, k_max + 1, S)

    def rand(Kv, phi_w):
        a = np.arange(k_max)[None] < Kv[:, None]
        vals = [rng.uniform(-phi_w, phi_w, (S, k_max)), rng.uniform(-0.5, 0.5, (S, k_max)), rng.uniform(0.5, 10, (S, k_max))]
        return [torch.tensor(np.where(a, v, np.nan), dtype=torch.float32) for v in vals]

    # clustered sources (small angular spread) so that assignments are non-trivial
    pt, tt, rt = rand(K, 0.05)
    pe, te, re_ = rand(Kh, 0.05)
    t = Truth(torch.tensor(K), pt, tt, rt, rt.clone(), torch.ones(S))
    e = Estimates(torch.tensor(Kh), pe, te, re_)
    m = match(t, e)
    _, _, _, cost = metrics._deltas(metrics._validated_truth(t), metrics._positions(e, "est"))
    mine = np.zeros(S)
    np.add.at(mine, m.scene, cost[m.scene, m.truth_index, m.est_index])
    assert np.bincount(m.scene, minlength=S).tolist() == np.minimum(K, Kh).tolist()
    for s in range(S):
        c = cost[s, : K[s], : Kh[s]]
        ref = c[linear_sum_assignment(c)].sum() if c.size else 0.0
        assert mine[s] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # the scipy fallback path gives the same optimal costs
    old = metrics.MAX_ENUMERATED
    try:
        metrics.MAX_ENUMERATED = 0
        m2 = match(t, e)
    finally:
        metrics.MAX_ENUMERATED = old
    mine2 = np.zeros(S)
    np.add.at(mine2, m2.scene, cost[m2.scene, m2.truth_index, m2.est_index])
    assert np.allclose(mine, mine2, rtol=1e-12, atol=1e-12)


def test_nan_beyond_k_hat_ignored_and_nan_inside_never_crashes():
    t = make_truth([T3, T3, T3[:2]])
    e = make_est([T3 + [(5.0, 5.0, 5.0)], T3, T3], K=[3, 3, 2])
    # scene 0: a finite 4th entry beyond K-hat = 3 -> ignored; scene 2: T3[2] beyond K-hat = 2 -> ignored
    e.phi[1, 1] = NAN  # scene 1: NaN inside the first K-hat
    m = match(t, e)
    assert np.bincount(m.scene, minlength=3).tolist() == [3, 3, 2]
    assert m.hit[m.scene == 0].all() and m.hit[m.scene == 2].all()
    assert m.hit[m.scene == 1].tolist() == [True, False, True]  # the broken estimate is not a hit
    o = score(t, e).overall
    assert o.success == pytest.approx(2 / 3)
    assert o.n_pairs == 7 and o.n_pairs_nonfinite == 1  # the NaN pair is left out of the RMSEs
    assert o.rmse_phi_deg == 0


def test_broken_estimate_left_unmatched_when_possible():
    t = make_truth([T3[:2]])
    e = make_est([[(0.0, 0.0, 5.0), (-30.0, 10.0, 2.0), (1.0, 1.0, 1.0)]])
    e.r[0, 2] = float("inf")
    e.theta[0, 0] = NAN
    e.phi[0, 0] = NAN
    e.theta[0, 0] = 0.0
    # est 0 has NaN phi; est 1 matches truth 0; est 2 has inf r. One of the two broken ones
    # must be matched to truth 1, never displacing est 1 from truth 0.
    m = match(t, e)
    assert m.est_index[m.truth_index == 0].tolist() == [1]
    assert m.hit.tolist() == [True, False]


def test_bad_truth_and_shape_errors():
    t = make_truth([T3])
    t.phi[0, 1] = NAN
    with pytest.raises(ValueError, match="truth.phi of scene 0, source 1"):
        match(t, make_est([T3]))
    with pytest.raises(ValueError, match="scenes"):
        match(make_truth([T3, T3]), make_est([T3]))
    with pytest.raises(ValueError, match="est.K"):
        match(make_truth([T3]), make_est([T3], K=[-1]))
    with pytest.raises(ValueError, match="snr_db"):
        score(make_truth([T3]), make_est([T3]), snr_db=torch.zeros(2))


def test_snr_bins_subset_and_select():
    t = make_truth([T3[:1]] * 6)
    good, bad = T3[:1], [(20.0, 0.0, 2.0)]
    e = make_est([good, bad, good, good, bad, good])
    snr = torch.tensor([-5.0, -0.1, 0.0, 12.0, 19.9, 20.0])
    s = score(t, e, snr_db=snr)
    assert list(s.by_snr) == [(-5.0, 0.0), (0.0, 5.0), (10.0, 15.0), (15.0, 20.0), (20.0, 25.0)]
    assert [m.n_scenes for m in s.by_snr.values()] == [2, 1, 1, 1, 1]
    assert s.by_snr[(-5.0, 0.0)].success == 0.5
    sub = s.subset(10, 20)
    assert sub.overall.n_scenes == 3 and sub.overall.success == pytest.approx(2 / 3)
    assert s.subset(10, 20, include_hi=False).overall.n_scenes == 2
    assert s.subset(-5, 20).overall.n_scenes == 6
    assert s.select(torch.tensor([True, True, False, False, False, False])).overall.success == 0.5
    # bins of another width
    s2 = score(t, e, snr_db=snr, bins_db=10.0)
    assert list(s2.by_snr) == [(-10.0, 0.0), (0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    # without SNR: no bins, subset refused
    s3 = score(t, e)
    assert s3.by_snr == {} and "Per SNR" not in s3.format_table()
    with pytest.raises(ValueError, match="SNR"):
        s3.subset(0, 10)


def test_per_k_groups():
    t = make_truth([T3[:1], T3[:1], T3])
    e = make_est([T3[:1], [], T3])
    s = score(t, e)
    assert s.by_k[1].n_scenes == 2 and s.by_k[1].success == 0.5 and s.by_k[1].recall == 0.5
    assert s.by_k[3].success == 1 and s.by_k[3].n_pairs == 3


def test_crb_ratio_and_efficient_success_by_hand():
    t = make_truth([[(10.0, 5.0, 4.0)]])
    e = make_est([[(11.0, 5.5, 4.2)]])
    sp, st, sr = 0.5 * DEG, 1.5 * DEG, 0.3
    crb = {"crb_phi": torch.tensor([[sp]]), "crb_theta": torch.tensor([[st]]), "crb_r": torch.tensor([[sr]])}
    o = score(t, e, crb=crb).overall
    assert o.crb_ratio_phi == pytest.approx(1.0 / 0.5, rel=1e-4)
    assert o.crb_ratio_theta == pytest.approx(0.5 / 1.5, rel=1e-4)
    assert o.crb_ratio_r == pytest.approx(0.2 / 0.3, rel=1e-4)
    assert o.crb_ratio_rel_r == pytest.approx((0.2 / 4) / (0.3 / 4), rel=1e-4)
    hand = erf(2 / (math.sqrt(2) * 0.5)) * erf(2 / (math.sqrt(2) * 1.5)) * erf(0.4 / (math.sqrt(2) * 0.3))
    assert o.success_crb == pytest.approx(hand, rel=1e-5)
    assert 0.3 < hand < 0.9  # a non-trivial value


class _CRBLike:
    def __init__(self, phi, theta, r):
        self.phi, self.theta, self.r = phi, theta, r


def test_crb_efficient_success_limits():
    t = make_truth([T3, T3[:2]])
    e = make_est([T3, T3[:2]])
    shape = (2, 5)
    tiny = _CRBLike(torch.full(shape, 1e-9), torch.full(shape, 1e-9), torch.full(shape, 1e-9))
    huge = _CRBLike(torch.full(shape, 1e3), torch.full(shape, 1e3), torch.full(shape, 1e5))
    assert score(t, e, crb=tiny).overall.success_crb == pytest.approx(1.0)
    assert score(t, e, crb=huge).overall.success_crb < 1e-6
    zero_inf = _CRBLike(torch.zeros(shape), torch.zeros(shape), torch.full(shape, math.inf))
    assert score(t, e, crb=zero_inf).overall.success_crb == 0.0
    # NaN bound (e.g. r not computed): that scene is left out, ratios over finite bounds only
    nanr = _CRBLike(torch.full(shape, 1e-3), torch.full(shape, 1e-3), torch.full(shape, NAN))
    o = score(t, e, crb=nanr).overall
    assert math.isnan(o.success_crb) and o.n_crb_scenes == 0
    assert o.crb_ratio_phi == 0 and math.isnan(o.crb_ratio_r) and o.n_crb_pairs == 0
    s = score(t, e, crb=tiny, snr_db=torch.tensor([3.0, 8.0]))
    assert "success at CRB" in s.format_table()
    assert s.by_k[2].success_crb == pytest.approx(1.0)
    with pytest.raises(ValueError, match="crb"):
        score(t, e, crb={"phi": torch.zeros(shape)})


def test_outputs_and_scenes_input():
    from risloc.scenes import Scenes

    t = make_truth([T3, T3[:1]])
    e = make_est([T3, []])
    scenes = Scenes(torch.zeros(2, 1, 1, dtype=torch.complex64), torch.zeros(2, 1, 1, dtype=torch.complex64),
                    torch.zeros(2, 1, 1, dtype=torch.complex64), snr_db=torch.tensor([1.0, 11.0]), truth=t)
    s = metrics.evaluate(scenes, e)
    assert list(s.by_snr) == [(0.0, 5.0), (10.0, 15.0)]
    d = s.to_dict()
    assert d["overall"]["n_scenes"] == 2 and d["by_snr"][1]["snr_lo"] == 10.0 and d["by_k"][0]["K"] == 1
    j = json.loads(s.to_json())
    assert j["by_k"][0]["success"] == 0.0 and j["overall"]["rmse_phi_deg"] == 0.0
    table = str(s)
    assert table.count("### ") == 3 and "| all | 2 | 0.500 |" in table
    assert metrics.format_number(0.27) == "0.270" and metrics.format_number(1234.5) == "1230"
    assert metrics.format_number(math.nan) == "NaN" and metrics.format_number(7) == "7"


# ------------------------------------------------------------------------------------------
# `risloc evaluate`
# ------------------------------------------------------------------------------------------
def _write_files(tmp_path, n=4, n_est=None, truth=True):
    """A scene file, an estimates file (perfect except scene 1: K-hat = 0) and a CRB file,
    written with h5py straight from docs/scene-files.md."""
    import h5py

    import risloc

    sc = risloc.Scenario()
    scenes = risloc.simulate(sc, n, seed=3)
    t = scenes.truth
    attrs = {"version": 1, "scenario": sc.to_json()}
    sp = tmp_path / "scenes.h5"
    with h5py.File(sp, "w") as f:
        f.attrs["format"] = "risloc-scenes"
        for k, v in attrs.items():
            f.attrs[k] = v
        f["y"] = scenes.y.numpy()
        f["H"] = scenes.H.numpy()
        f["codes"] = scenes.codes.numpy()
        f["snr_db"] = scenes.snr_db.numpy().astype(np.float32)
        if truth:
            f["truth/K"] = t.K.numpy().astype(np.int32)
            for name in ("phi", "theta", "r", "power", "noise_var"):
                f[f"truth/{name}"] = getattr(t, name).numpy().astype(np.float32)
    n_est = n if n_est is None else n_est
    ep = tmp_path / "est.h5"
    K = t.K.numpy()[:n_est].astype(np.int32).copy()
    K[1] = 0
    with h5py.File(ep, "w") as f:
        f.attrs["format"] = "risloc-estimates"
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["method"] = "oracle"
        f["est/K"] = K
        for name in ("phi", "theta", "r"):
            a = getattr(t, name).numpy()[:n_est].astype(np.float32).copy()
            a[1] = np.nan
            f[f"est/{name}"] = a
    cp = tmp_path / "crb.h5"
    with h5py.File(cp, "w") as f:
        for name in ("phi", "theta", "r"):
            a = np.where(np.isnan(getattr(t, name).numpy()), np.nan, 1e-3).astype(np.float32)
            f[f"crb/{name}"] = a
    return sp, ep, cp, scenes


def test_read_crb_file(tmp_path):
    from risloc.cli.evaluate import read_crb

    _, _, cp, scenes = _write_files(tmp_path)
    crb = read_crb(str(cp), len(scenes))
    assert tuple(crb.phi.shape) == (4, 5)
    with pytest.raises(ValueError, match="scene file has 3"):
        read_crb(str(cp), 3)


def test_cli_evaluate(tmp_path, capsys):
    from risloc.cli import main

    sp, ep, cp, scenes = _write_files(tmp_path)
    jp = tmp_path / "score.json"
    assert main(["evaluate", str(sp), str(ep), "--crb", str(cp), "--json", str(jp)]) == 0
    out = capsys.readouterr().out
    assert "### Overall" in out and "### Per SNR bin" in out and "### Per true K" in out
    assert "success at CRB" in out
    d = json.loads(jp.read_text())
    assert d["overall"]["n_scenes"] == 4 and d["overall"]["success"] == 0.75
    assert d["overall"]["success_crb"] == pytest.approx(1.0) and d["method"] == "oracle"

    assert main(["evaluate", str(sp), str(ep), "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["overall"]["K_under"] == 0.25 and d["overall"]["success_crb"] is None


def test_cli_evaluate_refuses_mismatch_and_missing_truth(tmp_path, capsys):
    from risloc.cli import main

    (tmp_path / "a").mkdir()
    sp, ep, _, _ = _write_files(tmp_path / "a", n=4, n_est=3)
    assert main(["evaluate", str(sp), str(ep)]) == 2
    assert "scene counts differ" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    sp, ep, _, _ = _write_files(tmp_path / "b", truth=False)
    assert main(["evaluate", str(sp), str(ep)]) == 2
    assert "truth" in capsys.readouterr().err


def test_agreement_of_two_estimates():
    nan = float("nan")
    a = Estimates(torch.tensor([2, 1]), torch.tensor([[0.1, 0.2], [0.3, nan]]), torch.tensor([[0.5, 0.6], [0.7, nan]]),
                  torch.tensor([[3.0, 4.0], [5.0, nan]]))
    b = Estimates(torch.tensor([2, 2]), torch.tensor([[0.1, 0.25], [0.3, 0.9]]), torch.tensor([[0.5, 0.6], [0.4, 0.1]]),
                  torch.tensor([[3.0, 4.5], [5.0, 6.0]]))
    got = metrics.agreement(a, b)
    assert got["same_K_fraction"] == 0.5
    # the slot finite in only one of them (scene 1, slot 1) is not compared
    assert got["max_difference"] == pytest.approx({"phi": 0.05, "theta": 0.3, "r": 0.5})
    assert metrics.agreement(a, a) == {"same_K_fraction": 1.0, "max_difference": {"phi": 0.0, "theta": 0.0, "r": 0.0}}
    with pytest.raises(ValueError, match=r"\(2, 2\) against \(1, 2\)"):
        metrics.agreement(a, b[0:1])
