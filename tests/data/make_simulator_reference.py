"""Write tests/data/simulator_reference.npz: a few scenes of ``risloc.simulate`` on the CPU.

The file pins what the simulator draws for a given seed and scene index (the random streams,
their order and the arithmetic), so that a change that moves the scenes of an existing
scenario is noticed (tests/test_impairments.py). Run from the repository root:

    PYTHONPATH=src python tests/data/make_simulator_reference.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import risloc

CASES = {
    # name: (scenario fields, seed, start, n_scenes); the first straddles two random-number blocks
    "default": ({}, 11, 1022, 4),
    "dft_static": (
        dict(codebook="dft", signal="static", k_fixed=2, code_bits=2, snapshots=12, n_h=8, n_v=6, m_bs=8),
        5,
        0,
        3,
    ),
}


def reference_arrays() -> dict[str, np.ndarray]:
    out = {}
    for name, (fields, seed, start, n) in CASES.items():
        s = risloc.simulate(risloc.Scenario(**fields), n, seed=seed, start=start)
        t = s.truth
        for key, value in dict(
            y=s.y, H=s.H, codes=s.codes, snr_db=s.snr_db, K=t.K, phi=t.phi, theta=t.theta, r=t.r, power=t.power, noise_var=t.noise_var
        ).items():
            out[f"{name}/{key}"] = value.numpy()
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "simulator_reference.npz"
    np.savez_compressed(path, **reference_arrays())
    print(f"wrote {path} ({path.stat().st_size} bytes)")
