"""The top-level API of the design sketch works end to end."""

import pytest
import torch

import risloc


def test_public_api_round_trip(tmp_path):
    sc = risloc.Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20)
    scenes = risloc.simulate(sc, 4, seed=3)
    path = tmp_path / "scenes.h5"
    risloc.save(scenes, path)
    back = risloc.load(path)
    assert torch.equal(back.y, scenes.y) and torch.equal(back.truth.K, scenes.truth.K)
    est = risloc.locate(back, method="music", K=torch.ones(4, dtype=torch.int64))
    result = risloc.evaluate(back, est)
    o = result.overall
    assert o.n_scenes == 4 and o.K_acc == 1.0  # K given
    # one source per scene: the score is the fraction of hits (2 deg, 2 deg, 10 % of r), by hand
    t = scenes.truth
    dphi = (est.phi[:, 0] - t.phi[:, 0]).abs().rad2deg()
    dtheta = (est.theta[:, 0] - t.theta[:, 0]).abs().rad2deg()
    hit = (dphi <= 2) & (dtheta <= 2) & ((est.r[:, 0] - t.r[:, 0]).abs() <= 0.1 * t.r[:, 0])
    assert o.success == hit.double().mean().item()
    assert (dphi <= 2).all()  # MUSIC's directions at 20 dB are reliable (range is the hard part)
    assert o.rmse_phi_deg == pytest.approx(dphi.double().square().mean().sqrt().item(), rel=1e-4)
    assert "success" in str(result).lower()
