"""Throughput of risloc.crb on the default scenario: scenes per second.

    python benchmarks/bench_crb.py --device cpu  [--scenes 4096] [--batch 256] [--signal both]
    python benchmarks/bench_crb.py --device cuda --scenes 65536 --batch 2048

Scenes come from risloc.simulate (default Scenario, K ~ U{1..5}); the timing covers
crb_for_scenes only (steering derivatives, Fisher matrices, inversion), after one warm-up
call, best of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

import risloc
from risloc._provenance import stamp
from risloc.bench import sync_device
from risloc.crb import crb_for_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=None, help="scenes per vectorised step (default: crb's)")
    ap.add_argument("--signal", choices=("stochastic", "static", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sc = risloc.Scenario()
    scenes = risloc.simulate(sc, args.scenes, seed=args.seed, device=device)
    signals = ("stochastic", "static") if args.signal == "both" else (args.signal,)
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "scenes": args.scenes,
        "batch": args.batch,
        "torch": torch.__version__,
        "provenance": stamp(seed=args.seed, device=device, config=vars(args)),
    }
    for signal in signals:
        crb_for_scenes(scenes[: min(256, args.scenes)], signal=signal, batch=args.batch)  # warm-up
        best = best_cpu = math.inf
        for _ in range(args.repeat):
            sync_device(device)
            t0, c0 = time.perf_counter(), time.process_time()
            res = crb_for_scenes(scenes, signal=signal, batch=args.batch)
            sync_device(device)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        active = torch.isfinite(res.phi)
        med = lambda t: float(t[active].median())  # noqa: E731
        out[signal] = {
            "scenes_per_s": args.scenes / best,
            "seconds": best,
            "process_cpu_seconds": best_cpu,  # on a shared CPU, scenes / CPU-second is the steadier figure
            "median_sqrt_crb_phi_deg": math.degrees(med(res.phi)),
            "median_sqrt_crb_theta_deg": math.degrees(med(res.theta)),
            "median_sqrt_crb_r_m": med(res.r),
            "irregular_scenes": int((~res.regular).sum()),
        }
        print(f"{signal:>10}: {args.scenes / best:10.0f} scenes/s  ({best:.3f} s wall, {best_cpu:.3f} s CPU "
              f"for {args.scenes} scenes on {device}, {torch.get_num_threads()} threads)")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
