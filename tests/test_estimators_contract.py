"""The contract of every registered estimator (risloc.estimators.available(), so estimators
added later are checked too): K-hat within [0, k_max], positions finite for the first K-hat
sources and NaN after, outputs on the scenes' device, an empty batch gives 0 rows, and a
complex gain on y changes nothing that matters (same K-hat, positions within a tenth of
sqrt(CRB)). Small: a few default scenes, each estimator's default options."""

from __future__ import annotations

import cmath

import pytest
import torch

import risloc
from helpers import assert_same_positions
from risloc import estimators

SC = risloc.Scenario()
N_SCENES = 3
GAIN = 3e-3 * cmath.exp(-1.1j)


def _risloc_estimators() -> list[str]:
    """Registered names whose estimator is part of risloc (tests may register their own)."""
    return [n for n in estimators.available() if estimators.get(n).__module__.startswith("risloc.")]


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def scenes():
    return risloc.simulate(SC.replace(snr_db_min=10.0, snr_db_max=20.0), N_SCENES, seed=11)


def test_the_builtin_estimators_are_registered():
    names = _risloc_estimators()
    assert {"music", "mvdr", "ramezani", "ml", "learned", "learned+ml", "subspacenet"} <= set(names)


def _check_contract(est, n: int, k_max: int, device: torch.device) -> None:
    assert est.K.shape == (n,) and est.K.dtype == torch.int64
    for q in ("phi", "theta", "r"):
        t = getattr(est, q)
        assert t.shape == (n, k_max) and t.dtype == torch.float32, q
    for t in (est.K, est.phi, est.theta, est.r):
        assert t.device.type == device.type
    assert ((est.K >= 0) & (est.K <= k_max)).all(), est.K
    inside = torch.arange(k_max, device=est.K.device).view(1, -1) < est.K.view(-1, 1)
    for q in ("phi", "theta", "r"):
        t = getattr(est, q)
        assert torch.isfinite(t[inside]).all(), f"{q}: non-finite among the first K-hat"
        assert torch.isnan(t[~inside]).all(), f"{q}: not NaN after the first K-hat"
    assert (est.r[inside] > 0).all()


@pytest.mark.parametrize("name", _risloc_estimators())
def test_contract(name, scenes):
    fn = estimators.get(name)
    for device in _devices():
        s = scenes.to(device)
        est = fn(s)
        _check_contract(est, N_SCENES, SC.k_max, device)
        empty = fn(s[0:0])
        _check_contract(empty, 0, SC.k_max, device)
        scaled = risloc.Scenes(s.y * GAIN, s.H, s.codes, s.scenario, s.snr_db)
        assert_same_positions(est, fn(scaled), scenes, 0.1)
