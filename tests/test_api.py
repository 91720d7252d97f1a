"""The top-level API of the design sketch works end to end."""

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
    assert result.overall.n_scenes == 4
    assert 0.0 <= result.overall.success <= 1.0
    assert "success" in str(result).lower()
