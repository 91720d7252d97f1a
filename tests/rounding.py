"""Inputs re-rounded as another CPU would round them, and how far an answer moves, in sqrt(CRB).

Two x86-64 CPUs (an Intel one with AVX-512, an AMD one, the same machine under
``ATEN_CPU_CAPABILITY=avx2``) run different kernels with different summation orders, so the same
float32 computation differs between them by a few units in the last place (ulp) of its inputs and
intermediates. A test comparing two code paths (a gain on y, batches split in chunks, two
devices) must hold for *every* such rounding, not only for the one of the machine it was written
on. :func:`rerounded` stands in for that rounding: each entry of y (and of H and the codes when
asked) is multiplied by ``1 + 2^-23 e`` with ``e`` complex standard normal, i.e. moved by about one
float32 ulp, with a seeded draw. Running a comparison on the original scenes and on :data:`DRAWS`
re-rounded copies (:func:`worst_over_draws`) measures its margin: the largest move, in units of
the scene's smallest sqrt(CRB) (:func:`moved_in_sqrt_crb`), against the test's bound.

How well it stands in for another CPU: on 4 default scenes of seed 21, the answers of an
AVX-512 Intel CPU and of the same CPU on AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``) differed by up to 0.005 / 0.005 / 0.24 / 0.007 sqrt(CRB) for
music / mvdr / ramezani / ml; the five re-rounded draws of y moved the same estimators by up to
0.002 / 0.002 / 0.46 / 0.011 (their scale invariance, 3 to 4 scenes of seed 21 or 3): the same
order, estimator by estimator.
"""

from __future__ import annotations

import torch

import risloc
from risloc.crb import crb_for_scenes

ULP = 2.0**-23
"""Relative size of one float32 ulp at 1 (the unit roundoff is half of it)."""

DRAWS = (0, 1, 2, 3, 4)
"""Seeds of the re-rounded copies a margin is measured on (the original scenes come first)."""


def _relative_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """Complex standard normal ``e`` (E|e|^2 = 1), drawn on the CPU so that a seed gives the same
    draw on every device."""
    return torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) / 2**0.5


def rerounded(scenes, seed: int = 0, *, fields: tuple[str, ...] = ("y",), size: float = ULP):
    """``scenes`` with each entry of the named ``fields`` ('y', 'H', 'codes') multiplied by
    ``1 + size * e``, e complex standard normal (seeded; y drawn first, then H, then the codes):
    what another CPU's rounding does to the same inputs. The SNR label and the truth are kept,
    so the CRB of the copy is that of the original."""
    unknown = set(fields) - {"y", "H", "codes"}
    if unknown:
        raise ValueError(f"rerounded: fields must be among 'y', 'H', 'codes', not {sorted(unknown)}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("y", "H", "codes"):
        t = getattr(scenes, name)
        if name in fields:
            e = _relative_noise(t.shape, g).to(device=t.device, dtype=t.dtype)
            t = t * (1 + size * e)
        out[name] = t
    return risloc.Scenes(out["y"], out["H"], out["codes"], scenes.scenario, scenes.snr_db, scenes.truth)


def moved_in_sqrt_crb(a, b, bound) -> torch.Tensor:
    """Per scene ``[S]``: the largest |a - b| over the estimated positions of two Estimates, in units
    of the scene's smallest sqrt(CRB) of that coordinate (``bound`` a CRBResult); inf where K-hat
    differs (a different count is a different answer)."""
    worst = torch.zeros(a.phi.shape[0], dtype=torch.float64)
    for q in ("phi", "theta", "r"):
        x, y, c = getattr(a, q).double().cpu(), getattr(b, q).double().cpu(), getattr(bound, q).double().cpu()
        smallest = torch.where(c.isfinite(), c, torch.inf).amin(1, keepdim=True)
        worst = torch.maximum(worst, torch.nan_to_num((x - y).abs() / smallest, nan=0.0).amax(1))
    same = a.K.cpu() == b.K.cpu()
    same_nan = torch.ones_like(same)
    for q in ("phi", "theta", "r"):
        same_nan &= (getattr(a, q).cpu().isnan() == getattr(b, q).cpu().isnan()).all(1)
    return torch.where(same & same_nan, worst, torch.full_like(worst, torch.inf))


def worst_over_draws(compare, scenes, draws=DRAWS, *, fields: tuple[str, ...] = ("y",)) -> float:
    """The largest move over the original ``scenes`` and each re-rounded copy (seeds ``draws``):
    ``compare(s)`` returns the two Estimates of the two code paths on ``s``; their distance is
    :func:`moved_in_sqrt_crb` with the CRB of the original scenes. Returns sqrt(CRB) units
    (inf when some draw changes a K-hat)."""
    bound = crb_for_scenes(scenes)
    worst = 0.0
    for s in [scenes] + [rerounded(scenes, d, fields=fields) for d in draws]:
        a, b = compare(s)
        worst = max(worst, float(moved_in_sqrt_crb(a, b, bound).max()))
    return worst
