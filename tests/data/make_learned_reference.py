"""Write tests/data/learned_reference.pt: the packaged learned estimators' answers on fixed scenes.

K-hat, phi, theta, r of ``learned``, ``learned+ml`` and ``subspacenet`` (packaged weights, default
options) on ``risloc.simulate(risloc.Scenario(), 32, seed=7)``, on the CPU, and per method the
scenes whose answer does not move when y is rounded differently at float32 level (``stable``:
same K-hat, positions within 0.01 sqrt(CRB) under each of the re-rounded copies
``tests/rounding.DRAWS``; a likelihood refinement can settle in another mode of a flat
likelihood, and the range decision can pick a neighbouring range, on another CPU). tests/test_nn_contract.py checks that the estimators still
give these answers on the stable scenes, so a refactoring that changes an answer fails; rerun
this script only when a pipeline changes on purpose (and say so in the commit).

    PYTHONPATH=src python tests/data/make_learned_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import risloc
from risloc._files import atomic_path
from risloc.crb import crb_for_scenes
from risloc.estimators import get

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import moved_in_sqrt_crb, rounded_differently  # noqa: E402
from rounding import DRAWS  # noqa: E402

OUT = Path(__file__).resolve().parent / "learned_reference.pt"
METHODS = ("learned", "learned+ml", "subspacenet")


def main() -> None:
    torch.manual_seed(0)
    scenes = risloc.simulate(risloc.Scenario(), 32, seed=7)
    bound = crb_for_scenes(scenes)
    out = {}
    for method in METHODS:
        est = get(method)(scenes)
        moved = [moved_in_sqrt_crb(est, get(method)(rounded_differently(scenes, seed)), bound) for seed in DRAWS]
        stable = torch.stack(moved).amax(0) < 0.01
        out[method] = {"K": est.K, "phi": est.phi, "theta": est.theta, "r": est.r, "stable": stable}
    with atomic_path(OUT) as tmp:
        torch.save(out, tmp)
    print({m: (out[m]["K"].tolist(), int(out[m]["stable"].sum())) for m in out})


if __name__ == "__main__":
    main()
