"""Shared checks of the tests: agreement of two estimates in units of the Cramér–Rao bound.

Tolerances on estimated positions are set from what matters: a fraction of sqrt(CRB) of each
source (:func:`risloc.crb.crb_for_scenes`), far above float32 rounding (which differs between
CPUs) and far below any error that changes a hit.
"""

from __future__ import annotations

import torch

from risloc.crb import crb_for_scenes


def assert_same_positions(a, b, scenes, fraction: float = 0.1) -> None:
    """``a`` and ``b`` (Estimates of ``scenes``) have the same K-hat and positions that agree,
    column by column, within ``fraction`` * the scene's smallest sqrt(CRB) (over its true
    sources; so it also holds for estimates beyond the true K)."""
    assert torch.equal(a.K, b.K), (a.K, b.K)
    bound = crb_for_scenes(scenes)
    for q in ("phi", "theta", "r"):
        x, y = getattr(a, q).double().cpu(), getattr(b, q).double().cpu()
        per_source = getattr(bound, q).double().cpu()
        smallest = torch.where(per_source.isfinite(), per_source, torch.inf).amin(1, keepdim=True)
        tol = (fraction * smallest).expand_as(x)
        assert torch.equal(x.isnan(), y.isnan()), q
        on = ~x.isnan()
        err = (x - y).abs()
        assert (err[on] <= tol[on]).all(), f"{q}: |a - b| up to {(err[on] / tol[on] * fraction).max():.3g} sqrt(CRB) > {fraction}"


def rounded_differently(scenes, seed: int = 0):
    """``scenes`` with y perturbed at float32 rounding level (each entry times 1 + 2^-23 e, e complex
    standard normal): what another CPU's rounding does to the same computation."""
    import risloc

    g = torch.Generator().manual_seed(seed)
    e = torch.complex(torch.randn(scenes.y.shape, generator=g), torch.randn(scenes.y.shape, generator=g)) / 2**0.5
    return risloc.Scenes(scenes.y * (1 + 2.0**-23 * e), scenes.H, scenes.codes, scenes.scenario, scenes.snr_db)


def moved_in_sqrt_crb(a, b, bound) -> torch.Tensor:
    """Per scene ``[S]``: the largest |a - b| over the estimated positions, in units of the scene's
    smallest sqrt(CRB) of that coordinate; inf where K-hat differs."""
    worst = torch.zeros(a.phi.shape[0], dtype=torch.float64)
    for q in ("phi", "theta", "r"):
        x, y, c = getattr(a, q).double().cpu(), getattr(b, q).double().cpu(), getattr(bound, q).double().cpu()
        smallest = torch.where(c.isfinite(), c, torch.inf).amin(1, keepdim=True)
        worst = torch.maximum(worst, torch.nan_to_num((x - y).abs() / smallest, nan=0.0).amax(1))
    return torch.where(a.K.cpu() == b.K.cpu(), worst, torch.full_like(worst, torch.inf))
