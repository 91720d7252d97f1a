"""Source-counting accuracy of every order rule on simulated default scenes (CPU).

    python benchmarks/bench_order.py --scenes 600 --seed 2000 --tune-seed 1000 --tune-scenes 300 \
        --json benchmarks/results/cpu/order_600.json

1. Validation (``--tune-seed``, a different seed from the report): the per-source penalty of
   the ``ml-penalised`` rule is swept and the value with the best K accuracy is kept.
2. Report (``--seed``): K accuracy per rule, per 5-dB SNR bin and per true K, with the tuned
   penalty (risloc.estimators.order.order_estimates). Also the time per scene of the ML fits.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import risloc
from risloc import covariance as cv
from risloc.estimators import order

BINS = [(-5, 0), (0, 5), (5, 10), (10, 15), (15, 20)]
PENALTIES = (10, 20, 40, 60, 80, 100, 120, 150, 200, 250, 300)


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def tune(scenes, options) -> tuple[float, list]:
    sc = scenes.scenario
    L, M = scenes.y.shape[1:]
    basis = cv.prior_subspace(sc, energy=options.prior_energy, dtype=scenes.y.dtype)
    d = basis.shape[1]
    k_fit = min(sc.k_max, order.identifiable_rank(L, M, d))
    nll = []
    for a in range(0, len(scenes), 256):
        s = scenes[a : a + 256]
        nll.append(torch.stack([f.nll for f in cv.fit_path(s.y, s.H, s.codes, range(k_fit + 1), basis=basis, iterations=options.em_iterations)], -1))
    nll = torch.cat(nll)
    rows = []
    for p in PENALTIES:
        K = order.likelihood_order(nll, d=d, n_snapshots=L, rule="penalised", penalty=p, k_min=1)
        rows.append({"penalty": p, "K_acc": float((K == scenes.truth.K).float().mean())})
    best = max(rows, key=lambda r: r["K_acc"])["penalty"]
    return float(best), rows


def table(K_hat: dict, truth_K, snr) -> dict:
    res = {}
    for rule, K in K_hat.items():
        ok = (K == truth_K).float()
        row = {"all": float(ok.mean())}
        for lo, hi in BINS:
            m = (snr >= lo) & (snr < hi if hi < 20 else snr <= hi)
            row[f"snr {lo}..{hi}"] = float(ok[m].mean()) if m.any() else None
        for k in range(1, int(truth_K.max()) + 1):
            m = truth_K == k
            row[f"K={k}"] = float(ok[m].mean()) if m.any() else None
        m = (truth_K <= 2) & (snr >= 10)
        row["K<=2, snr>=10"] = float(ok[m].mean()) if m.any() else None
        res[rule] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--tune-scenes", type=int, default=300)
    ap.add_argument("--tune-seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sc = risloc.Scenario()
    options = cv.CovarianceOptions()
    out = {"scenario": "default", "options": {"prior_energy": options.prior_energy, "em_iterations": options.em_iterations}}
    if args.tune_scenes:
        best, rows = tune(risloc.simulate(sc, args.tune_scenes, seed=args.tune_seed), options)
        out["tuning"] = {"seed": args.tune_seed, "scenes": args.tune_scenes, "sweep": rows, "best_penalty": best}
        print("penalty sweep (validation seed", args.tune_seed, "):", rows, "-> best", best)
    else:
        best = order.PENALTY
    scenes = risloc.simulate(sc, args.scenes, seed=args.seed)
    t = time.perf_counter()
    K_hat = order.order_estimates(scenes, penalty=best)
    dt = time.perf_counter() - t
    res = table(K_hat, scenes.truth.K, scenes.snr_db)
    out.update({"seed": args.seed, "scenes": args.scenes, "penalty": best, "seconds_all_rules_per_scene": dt / args.scenes,
                "threads": torch.get_num_threads(), "k_acc": res})
    cols = list(next(iter(res.values())).keys())
    print("| rule | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for rule, row in res.items():
        print(f"| {rule} | " + " | ".join("—" if row[c] is None else f"{row[c]:.3f}" for c in cols) + " |")
    print(f"time (all rules, ML fits k = 0..2): {dt / args.scenes * 1e3:.1f} ms per scene, {torch.get_num_threads()} threads")
    if args.json:
        _write(args.json, out)


if __name__ == "__main__":
    main()
