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


# Re-rounding (what another CPU's float32 rounding does to the inputs) and moves in sqrt(CRB)
# live in tests/rounding.py; the data scripts of tests/data import them from here too.
from rounding import moved_in_sqrt_crb, rerounded as rounded_differently  # noqa: E402,F401
