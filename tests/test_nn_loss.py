"""The learned pipeline's loss: exact self-test, low-rank norms, finite gradients on degenerate inputs."""

import pytest
import torch

import risloc
from risloc import covariance as cv
from risloc.nn import loss as L
from risloc.nn.config import LossConfig
from risloc.nn.model import Prediction, effective, prepare_inputs


@pytest.fixture(scope="module")
def batch():
    sc = risloc.Scenario()
    s = risloc.simulate(sc, 12, seed=5)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-2)
    return sc, s, inputs, risloc.source_factor(s.truth, sc)


@pytest.mark.parametrize("opts", [
    cv.CovarianceOptions(beta=0.0),
    cv.CovarianceOptions(beta=0.3),
    cv.CovarianceOptions(beta=0.25, loading=0.05, shrinkage=2.0),
    cv.CovarianceOptions(beta=0.0, loading=0.0, shrinkage=0.0),
])
def test_selftest_exact(batch, opts):
    _, _, inputs, F = batch
    values = L.selftest(inputs, F, opts)
    assert values[2] < 1e-6  # the low-rank Frobenius norm against a dense computation
    assert "[SELFTEST] nmse(R,R)=0 nmse(0,R)=1" in L.format_selftest(values)
    R = effective(F, inputs, opts)
    Z = effective(torch.zeros_like(F), inputs, opts)
    # the NMSE sees the covariance, not its factor: F U (U unitary) has the same R F F^H R and scores 0
    g = torch.Generator().manual_seed(1)
    k = F.shape[-1]
    U, _ = torch.linalg.qr(torch.complex(torch.randn(k, k, generator=g), torch.randn(k, k, generator=g)).to(F.dtype))
    assert L.covariance_nmse(effective(F @ U, inputs, opts), R, Z).max() < 1e-5
    # ... and another scene's covariance scores well above 0 (near 1 or more: a wrong answer),
    # except where the shrinkage weight is 1 (all noise: every prediction is the same, NMSE 0)
    wrong = L.covariance_nmse(effective(F.roll(1, 0), inputs, opts), R, Z)
    seen = cv.shrinkage_weight(inputs.snr_db.double(), opts.shrinkage) < 1
    assert seen.sum() >= 10 and (wrong[seen] > 0.5).all() and (wrong[~seen] < 1e-9).all()


def test_nmse_closed_form(batch):
    """NMSE = (1-a)^2 |Rh_n - R_n|^2 / |(1-a) R_n + a I|^2, independent of beta and loading."""
    _, s, inputs, F = batch
    Fh = F + 0.3 * torch.randn(F.shape, dtype=F.dtype, generator=torch.Generator().manual_seed(0))
    alpha = cv.shrinkage_weight(inputs.snr_db.double())
    Rn = cv.normalise_trace(cv.as_low_rank(F)).dense().to(torch.complex128)
    Rhn = cv.normalise_trace(cv.as_low_rank(Fh)).dense().to(torch.complex128)
    eye = torch.eye(144, dtype=torch.complex128)
    a = alpha.view(-1, 1, 1)
    want = ((1 - a) ** 2 * (Rhn - Rn).abs().square()).sum((-2, -1)) / ((1 - a) * Rn + a * eye).abs().square().sum((-2, -1))
    for beta, loading in ((0.0, 1e-3), (0.4, 0.02)):
        opts = cv.CovarianceOptions(beta=beta, loading=loading)
        got = L.covariance_nmse(effective(Fh, inputs, opts), effective(F, inputs, opts), effective(torch.zeros_like(F), inputs, opts))
        assert torch.allclose(got, want, rtol=1e-4)


def test_frobenius_matches_dense(batch):
    _, _, inputs, F = batch
    A = effective(F, inputs, cv.CovarianceOptions(beta=0.3))
    B = effective(F.flip(-1) * 0.7, inputs, cv.CovarianceOptions(beta=0.1, loading=0.1))
    dense = (A.dense().to(torch.complex128) - B.dense().to(torch.complex128)).abs().square().sum((-2, -1))
    assert torch.allclose(L.frobenius_sq_diff(A, B), dense, rtol=1e-6)


def _all_terms_config():
    return LossConfig(raw_weight=0.1, k_weight=0.1, gap_weight=0.1, sub_weight=0.1, peak_weight=0.1, orth_weight=0.1,
                      raw_start=0, k_start=0, gap_start=0, sub_start=0, peak_start=0, orth_start=0, beta_start=0)


@pytest.mark.parametrize("case", ["zero_prediction", "rank_deficient_truth", "identical_sources"])
def test_finite_gradients_on_degenerate_inputs(batch, case):
    sc, s, inputs, F = batch
    truth = s.truth
    true_factor = F
    pred_factor = F + 0.1
    if case == "zero_prediction":
        pred_factor = torch.zeros_like(F)
    elif case == "rank_deficient_truth":
        true_factor = F.clone()
        true_factor[..., 1:] = 0
    elif case == "identical_sources":
        truth = truth.to("cpu", copy=True)
        for t in (truth.phi, truth.theta, truth.r, truth.power):
            t[:, 1] = t[:, 0]
        truth.K.clamp_(min=2)
        true_factor = risloc.source_factor(truth, sc)
        pred_factor = true_factor.clone()  # a perfect, rank-deficient prediction
    objective = L.Objective(_all_terms_config(), sc)
    opts = cv.CovarianceOptions(beta=0.25)
    Fp = pred_factor.clone().requires_grad_(True)
    logits = torch.zeros(len(s), sc.k_max, requires_grad=True)
    pred = Prediction(Fp, effective(Fp, inputs, opts), logits)
    total, parts = objective(pred, inputs, opts, truth, true_factor, epoch=1.0)
    assert set(parts) == set(L.TERMS)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(Fp.grad).all()
    assert torch.isfinite(logits.grad).all()
    if case == "zero_prediction":
        assert float(parts["cov"]) == 1.0


def test_ramps_and_switches():
    cfg = LossConfig(k_weight=0.2, k_start=2.0, k_ramp=2.0, gap_weight=0.0)
    obj = L.Objective(cfg, risloc.Scenario())
    assert obj.weights(1.0)["k"] == 0.0
    assert obj.weights(3.0)["k"] == pytest.approx(0.1)
    assert obj.weights(10.0)["k"] == pytest.approx(0.2)
    assert obj.weights(10.0)["gap"] == 0.0
    assert obj.beta(0.0) == 0.0 and obj.beta(100.0) == cfg.beta
