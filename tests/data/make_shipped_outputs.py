"""Write tests/data/shipped_outputs.json: what the packaged models answer on fixed scenes.

For each shipped model (``learned`` with ``src/risloc/weights/default.pt``, ``subspacenet``
with ``src/risloc/weights/subspacenet.pt``) on the same fixed scenes (default scenario, SNR
uniform on 10...20 dB, seed 314): the success over all of them (risloc.evaluate) and K-hat,
phi, theta, r of the first few, with the SHA-256 of the weights. tests/test_nn_spectrum.py
compares the models' answers with these (positions in units of sqrt(CRB)).

The run is repeated on the same scenes with y perturbed at float32 rounding level (each
entry times 1 + 2^-23 e, e complex standard normal: what another CPU's rounding does) and the
changes are written as ``rerun_k_changes`` (and the scenes, ``rerun_k_changed_scenes``), ``rerun_change_sqrt_crb`` (positions, in units of
the scene's smallest sqrt(CRB)) and ``rerun_success_change``; the test's tolerances stand above them.

    PYTHONPATH=src python tests/data/make_shipped_outputs.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

import risloc
from risloc._files import atomic_write_text, nan_to_none
from risloc.crb import crb_for_scenes
from risloc.estimators import get
from risloc.nn.checkpoint import file_sha256
from risloc.nn.inference import DEFAULT_WEIGHTS
from risloc.nn.subspacenet import DEFAULT_WEIGHTS as PEER_WEIGHTS

OUT = Path(__file__).resolve().parent / "shipped_outputs.json"
SEED = 314
N_SCENES = 150
N_PINNED = 8
SNR_DB = (10.0, 20.0)
MODELS = {"learned": DEFAULT_WEIGHTS, "subspacenet": PEER_WEIGHTS}


def scenes():
    """The fixed scenes of the reference (on the CPU)."""
    sc = risloc.Scenario().replace(snr_db_min=SNR_DB[0], snr_db_max=SNR_DB[1])
    return risloc.simulate(sc, N_SCENES, seed=SEED)


def change_in_sqrt_crb(a, b, bound) -> float:
    """Largest |a - b| over the estimated positions, in units of the scene's smallest sqrt(CRB)."""
    worst = 0.0
    for q in ("phi", "theta", "r"):
        x, y, c = getattr(a, q).double(), getattr(b, q).double(), getattr(bound, q).double()
        smallest = torch.where(c.isfinite(), c, torch.inf).amin(1, keepdim=True)
        d = ((x - y).abs() / smallest)[~x.isnan() & ~y.isnan()]
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


def main() -> None:
    torch.set_num_threads(1)
    s = scenes()
    bound = crb_for_scenes(s)
    g = torch.Generator().manual_seed(0)
    e = torch.complex(torch.randn(s.y.shape, generator=g), torch.randn(s.y.shape, generator=g)) / 2**0.5
    rounded = risloc.Scenes(s.y * (1 + 2.0**-23 * e), s.H, s.codes, s.scenario, s.snr_db)
    out = {
        "scenes": {"scenario": "default", "snr_db": list(SNR_DB), "seed": SEED, "n": N_SCENES, "pinned": N_PINNED},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "PYTHONPATH=src python tests/data/make_shipped_outputs.py",
        "models": {},
    }
    for name, weights in MODELS.items():
        est = get(name)(s)
        other = get(name)(rounded)
        success = risloc.evaluate(s, est).overall.success
        same_k = est.K == other.K
        rerun = change_in_sqrt_crb(est[same_k], other[same_k], bound[same_k])
        out["models"][name] = {
            "weights": weights.name,
            "sha256": file_sha256(weights),
            "success": success,
            "rerun_success_change": abs(risloc.evaluate(s, other).overall.success - success),
            "rerun_k_changes": int((~same_k).sum()),
            "rerun_k_changed_scenes": torch.nonzero(~same_k).flatten().tolist(),
            "rerun_change_sqrt_crb": rerun,
            "K": est.K[:N_PINNED].tolist(),
            **{q: getattr(est, q)[:N_PINNED].tolist() for q in ("phi", "theta", "r")},
        }
        print(f"{name}: success {success:.4f}; y rounded differently: {int((~same_k).sum())} K-hat changes, positions moved "
              f"up to {rerun:.3g} sqrt(CRB)")
    atomic_write_text(OUT, json.dumps(nan_to_none(out), indent=1) + "\n")
    print(f"-> {OUT.name}")


if __name__ == "__main__":
    main()
