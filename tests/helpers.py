"""Shared checks of the tests: agreement of two estimates in units of the Cramér–Rao bound.

Tolerances on estimated positions are set from what matters: a fraction of sqrt(CRB) of each
source (:func:`risloc.crb.crb_for_scenes`), far above float32 rounding (which differs between
CPUs) and far below any error that changes a hit.
"""

from __future__ import annotations

import torch

from risloc.crb import crb_for_scenes


def assert_same_positions(a, b, scenes, fraction: float = 0.1, *, range_cell: float = 0.0) -> None:
    """``a`` and ``b`` (Estimates of ``scenes``) have the same K-hat and positions that agree,
    column by column, within ``fraction`` * the scene's smallest sqrt(CRB) (over its true
    sources; so it also holds for estimates beyond the true K). ``range_cell``: a relative
    tolerance on r allowed besides (e.g. :func:`range_decision_cell` for estimators whose range is a
    choice on a geometric grid, where a rounding-level change can pick the neighbouring range)."""
    assert torch.equal(a.K, b.K), (a.K, b.K)
    bound = crb_for_scenes(scenes)
    for q in ("phi", "theta", "r"):
        x, y = getattr(a, q).double().cpu(), getattr(b, q).double().cpu()
        per_source = getattr(bound, q).double().cpu()
        smallest = torch.where(per_source.isfinite(), per_source, torch.inf).amin(1, keepdim=True)
        tol = (fraction * smallest).expand_as(x)
        if q == "r":
            tol = torch.maximum(tol, range_cell * y.abs().nan_to_num(0.0))
        assert torch.equal(x.isnan(), y.isnan()), q
        on = ~x.isnan()
        err = (x - y).abs()
        assert (err[on] <= tol[on]).all(), f"{q}: |a - b| up to {(err[on] / tol[on] * fraction).max():.3g} sqrt(CRB) > {fraction}"


def range_decision_cell(scenario) -> float:
    """Relative width of one cell of ``ml``'s range decision (the geometric grid of
    ``MLOptions.range_grid`` ranges on [r_min, r_max], :func:`risloc.estimators.ml._decide_range`):
    the reported range is a choice among near-equal hit probabilities on that grid, which a
    rounding-level change can move to the neighbouring range (0.6 % of r by default)."""
    import math

    from risloc.estimators.ml import MLOptions

    return math.exp(math.log(scenario.r_max / scenario.r_min) / (MLOptions().range_grid - 1)) - 1 + 1e-6


class NoHostReads:
    """Within it, reading a tensor's value on the host (bool, int, float, index, item, tolist,
    numpy) raises: what waits for the device on CUDA and breaks a CUDA graph capture. With
    ``copies=True`` so does ``torch.tensor`` (on CUDA a copy from the host, which a capture
    cannot hold either). Checks on the CPU what a few CUDA scenes replay as graphs."""

    def __init__(self, copies: bool = False):
        self.copies = copies

    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def refuse(*args, **kwargs):
            raise AssertionError("a host read of a device value in a graphed stage")

        for n in self.names:
            setattr(torch.Tensor, n, refuse)
        if self.copies:
            self.tensor = torch.tensor

            def copy(*args, **kwargs):
                raise AssertionError("a copy from the host (torch.tensor) in a graphed stage")

            torch.tensor = copy

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        if self.copies:
            torch.tensor = self.tensor


# Re-rounding (what another CPU's float32 rounding does to the inputs) and moves in sqrt(CRB)
# live in tests/rounding.py; the data scripts of tests/data import them from here too.
from rounding import moved_in_sqrt_crb, rerounded as rounded_differently  # noqa: E402,F401
