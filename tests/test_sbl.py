"""Sparse Bayesian learning (``sbl``): exact single sources at high SNR, K on easy scenes."""

import math

import pytest
import torch

import risloc
from risloc import metrics
from risloc.estimators import available, get, sbl


def test_single_source_high_snr_is_exact():
    sc = risloc.Scenario(k_fixed=1, snr_db_min=30, snr_db_max=30)
    s = risloc.simulate(sc, 6, seed=31)
    est = get("sbl")(s)
    assert est.K.tolist() == [1] * 6
    m = metrics.score(s.truth, est, snr_db=s.snr_db).overall
    assert m.success == 1.0
    # the refinement reaches the likelihood optimum: angle errors far below a grid step (~4 deg)
    assert (est.phi[:, 0] - s.truth.phi[:, 0]).abs().max() < math.radians(0.5)
    assert (est.theta[:, 0] - s.truth.theta[:, 0]).abs().max() < math.radians(0.5)


def test_gamma_peaks_on_the_sources_and_counts_easy_scenes():
    sc = risloc.Scenario(k_fixed=2, snr_db_min=25, snr_db_max=25)
    s = risloc.simulate(sc, 6, seed=32)
    est = get("sbl")(s, refine=False)
    assert (est.K == 2).float().mean() >= 5 / 6
    est_k = get("sbl")(s, K=torch.tensor([2, 2, 2, 1, 1, 2]))
    assert est_k.K.tolist() == [2, 2, 2, 1, 1, 2]
    assert torch.isnan(est_k.phi[3:5, 1]).all() and torch.isfinite(est_k.phi[:, 0]).all()


def test_options_validated():
    s = risloc.simulate(risloc.Scenario(), 1, seed=33)
    with pytest.raises(ValueError, match="unknown option"):
        get("sbl")(s, bogus=1)
    with pytest.raises(ValueError, match="grid_shape"):
        get("sbl")(s, grid_shape=(1, 2))
    assert len(get("sbl")(s[:0])) == 0
    assert "sbl" in available()
    assert sbl.DEFAULTS["grid_shape"] == (25, 13, 14)
