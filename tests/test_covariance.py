"""The effective-covariance builder: structure, normalisation, blend, shrinkage, eigenpairs."""

import math

import pytest
import torch

import risloc
from risloc import covariance as cv


@pytest.fixture(scope="module")
def scenes():
    return risloc.simulate(risloc.Scenario(), 16, seed=11, with_covariance=True)


def test_low_rank_eigh_matches_dense(scenes):
    R = cv.effective_covariance(None, snr_db=scenes.snr_db, y=scenes.y, H=scenes.H, codes=scenes.codes)
    values, vectors = R.eigh()
    dense = R.dense().to(torch.complex128)
    reference = torch.linalg.eigvalsh(dense).flip(-1)
    r = values.shape[-1]
    assert torch.allclose(values.double(), reference[:, :r], atol=1e-4, rtol=1e-4)
    assert torch.allclose(reference[:, r:], R.diag.double().unsqueeze(-1).expand(-1, 144 - r), atol=1e-4)
    # eigenvectors are orthonormal and satisfy R v = lambda v
    gram = vectors.mH @ vectors
    assert torch.allclose(gram, torch.eye(r, dtype=gram.dtype).expand_as(gram), atol=1e-4)
    Rv = R.dense() @ vectors
    assert torch.allclose(Rv, vectors * values.unsqueeze(-2).to(vectors.dtype), atol=1e-3)


def test_trace_normalised_and_hermitian(scenes):
    F = risloc.source_factor(scenes.truth, scenes.scenario)
    opts = cv.CovarianceOptions(beta=0.3, loading=0.01, shrinkage=1.0)
    R = cv.effective_covariance(F, snr_db=scenes.snr_db, options=opts, y=scenes.y, H=scenes.H, codes=scenes.codes)
    D = R.dense()
    assert torch.allclose(D, D.mH)
    # trace N before loading -> N (1 + loading) after loading; shrinkage keeps the trace
    assert torch.allclose(R.trace(), torch.full((len(scenes),), 144 * 1.01), rtol=1e-5)


def test_matches_true_covariance_without_loading_or_shrinkage(scenes):
    F = risloc.source_factor(scenes.truth, scenes.scenario)
    R = cv.effective_covariance(F, options=cv.CovarianceOptions(loading=0.0, shrinkage=0.0))
    T = scenes.truth.covariance
    T = 144 * T / torch.diagonal(T, dim1=-2, dim2=-1).real.sum(-1).view(-1, 1, 1)
    assert torch.allclose(R.dense(), T, atol=1e-5)


def test_blend_is_convex_combination(scenes):
    F = risloc.source_factor(scenes.truth, scenes.scenario)
    S = cv.sample_covariance(scenes.y, scenes.H, scenes.codes)
    beta = 0.25
    R = cv.effective_covariance(F, sample=S, options=cv.CovarianceOptions(beta=beta, loading=0, shrinkage=0))
    P = cv.normalise_trace(cv.as_low_rank(F)).dense()
    Q = cv.normalise_trace(S).dense()
    assert torch.allclose(R.dense(), (1 - beta) * P + beta * Q, atol=1e-4)


def test_shrinkage_weight_follows_snr():
    snr = torch.tensor([-10.0, 0.0, 20.0])
    alpha = cv.shrinkage_weight(snr)
    assert torch.allclose(alpha, 1 / (1 + 10 ** (snr / 10)))
    assert alpha[0] > alpha[1] > alpha[2]


def test_zero_prediction_stays_zero_before_loading():
    F = torch.zeros(2, 144, 5, dtype=torch.complex64)
    R = cv.effective_covariance(F, options=cv.CovarianceOptions(loading=0, shrinkage=0))
    assert torch.count_nonzero(R.dense()) == 0
    values, vectors = R.eigh()
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()


def test_sample_covariance_scale_invariant(scenes):
    a = cv.scene_covariance(scenes)
    b = cv.scene_covariance(risloc.Scenes(scenes.y * (3e4 * complex(math.cos(1), math.sin(1))), scenes.H, scenes.codes, scenes.scenario, scenes.snr_db))
    assert torch.allclose(a.dense(), b.dense(), atol=1e-3)


def test_gradients_flow_through_builder(scenes):
    F = risloc.source_factor(scenes.truth, scenes.scenario)[:4].clone().requires_grad_(True)
    R = cv.effective_covariance(F, snr_db=scenes.snr_db[:4], options=cv.CovarianceOptions(beta=0.2), y=scenes.y[:4], H=scenes.H[:4], codes=scenes.codes[:4])
    R.dense().abs().square().sum().backward()
    assert torch.isfinite(F.grad).all() and F.grad.abs().sum() > 0


def test_builder_requires_inputs_for_sample():
    with pytest.raises(ValueError, match="sample covariance"):
        cv.effective_covariance(None)
    with pytest.raises(ValueError, match="beta"):
        cv.CovarianceOptions(beta=1.5)
