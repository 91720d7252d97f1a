"""``music``'s likelihood refinement: chosen on validation seeds, measured on a fresh seed (CPU).

    python benchmarks/bench_music.py --scenes 200 --val-seeds 1000 2026 --seed 5000 --threads 1 \\
        --json benchmarks/results/cpu/music_refine.json

Cases (default scenario otherwise): single sources at 20 dB; single sources at 10-20 dB; two
sources at 10-20 dB. Each scene set is seeded ``seed + case index`` (0, 1, 2).

1. Validation (``--val-seeds``): MUSIC with its covariance defaults and no refinement
   (``refine="none"``), then each variant of ``ml``'s likelihood refinement (:data:`VARIANTS`:
   started from MUSIC's order-rule answer or from its rank-k_fit answer, with so many
   Fisher-scoring steps). The variant with the best mean success over the validation cases and
   seeds is kept (ties: fewer steps); the script says whether it is the package default
   (:data:`risloc.estimators.music.MUSIC_PROPOSE`, ``MUSIC_REFINE_STEPS``).
2. Report (``--seed``, never used for a choice): ``get("music")`` with its defaults and with
   ``refine="none"``: success, K accuracy, K-hat counts and scenes/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

import risloc
from risloc import covariance as cv
from risloc.estimators import get, music
from risloc.estimators.ml import estimate as ml_estimate
from risloc.metrics import score

CASES = {
    "K=1, 20 dB": dict(k_fixed=1, snr_db_min=20.0, snr_db_max=20.0),
    "K=1, 10-20 dB": dict(k_fixed=1, snr_db_min=10.0, snr_db_max=20.0),
    "K=2, 10-20 dB": dict(k_fixed=2, snr_db_min=10.0, snr_db_max=20.0),
}
VARIANTS = (("order_rule", 8), ("order_rule", 15), ("rank_limit", 8), ("rank_limit", 15))
"""(what MUSIC proposes, Fisher-scoring steps); pruning passes: 1 after the order rule, k_fit - 1 after the rank limit."""


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _row(scenes, est, seconds: float) -> dict:
    o = score(scenes.truth, est, snr_db=scenes.snr_db).overall
    return {"success": o.success, "K_acc": o.K_acc, "K_hat_counts": torch.bincount(est.K, minlength=4).tolist(),
            "scenes_per_s": len(scenes) / seconds}


def _scenes(case: str, seed: int, n: int):
    i = list(CASES).index(case)
    return risloc.simulate(risloc.Scenario(**CASES[case]), n, seed=seed + i)


def validate(seeds, n: int) -> dict:
    rows = {}
    for seed in seeds:
        for case in CASES:
            s = _scenes(case, seed, n)
            L, M = s.y.shape[1:]
            k_fit = cv.ml_rank_limit(s.scenario, L, M)
            starts, seconds = {}, {}
            for propose in ("order_rule", "rank_limit"):
                t = time.perf_counter()
                K = None if propose == "order_rule" else torch.full_like(s.truth.K, k_fit)
                starts[propose] = get("music")(s, K=K, refine="none")
                seconds[propose] = time.perf_counter() - t
            rows.setdefault("none", {})[f"{case} | seed {seed}"] = _row(s, starts["order_rule"], seconds["order_rule"])
            for propose, steps in VARIANTS:
                t = time.perf_counter()
                prune = 1 if propose == "order_rule" else k_fit - 1
                est = ml_estimate(s, init=starts[propose], iterations=steps, init_prune=prune)
                name = f"{propose}, {steps} steps"
                rows.setdefault(name, {})[f"{case} | seed {seed}"] = _row(s, est, seconds[propose] + time.perf_counter() - t)
                print(seed, case, name, rows[name][f"{case} | seed {seed}"], flush=True)
    mean = {v: sum(r["success"] for r in cases.values()) / len(cases) for v, cases in rows.items()}
    return {"rows": rows, "mean_success": mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--val-seeds", type=int, nargs="*", default=[1000, 2026])
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    out = {"commit": commit, "threads": torch.get_num_threads(), "scenes": args.scenes, "cases": CASES,
           "default": {"propose": music.MUSIC_PROPOSE, "steps": music.MUSIC_REFINE_STEPS}}
    if args.val_seeds:
        val = validate(args.val_seeds, args.scenes)
        steps = {v: 0 if v == "none" else int(v.split(", ")[1].split()[0]) for v in val["mean_success"]}
        best = max(val["mean_success"], key=lambda v: (round(val["mean_success"][v], 6), -steps[v]))
        out["validation"] = {"seeds": args.val_seeds, **val, "best": best,
                             "best_is_default": best == f"{music.MUSIC_PROPOSE}, {music.MUSIC_REFINE_STEPS} steps"}
        print("validation mean success:", val["mean_success"], "-> best", best, flush=True)
    report = {}
    for case in CASES:
        s = _scenes(case, args.seed, args.scenes)
        for name, kw in (("music (defaults)", {}), ("music, refine='none'", {"refine": "none"})):
            t = time.perf_counter()
            est = get("music")(s, **kw)
            report[f"{name} | {case}"] = _row(s, est, time.perf_counter() - t)
            print(args.seed, case, name, report[f"{name} | {case}"], flush=True)
    out["report"] = {"seed": args.seed, "rows": report}
    out["load_average_end"] = os.getloadavg()
    if args.json:
        _write(args.json, out)


if __name__ == "__main__":
    main()
