"""Accuracy and speed of the ``ml`` estimator on simulated default scenes.

    python benchmarks/bench_ml.py --device cuda --scenes 2000 --batch 256
    python benchmarks/bench_ml.py --device cpu --scenes 200 --threads 1

Prints success / K_acc / RMSE (and RMSE / sqrt(CRB) when risloc.crb is present) per SNR
range, the throughput in scenes per second (estimation only; the first batch is a
warm-up that is not timed) and the working memory of the timed run: on CUDA the peak of
allocated memory above what was allocated before it; on the CPU the process's peak resident
set (Linux) above its resident set before it (the warm-up ran the same batch size, so its
peak is no higher). Scoring is risloc.metrics.score.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.bench import sync_device
from risloc.estimators import get
from risloc.crb import crb as crb_fn
from risloc.metrics import score

RANGES = [(-5, 0), (0, 5), (5, 10), (10, 15), (15, 20), (10, 20), (-5, 20)]


def _rss_mb() -> float:
    """The process's resident set now [MiB] (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--batch", type=int, default=None, help="scenes per estimator chunk (default: estimator's)")
    ap.add_argument("--signal", default="stochastic", choices=["stochastic", "static"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--no-crb", action="store_true", help="skip the CRB ratios")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="estimator options, e.g. relax_cycles=0")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = {}
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v

    sc = risloc.Scenario(signal=args.signal)
    scenes = risloc.simulate(sc, args.scenes, seed=args.seed, device=device)
    ml = get("ml")
    warm = min(len(scenes), args.batch or 16)
    ml(scenes[:warm], batch=args.batch, **opts)  # warm-up (dictionary cache, kernels)
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    else:
        mem0 = _rss_mb()
    t0 = time.perf_counter()
    est = ml(scenes, batch=args.batch, **opts)
    sync_device(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - mem0) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - mem0
    est = est.to("cpu")
    scenes_cpu = scenes.to("cpu")
    snr = scenes_cpu.snr_db.numpy()
    thread_note = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    print(f"ml on {args.scenes} default scenes ({args.signal}), seed {args.seed}, device {device}{thread_note}")
    print(f"time {dt:.1f} s -> {args.scenes / dt:.2f} scenes/s; working memory {peak_mb:.0f} MiB")

    crb = None
    if not args.no_crb:
        t = scenes_cpu.truth
        crb = crb_fn(scenes_cpu.H, scenes_cpu.codes, t.phi, t.theta, t.r, t.power, t.noise_var, sc,
                     signal=args.signal, K=t.K)

    rows = []
    sco = score(scenes_cpu, est, crb=crb)
    for lo, hi in RANGES:
        mask = (snr >= lo) & (snr < hi if hi < 20 else snr <= hi)
        if not mask.any():
            continue
        m = sco.select(mask).overall
        rows.append(dict(snr=f"[{lo},{hi})", n=int(mask.sum()), success=m.success, K_acc=m.K_acc,
                         K_under=m.K_under, K_over=m.K_over, rmse_phi_deg=m.rmse_phi_deg,
                         rmse_theta_deg=m.rmse_theta_deg, rmse_r_m=m.rmse_r_m, rmse_rel_r=m.rmse_rel_r,
                         crb_ratio_phi=m.crb_ratio_phi, crb_ratio_theta=m.crb_ratio_theta,
                         crb_ratio_r=m.crb_ratio_r, success_crb=m.success_crb))
    hdr = f"{'SNR dB':>10} {'n':>5} {'success':>8} {'K_acc':>6} {'phi°':>6} {'th°':>6} {'r m':>6} {'Δr/r':>6} {'φ/√CRB':>7} {'θ/√CRB':>7} {'succ_CRB':>8}"
    print(hdr)
    f = lambda x, w=6, p=3: f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) and x is not None and np.isfinite(x) else f"{'-':>{w}}"
    for r in rows:
        print(f"{r['snr']:>10} {r['n']:>5} {f(r['success'], 8)} {f(r['K_acc'])} {f(r['rmse_phi_deg'])} "
              f"{f(r['rmse_theta_deg'])} {f(r['rmse_r_m'])} {f(r.get('rmse_rel_r'))} {f(r.get('crb_ratio_phi'), 7, 2)} "
              f"{f(r.get('crb_ratio_theta'), 7, 2)} {f(r.get('success_crb'), 8)}")
    if args.json:
        atomic_write_text(args.json, json.dumps(dict(
            device=str(device), scenes=args.scenes, seed=args.seed, signal=args.signal,
            seconds=dt, scenes_per_s=args.scenes / dt, peak_memory_mib=peak_mb,
            load_average=list(os.getloadavg()), rows=rows, options=opts,
            provenance=stamp(seed=args.seed, device=device, config=vars(args))), indent=1, default=str))


if __name__ == "__main__":
    main()
