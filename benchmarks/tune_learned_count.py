"""The K head's confidence as a gate for a likelihood pruning pass in ``learned`` (validation only).

    PYTHONPATH=src python3 benchmarks/tune_learned_count.py --device cuda --scenes 4000 --seed 1000 --json out.json

On ``--scenes`` scenes of the validation seed ``--seed``: the packaged network's K-hat and the
confidence of its calibrated K head (max softmax(z / T)); ``learned``'s likelihood stage without
(A) and with (B) one pruning pass after the growth step; then per threshold c the combination
"B where the confidence < c, else A". The likelihood stage is the one this gate was tuned for
(6 refinement steps, one growth step with 6 after it, no RELAX: ``STAGE``); ``learned`` now runs
a RELAX re-search of its weakest source and a pruning pass in every scene instead. Prints (and writes) success and K accuracy over all SNRs
and at 10-20 dB, K_over and K_under, for every c. Choose on a validation seed only.
"""

from __future__ import annotations

import argparse
import json

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.estimators import get
from risloc.metrics import score
from risloc.nn.inference import DEFAULT_WEIGHTS, INFERENCE_AUTOCAST, k_confidence, load_model, run_model
from risloc.scenes import Estimates

STAGE = {"iterations": 6, "greedy_iterations": 6, "init_grow": 1}
"""The likelihood stage the gate was tuned on (``ml`` options)."""


def _replace(est: Estimates, mask: torch.Tensor, sub: Estimates) -> Estimates:
    """``est`` with the scenes of ``mask`` ``[S]`` (bool) replaced by ``sub`` (one row per such scene)."""
    out = Estimates(est.K.clone(), est.phi.clone(), est.theta.clone(), est.r.clone(), method=est.method)
    for name in ("K", "phi", "theta", "r"):
        getattr(out, name)[mask] = getattr(sub, name).to(getattr(out, name).device, getattr(out, name).dtype)
    return out


def _row(scenes, est):
    sc = score(scenes.truth, est, snr_db=scenes.snr_db)
    hi = sc.subset(10.0, 20.0).overall
    o = sc.overall
    return {"success": o.success, "success_10_20": hi.success, "K_acc": o.K_acc, "K_acc_10_20": hi.K_acc,
            "K_over_10_20": hi.K_over, "K_under_10_20": hi.K_under}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    loaded = load_model(DEFAULT_WEIGHTS, device=device)
    cal = loaded.calibration
    scenes = risloc.simulate(loaded.config.scenario, args.scenes, seed=args.seed).to(device)
    ml = get("ml")
    opts = dict(STAGE, batch=args.batch)
    A, B, conf = [], [], []
    for a in range(0, len(scenes), args.batch):
        s = scenes[a : a + args.batch]
        with torch.no_grad():
            det, pred = run_model(loaded.model, s, options=loaded.options, calibration=cal, autocast=INFERENCE_AUTOCAST,
                                  stage="detections")
        conf.append(k_confidence(pred, cal))
        A.append(ml(s, init=det, init_prune=0, **opts))
        B.append(ml(s, init=det, init_prune=1, **opts))
    A, B, conf = Estimates.cat(A), Estimates.cat(B), torch.cat(conf)
    rows = []
    for c in (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01):
        low = conf < c
        est = _replace(A, low, B[low])  # B where the confidence is below c
        rows.append({"threshold": c, "pruned_fraction": float((conf < c).float().mean()), **_row(scenes, est)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows, "provenance": stamp(seed=args.seed, device=device, config=vars(args))},
                                                indent=1))


if __name__ == "__main__":
    main()
