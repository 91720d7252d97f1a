"""Where does an estimator lose against another? Per-scene and per-source breakdowns.

    PYTHONPATH=src python3 benchmarks/diagnose_learned.py --device cuda --scenes 4000 \
        --seed 1000 --methods ml,learned,learned+ml --out diag.npz
    PYTHONPATH=src python3 benchmarks/diagnose_learned.py --tables diag.npz      # print the tables

Runs the methods on the same simulated default scenes (seed ``--seed``: use a validation
seed, never the held-out seed the README reports on) and stores, per scene, K, K-hat, the SNR
and the success flag, and per true source its range, its angular distance to the nearest other
source of its scene and whether it was hit. ``--tables`` prints, for every method:

* the split of failures: K-hat < K (missed sources), K-hat > K, and K-hat = K with at least
  one source outside the hit window (wrong positions);
* success per SNR bin and per K;
* the source hit rate per range bucket (this aperture resolves range only up to about 4 m);
* success per closest-pair separation, in beamwidths (about 8.5 deg for the 12 x 12 RIS).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

import risloc
from risloc import metrics, physics

RANGE_EDGES = (0.5, 1.0, 2.0, 4.0, 10.0)
BEAMWIDTH = math.radians(8.5)
SEPARATION_EDGES = (0.0, 1.0, 2.0, 4.0, math.inf)


def _closest(truth) -> np.ndarray:
    """[S, K_max] angle (rad) from each true source to the nearest other source of its scene (inf for K = 1)."""
    phi, theta = truth.phi.double(), truth.theta.double()
    a = physics.angle_between(phi.unsqueeze(2), theta.unsqueeze(2), phi.unsqueeze(1), theta.unsqueeze(1))
    K = phi.shape[1]
    a = torch.where(torch.eye(K, dtype=torch.bool).unsqueeze(0) | torch.isnan(a), torch.full_like(a, math.inf), a)
    return a.min(-1).values.numpy()


def run(args) -> None:
    device = torch.device(args.device)
    scenes = risloc.simulate(risloc.Scenario(), args.scenes, seed=args.seed, device="cpu")
    t = scenes.truth
    out = {
        "K": t.K.numpy(), "snr_db": scenes.snr_db.numpy(), "r": t.r.numpy(), "closest": _closest(t),
        "seed": args.seed, "methods": args.methods,
    }
    dev = scenes.to(device)
    for name in args.methods.split(","):
        torch.manual_seed(args.seed)
        est = risloc.locate(dev, method=name)  # warm-up-free: timing here is indicative only
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        est = risloc.locate(dev, method=name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        est = est.to("cpu")
        m = metrics.match(t, est)
        hit = np.zeros(t.phi.shape, dtype=bool)
        hit[m.scene, m.truth_index] = m.hit
        out[f"{name}/K_hat"] = est.K.numpy()
        out[f"{name}/hit"] = hit
        out[f"{name}/success"] = metrics.success_mask(t, est)
        out[f"{name}/scenes_per_s"] = len(scenes) / dt
        print(f"{name}: {len(scenes) / dt:.0f} scenes/s", flush=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}")


def tables(path: str) -> str:
    d = np.load(path, allow_pickle=False)
    K, snr, r, closest = d["K"], d["snr_db"], d["r"], d["closest"]
    S, Kmax = r.shape
    active = np.arange(Kmax)[None, :] < K[:, None]
    sep = np.where(K > 1, np.nanmin(np.where(active, closest, np.inf), 1), np.inf) / BEAMWIDTH
    hi = snr >= 10
    lines = [f"{S} scenes, seed {int(d['seed'])}"]
    for name in str(d["methods"]).split(","):
        Kh, hit, ok = d[f"{name}/K_hat"], d[f"{name}/hit"], d[f"{name}/success"]
        lines.append(f"\n## {name} ({float(d[f'{name}/scenes_per_s']):.0f} scenes/s)")
        for label, sel in (("-5..20 dB", np.ones(S, bool)), ("10..20 dB", hi)):
            n = sel.sum()
            under, over = (Kh < K)[sel].mean(), (Kh > K)[sel].mean()
            eq_bad = ((Kh == K) & ~ok)[sel].mean()
            lines.append(f"{label}: success {ok[sel].mean():.3f} | K_under {under:.3f} K_over {over:.3f} "
                         f"K-hat=K but a source missed the window {eq_bad:.3f} (n={n})")
        row = [f"{lo:g}..{lo + 5:g}: {ok[(snr >= lo) & (snr < lo + 5)].mean():.3f}" for lo in range(-5, 20, 5)]
        lines.append("success per SNR bin: " + ", ".join(row))
        row = [f"K={k}: {ok[hi & (K == k)].mean():.3f} (K_under {(Kh < K)[hi & (K == k)].mean():.2f})" for k in range(1, Kmax + 1)]
        lines.append("10..20 dB per K: " + ", ".join(row))
        src = active & hi[:, None]
        row = []
        for lo, up in zip(RANGE_EDGES[:-1], RANGE_EDGES[1:]):
            sel = src & (r >= lo) & (r < up)
            row.append(f"r {lo:g}-{up:g} m: {hit[sel].mean():.3f} (n={sel.sum()})")
        lines.append("10..20 dB source hit rate per range: " + ", ".join(row))
        row = []
        for lo, up in zip(SEPARATION_EDGES[:-1], SEPARATION_EDGES[1:]):
            sel = hi & (K > 1) & (sep >= lo) & (sep < up)
            row.append(f"{lo:g}-{up:g} bw: {ok[sel].mean():.3f} (n={sel.sum()})")
        sel = hi & (K == 1)
        row.append(f"K=1: {ok[sel].mean():.3f} (n={sel.sum()})")
        lines.append("10..20 dB success per closest-pair separation: " + ", ".join(row))
        # sources the method missed at K-hat = K vs K-hat < K, per separation of that source
        src_sep = np.where(active, closest, np.inf) / BEAMWIDTH
        row = []
        for lo, up in zip(SEPARATION_EDGES[:-1], SEPARATION_EDGES[1:]):
            sel = src & (src_sep >= lo) & (src_sep < up)
            row.append(f"{lo:g}-{up:g} bw: {hit[sel].mean():.3f} (n={sel.sum()})")
        lines.append("10..20 dB source hit rate per its nearest-neighbour separation: " + ", ".join(row))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--methods", default="ml,learned,learned+ml")
    ap.add_argument("--out", default="diag.npz")
    ap.add_argument("--tables", default=None, help="print the tables of a stored .npz and exit")
    args = ap.parse_args(argv)
    if args.tables:
        print(tables(args.tables))
        return
    run(args)
    print(tables(args.out))


if __name__ == "__main__":
    main()
