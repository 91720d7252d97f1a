"""Model-order rules on synthetic eigenvalue profiles and on true-covariance scenes."""

import pytest
import torch

import risloc
from risloc import covariance as cv
from risloc.estimators.music import order_from_covariance
from risloc.estimators.order import estimate_order, information_criterion


def profile(K, p=16, floor=1.0, signal=(50.0, 30.0, 20.0, 10.0, 6.0)):
    lam = torch.full((p,), floor, dtype=torch.float64)
    lam[:K] += torch.tensor(signal[:K], dtype=torch.float64)
    return lam


@pytest.mark.parametrize("rule", ["mdl", "aic", "eigengap"])
def test_flat_floor_profiles(rule):
    lam = torch.stack([profile(K) for K in range(0, 6)])
    K = estimate_order(lam, 144, rule=rule, k_max=5)
    assert K.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("rule", ["mdl", "aic"])
def test_noisy_floor_and_scale_invariance(rule):
    g = torch.Generator().manual_seed(0)
    lam = torch.stack([profile(K) for K in range(1, 6)])
    lam = lam * (1 + 0.01 * torch.rand(lam.shape, generator=g, dtype=torch.float64))
    lam = lam.sort(-1, descending=True).values
    K1 = estimate_order(lam, 144, rule=rule, k_max=5)
    K2 = estimate_order(lam * 1e7, 144, rule=rule, k_max=5)
    assert K1.tolist() == [1, 2, 3, 4, 5] and torch.equal(K1, K2)


def test_mdl_needs_snapshots_and_k_limits():
    lam = profile(3).unsqueeze(0)
    with pytest.raises(ValueError, match="n_snapshots"):
        estimate_order(lam, rule="mdl")
    with pytest.raises(ValueError, match="rule"):
        estimate_order(lam, 10, rule="bic")
    assert estimate_order(lam, 144, k_max=2).item() == 2
    assert estimate_order(profile(0).unsqueeze(0), 144, k_min=1).item() == 1
    assert estimate_order(profile(0).unsqueeze(0), rule="eigengap", k_min=0).item() == 0
    crit = information_criterion(lam, 144)
    assert crit.shape == (1, 16) and crit.argmin().item() == 3


def test_zero_and_rank_deficient_profiles():
    """A rank-deficient profile (an exactly zero or a 1e-9 floor) has as many sources as
    eigenvalues above the floor; an all-zero or flat profile has none; the rules stay finite."""
    lam = torch.tensor([[5.0, 2.0] + [0.0] * 8, [0.0] * 10, [5.0, 2.0, 1.0] + [1e-9] * 7, [3.0] * 10], dtype=torch.float64)
    for rule in ("mdl", "aic", "eigengap"):
        K = estimate_order(lam, 100, rule=rule, k_max=5)
        assert K.tolist() == [2, 0, 3, 0], rule
        assert estimate_order(lam, 100, rule=rule, k_max=1).tolist() == [1, 0, 1, 0], rule  # clipped to k_max


@pytest.mark.parametrize("rule", ["mdl", "aic", "eigengap"])
def test_true_covariance_scenes_with_noise_floor(rule):
    sc = risloc.Scenario()
    scenes = risloc.simulate(sc, 64, seed=8)
    F = risloc.source_factor(scenes.truth, sc)
    R = cv.effective_covariance(F, options=cv.CovarianceOptions(loading=1e-2, shrinkage=0.0))
    K = order_from_covariance(R, sc, rule=rule, gap_threshold=1.5)
    assert torch.equal(K, scenes.truth.K)


# ----------------------------------------------------------------------------------------------
# rules on the measurement likelihood of the ML covariance fits, and SORTE
# ----------------------------------------------------------------------------------------------
from risloc.estimators.order import factor_dof, identifiable_rank, likelihood_order, sorte  # noqa: E402


def test_identifiable_rank_counts():
    assert identifiable_rank(16, 16, 144) == 1
    assert identifiable_rank(16, 16, 86) == 2
    assert identifiable_rank(16, 16, 69) == 3
    assert identifiable_rank(16, 16, 70) == 3
    assert factor_dof(2, 87) == 2 * 87 * 2 - 4 + 1


def test_likelihood_rules_on_synthetic_nll():
    # gains of 300 and 60 nats: MDL (1/2 nu log 16 ~ 240 per rank-1 step at d = 87) keeps 1 source
    nll = torch.tensor([[0.0, -300.0, -360.0]], dtype=torch.float64)
    assert likelihood_order(nll, d=87, n_snapshots=16, rule="mdl").item() == 1
    assert likelihood_order(nll, d=87, n_snapshots=16, rule="penalised", penalty=30.0).item() == 2
    assert likelihood_order(nll, d=87, n_snapshots=16, rule="penalised", penalty=100.0, k_min=0).item() == 1
    with pytest.raises(ValueError, match="rule"):
        likelihood_order(nll, d=87, n_snapshots=16, rule="bic")


@pytest.mark.parametrize("rule", ["mdl", "aic"])
def test_likelihood_rules_on_easy_scenes(rule):
    # 20 dB, K = 1 and K = 2 known: the ML fits' likelihood gives the right K on (nearly) every scene
    sc1 = risloc.Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20)
    sc2 = risloc.Scenario(k_fixed=2, snr_db_min=20, snr_db_max=20)
    s1, s2 = risloc.simulate(sc1, 12, seed=21), risloc.simulate(sc2, 12, seed=22)
    for s, K in ((s1, 1), (s2, 2)):
        fit = cv.ml_covariance(s.y, s.H, s.codes, s.scenario, options=cv.CovarianceOptions(rank_rule=rule))
        Kh = (fit.factor.abs().sum(1) > 0).sum(-1)
        assert (Kh == K).float().mean() >= 11 / 12, (rule, K, Kh.tolist())


def test_sorte_profiles():
    g = torch.Generator().manual_seed(0)
    rows = []
    for K in range(1, 6):  # signal eigenvalues on a noise floor spread by 20 %
        lam = (1 + 0.2 * torch.rand(16, generator=g, dtype=torch.float64)).sort(descending=True).values
        lam[:K] += torch.tensor([50.0, 30.0, 20.0, 10.0, 6.0], dtype=torch.float64)[:K]
        rows.append(lam)
    lam = torch.stack(rows)
    assert sorte(lam, k_max=5).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="4 eigenvalues"):
        sorte(lam[:, :3])
