"""Accuracy of the ``ramezani`` estimator, both variants, on true and on measured covariances.

    python benchmarks/bench_ramezani.py --json benchmarks/results/cpu/ramezani_cases.json

The table of docs/estimators-ramezani.md. Scenes of ``risloc.simulate(..., seed=--seed)``;
"oracle" rows give the estimator the true RIS-domain covariance (``risloc.source_factor``) and
the true K; "measured" rows use the scene's own sample covariance and the order rule (or the
true K where the case says "K given"). ``paper`` is ``variant="paper", steering="fresnel"``
(the published pipeline), ``risloc`` the default variant. Scored by
``risloc.metrics.evaluate``; scenes/s is the estimator's wall time on the machine (CPU by
default, one thread; on a shared machine a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import risloc
from risloc import metrics
from risloc._files import atomic_write_text, nan_to_none
from risloc._provenance import device_info, git_commit
from risloc.estimators import locate

VARIANTS = {"risloc": {}, "paper": {"variant": "paper", "steering": "fresnel"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--oracle-scenes", type=int, default=100)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    load0 = os.getloadavg()[0]

    base = risloc.Scenario()
    cases = [
        ("oracle, K = 1", risloc.Scenario(k_fixed=1), args.oracle_scenes, "oracle", ("risloc", "paper")),
        ("oracle, K = 1..5", base, args.oracle_scenes, "oracle", ("risloc", "paper")),
        ("measured, 20 dB, K = 1", risloc.Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20), args.scenes, "measured", ("risloc", "paper")),
        ("measured, 20 dB, K = 1 given", risloc.Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20), args.scenes, "given", ("paper",)),
        ("measured, default scenario", base, args.scenes, "measured", ("risloc", "paper")),
    ]
    rows = []
    for label, sc, n, kind, variants in cases:
        scenes = risloc.simulate(sc, n, seed=args.seed).to(dev)
        for v in variants:
            opts = dict(VARIANTS[v])
            if kind == "oracle":
                opts["covariance"] = risloc.source_factor(scenes.truth, sc)
                opts["n_sources"] = scenes.truth.K
            elif kind == "given":
                opts["n_sources"] = scenes.truth.K
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            est = locate(scenes, "ramezani", **opts)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            o = metrics.evaluate(scenes, est).overall
            row = {"case": label, "variant": v, "scenes": n, "K_acc": o.K_acc, "success": o.success,
                   "rmse_phi_deg": o.rmse_phi_deg, "rmse_theta_deg": o.rmse_theta_deg, "rmse_rel_r": o.rmse_rel_r,
                   "n_pairs": o.n_pairs, "seconds": dt, "scenes_per_s": n / dt}
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = {
        "script": "benchmarks/bench_ramezani.py", "args": vars(args), "git": git_commit(),
        "machine": {"device": str(dev), "cpu": device_info("cpu")["cpu_model"], "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min_start": load0, "load_average_1min_end": os.getloadavg()[0]},
        "versions": {"risloc": risloc.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "rows": rows,
    }
    text = json.dumps(nan_to_none(out), indent=1)
    if args.json:
        atomic_write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
