"""The maximum-likelihood RIS-domain covariance (risloc.covariance.ml_covariance): what it costs,
how many sources the measurements support without the steering manifold, and what it gives
the classical estimators. CPU, default scenario unless stated.

    python benchmarks/bench_covariance.py --threads 1 --json benchmarks/results/cpu/covariance.json

Parts (``--parts``):
  cost      time per scene of the default estimate (ranks 0..2 fitted, the rank chosen).
  subspace  rank-K fits with the true K (K = 1..5): sin of the largest principal angle between
            the estimate's column space and the sources', median over scenes, at 20 dB and
            30 dB, L = 16 and L = 64 snapshots, in the prior subspace (99 %) and unrestricted.
  targets   music / mvdr / ramezani with their defaults: single sources at 20 dB, and K = 1, 2
            at 10-20 dB (held-out seeds 3000-3002), scored by risloc.metrics.score.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import risloc
from risloc import covariance as cv
from risloc.estimators import get
from risloc.metrics import score


def _write(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def subspace_error(F_true, F_est):
    Et = torch.linalg.qr(F_true).Q
    E = torch.linalg.qr(F_est).Q
    sv = torch.linalg.svdvals(Et.mH @ E)
    return (1 - sv.min(-1).values ** 2).clamp(min=0).sqrt()


def part_cost(n):
    s = risloc.simulate(risloc.Scenario(), n, seed=4000)
    cv.ml_covariance(s.y[:8], s.H[:8], s.codes[:8], s.scenario)  # warm-up (prior subspace cache)
    t = time.perf_counter()
    cv.ml_covariance(s.y, s.H, s.codes, s.scenario)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    cv.sample_covariance(s.y, s.H, s.codes)
    db = time.perf_counter() - t
    return {"scenes": n, "ms_per_scene_ml": dt / n * 1e3, "ms_per_scene_back_projection": db / n * 1e3}


def part_subspace(n):
    rows = []
    for L in (16, 64):
        for snr in (20.0, 30.0):
            for energy in (0.99, 1.0):
                for K in range(1, 6):
                    sc = risloc.Scenario(k_fixed=K, snr_db_min=snr, snr_db_max=snr, snapshots=L)
                    s = risloc.simulate(sc, n, seed=5000 + K)
                    basis = cv.prior_subspace(sc, energy=energy, dtype=s.y.dtype)
                    fit = cv.fit_factor(s.y, s.H, s.codes, K, basis=basis, iterations=60)
                    err = subspace_error(risloc.source_factor(s.truth, sc)[..., :K].to(torch.complex128), fit.factor.to(torch.complex128))
                    row = {"L": L, "snr_db": snr, "prior_energy": energy, "d": basis.shape[1], "K": K,
                           "median_sin": float(err.median()), "p90_sin": float(err.quantile(0.9))}
                    rows.append(row)
                    print(row, flush=True)
    return rows


def part_targets(n):
    out = {}
    cases = {
        "K=1, 20 dB": (risloc.Scenario(k_fixed=1, snr_db_min=20, snr_db_max=20), 3000),
        "K=1, 10-20 dB": (risloc.Scenario(k_fixed=1, snr_db_min=10, snr_db_max=20), 3001),
        "K=2, 10-20 dB": (risloc.Scenario(k_fixed=2, snr_db_min=10, snr_db_max=20), 3002),
    }
    for name, (sc, seed) in cases.items():
        s = risloc.simulate(sc, n, seed=seed)
        for method in ("music", "mvdr", "ramezani"):
            t = time.perf_counter()
            est = get(method)(s)
            dt = time.perf_counter() - t
            o = score(s.truth, est, snr_db=s.snr_db).overall
            row = {"success": o.success, "K_acc": o.K_acc, "scenes_per_s": n / dt}
            out[f"{method} | {name}"] = row
            print(method, name, seed, row, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["cost", "subspace", "targets"])
    ap.add_argument("--cost-scenes", type=int, default=200)
    ap.add_argument("--subspace-scenes", type=int, default=24)
    ap.add_argument("--target-scenes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"threads": torch.get_num_threads(), "options": str(cv.CovarianceOptions())}
    if "cost" in args.parts:
        out["cost"] = part_cost(args.cost_scenes)
        print(out["cost"], flush=True)
    if "subspace" in args.parts:
        out["subspace"] = part_subspace(args.subspace_scenes)
    if "targets" in args.parts:
        out["targets"] = part_targets(args.target_scenes)
    if args.json:
        _write(args.json, out)


if __name__ == "__main__":
    main()
