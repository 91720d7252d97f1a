"""Cross-path comparisons that must hold for any CPU's float32 rounding: each is run on the original
scenes and on re-rounded copies of them (tests/rounding.py: y, H and the codes moved by about one
float32 ulp, as another CPU's kernels would round them), and the worst move over the draws must stay
well inside the comparison's bound, in units of sqrt(CRB).

The comparisons: a complex gain on y (the estimators are scale-invariant), a complex gain on H (the
same measurements explained by sources of another power), the scenes run as one batch or in chunks
of two (``risloc.locate(batch=2)``), and, where CUDA is present, the CPU against the GPU.
"""

from __future__ import annotations

import cmath

import pytest
import torch

import risloc
from risloc.crb import crb_for_scenes
from rounding import DRAWS, ULP, moved_in_sqrt_crb, rerounded, worst_over_draws

BOUND = 0.1
"""A tenth of sqrt(CRB): the agreement the estimator contract asks of two code paths (tests/helpers.py)."""

Y_GAIN = 5e3 * cmath.exp(0.7j)
H_GAIN = 0.3 * cmath.exp(-1.1j)


def _variants(s):
    """``s``, ``s`` with y times Y_GAIN, ``s`` with H times H_GAIN: one batch of 3 len(s) scenes."""
    scaled = risloc.Scenes(s.y * Y_GAIN, s.H, s.codes, s.scenario, s.snr_db, s.truth)
    h_gain = risloc.Scenes(s.y, s.H * H_GAIN, s.codes, s.scenario, s.snr_db, s.truth)
    return risloc.Scenes.cat([s, scaled, h_gain])


def test_rerounded_moves_inputs_by_about_one_ulp_and_keeps_the_rest():
    s = risloc.simulate(risloc.Scenario(), 2, seed=7)
    r = rerounded(s, 3, fields=("y", "H", "codes"))
    for name in ("y", "H", "codes"):
        a, b = getattr(s, name), getattr(r, name)
        rel = ((b - a).abs() / a.abs().clamp(min=1e-30)).double()
        assert 0.3 * ULP < float(rel.square().mean().sqrt()) < 3 * ULP, name  # one ulp rms (|e| rms 1)
    assert torch.equal(rerounded(s, 3).y, r.y) and torch.equal(rerounded(s, 3).H, s.H)  # y first, H untouched by default
    assert not torch.equal(rerounded(s, 4).y, r.y)  # another seed, another draw
    assert r.truth is s.truth and torch.equal(r.snr_db, s.snr_db)
    with pytest.raises(ValueError, match="fields"):
        rerounded(s, fields=("x",))


def test_moved_in_sqrt_crb_counts_a_different_k_hat_as_infinite():
    s = risloc.simulate(risloc.Scenario(k_fixed=2), 2, seed=8)
    bound = crb_for_scenes(s)
    t = s.truth
    est = risloc.Estimates(t.K.clone(), t.phi.clone(), t.theta.clone(), t.r.clone())
    smallest = torch.where(bound.phi.isfinite(), bound.phi, torch.inf).amin(1, keepdim=True).to(t.phi.dtype)
    moved = risloc.Estimates(t.K.clone(), t.phi + 0.5 * smallest, t.theta.clone(), t.r.clone())
    assert torch.allclose(moved_in_sqrt_crb(est, moved, bound), torch.full((2,), 0.5, dtype=torch.float64), rtol=1e-4)
    fewer = risloc.Estimates(t.K - 1, t.phi.clone(), t.theta.clone(), t.r.clone())
    fewer.phi[:, 1] = float("nan")
    assert torch.isinf(moved_in_sqrt_crb(est, fewer, bound)).all()


@pytest.mark.parametrize("method", ["music", "mvdr"])
def test_gain_and_chunk_invariance_under_rerounding(method):
    """Measured on these 3 scenes, the original and all five draws of y, H and the codes: max
    0.002 sqrt(CRB) for music and for mvdr over the three comparisons (chunks: 0); bound 0.1,
    asserted with a 2x margin on the original and three draws. With the ML covariance fitted in
    float32 the y gain alone moved them by 0.12 and 0.11 (4 scenes of seed 21, five draws)."""
    s = risloc.simulate(risloc.Scenario(), 3, seed=21)
    n = len(s)
    bound = crb_for_scenes(s)
    worst = {"y gain": 0.0, "H gain": 0.0, "chunks of 2": 0.0}
    for draw in [s] + [rerounded(s, d, fields=("y", "H", "codes")) for d in DRAWS[:3]]:
        batch = _variants(draw)
        whole = risloc.locate(batch, method)
        chunked = risloc.locate(batch, method, batch=2)
        base = whole[0:n]
        worst["y gain"] = max(worst["y gain"], float(moved_in_sqrt_crb(base, whole[n:2 * n], bound).max()))
        worst["H gain"] = max(worst["H gain"], float(moved_in_sqrt_crb(base, whole[2 * n:], bound).max()))
        for i in range(3):
            part = moved_in_sqrt_crb(whole[i * n:(i + 1) * n], chunked[i * n:(i + 1) * n], bound)
            worst["chunks of 2"] = max(worst["chunks of 2"], float(part.max()))
    assert max(worst.values()) <= BOUND / 2, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree_under_rerounding():
    """The same scenes on the CPU and on the GPU (other kernels, other summation orders)."""
    s = risloc.simulate(risloc.Scenario(), 3, seed=21)
    for method in ("music", "mvdr"):
        worst = worst_over_draws(lambda x: (risloc.locate(x, method), risloc.locate(x, method, device="cuda").to("cpu")),
                                 s, DRAWS[:3])
        assert worst <= BOUND / 2, (method, worst)
