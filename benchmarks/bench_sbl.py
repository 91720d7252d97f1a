"""``sbl`` against ``ml`` on simulated default scenes at 10-20 dB (CPU, a seed no option was chosen on).

    python benchmarks/bench_sbl.py --scenes 120 --seed 3100 --threads 1 --json benchmarks/results/cpu/sbl_vs_ml.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import risloc
from risloc.estimators import get
from risloc.metrics import score


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=120)
    ap.add_argument("--seed", type=int, default=3100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = risloc.simulate(risloc.Scenario(snr_db_min=10, snr_db_max=20), args.scenes, seed=args.seed)
    out = {"scenes": args.scenes, "seed": args.seed, "snr_db": [10, 20], "threads": torch.get_num_threads()}
    for m in ("sbl", "ml"):
        t = time.perf_counter()
        est = get(m)(s)
        dt = time.perf_counter() - t
        sc = score(s.truth, est, snr_db=s.snr_db)
        per_k = {}
        for k in range(1, 6):
            sel = (s.truth.K == k).cpu().numpy()
            if sel.any():
                per_k[f"K={k}"] = sc.select(sel).overall.success
        out[m] = {"success": sc.overall.success, "K_acc": sc.overall.K_acc, "scenes_per_s": args.scenes / dt, "success_per_K": per_k}
        print(m, out[m], flush=True)
    out["ratio_success"] = out["sbl"]["success"] / max(out["ml"]["success"], 1e-12)
    print("sbl / ml success:", out["ratio_success"])
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
