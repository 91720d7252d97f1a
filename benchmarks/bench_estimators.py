"""Accuracy and speed of the classical estimators on simulated default scenes.

    python benchmarks/bench_estimators.py --scenes 2000 --seed 0 --device cuda --out bench-out
    python benchmarks/bench_estimators.py --methods music,mvdr,ml,ramezani --crb
    python benchmarks/bench_estimators.py --single 500          # + MUSIC on K=1 at 20 dB

For each method (default music, mvdr; any registered name): success, K_acc, RMSEs overall,
for SNR in [10, 20] dB and [-5, 20] dB and per 5 dB bin (risloc.metrics.score), optionally
RMSE/sqrt(CRB) and the CRB-efficient success (--crb, risloc.crb.crb_for_scenes), and
scenes/s (estimator time only, CUDA synchronised; one warm-up batch first). Writes
bench_estimators.md and bench_estimators.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc import metrics
from risloc.bench import sync_device
from risloc.estimators import get


def run_method(name: str, scenes, *, batch: int, device, options: dict) -> tuple[risloc.Estimates, float]:
    fn = get(name)
    inputs = risloc.Scenes(scenes.y, scenes.H, scenes.codes, scenes.scenario, scenes.snr_db)  # no truth for the estimator
    fn(inputs[: min(len(inputs), batch)], batch=batch, **options)  # warm-up (grid cache, kernels)
    sync_device(device)
    t0 = time.perf_counter()
    parts = [fn(inputs[s : s + batch], batch=batch, **options) for s in range(0, len(inputs), batch)]
    sync_device(device)
    dt = time.perf_counter() - t0
    return risloc.Estimates.cat(parts), dt


def summary_row(name: str, m) -> dict:
    d = m.to_dict()
    keep = ("n_scenes", "success", "K_acc", "K_under", "K_over", "f1", "rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "rmse_rel_r", "n_pairs",
            "crb_ratio_phi", "crb_ratio_theta", "crb_ratio_r", "success_crb")
    return {"group": name, **{k: d.get(k) for k in keep}}


def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="music,mvdr", help="comma-separated estimator names")
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--crb", action="store_true", help="also RMSE/sqrt(CRB) and CRB-efficient success")
    p.add_argument("--single", type=int, default=0, help="also MUSIC (oracle K) on this many K=1 scenes at 20 dB")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    sc = risloc.Scenario()
    scenes = risloc.Scenes.cat(list(risloc.simulate_chunks(sc, args.scenes, seed=args.seed, chunk=4096, device=device)))
    crb = None
    if args.crb:
        from risloc.crb import crb_for_scenes

        crb = crb_for_scenes(scenes)
    results = {"scenes": args.scenes, "seed": args.seed, "device": str(device), "batch": args.batch, "methods": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    md = [f"# Classical estimators: {args.scenes} default scenes (seed {args.seed}, device {device})", ""]
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        est, dt = run_method(name, scenes, batch=args.batch, device=device, options={})
        s = metrics.score(scenes.truth, est.to("cpu"), snr_db=scenes.snr_db.cpu(), crb=crb)
        rows = [summary_row("all", s.overall), summary_row("SNR 10–20 dB", s.subset(10, 20).overall), summary_row("SNR −5–20 dB", s.subset(-5, 20).overall)]
        sd = s.to_dict()
        results["methods"][name] = {"scenes_per_s": len(scenes) / dt, "seconds": dt, "summary": rows, "score": sd, "method": est.method}
        md += [f"## {name} — {len(scenes) / dt:.1f} scenes/s ({dt:.2f} s)", ""]
        cols = list(rows[0].keys())
        md += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
        print(f"{name}: {len(scenes) / dt:.1f} scenes/s; " + ", ".join(f"{k} {fmt(rows[0][k])}" for k in ("success", "K_acc", "rmse_phi_deg", "rmse_rel_r")), flush=True)
        md += ["", s.format_table(), ""]
    if args.single:
        sc1 = sc.replace(k_fixed=1, snr_db_min=20.0, snr_db_max=20.0)
        s1 = risloc.Scenes.cat(list(risloc.simulate_chunks(sc1, args.single, seed=args.seed + 1, chunk=4096, device=device)))
        music = get("music")
        sync_device(device)
        t0 = time.perf_counter()
        est = risloc.Estimates.cat([music(s1[a : a + args.batch], K=s1.truth.K[a : a + args.batch]) for a in range(0, len(s1), args.batch)])
        sync_device(device)
        dt = time.perf_counter() - t0
        o = metrics.score(s1.truth, est.to("cpu"), snr_db=s1.snr_db.cpu()).overall
        results["music_single_20db"] = {"scenes": args.single, "success": o.success, "rmse_phi_deg": o.rmse_phi_deg, "rmse_rel_r": o.rmse_rel_r, "scenes_per_s": args.single / dt}
        md += [f"## MUSIC, oracle K, single sources at 20 dB ({args.single} scenes)", "", f"success {o.success:.3f}, RMSE φ {o.rmse_phi_deg:.3g}°, RMSE Δr/r {o.rmse_rel_r:.3g}", ""]
        print(md[-2], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_estimators.md").write_text("\n".join(md) + "\n")
    results["provenance"] = stamp(seed=args.seed, device=device, config=vars(args))
    atomic_write_text(out / "bench_estimators.json", json.dumps(results, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)) + "\n")
    for name, r in results["methods"].items():
        print(f"{name}: {r['scenes_per_s']:.1f} scenes/s, success {r['summary'][0]['success']:.3f}, K_acc {r['summary'][0]['K_acc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
