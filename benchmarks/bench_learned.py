"""Benchmark of the learned pipeline: accuracy against MUSIC, SNR-label robustness, speed.

    python benchmarks/bench_learned.py --checkpoint runs/quick/best.pt --scenes 1000 --device cpu
    python benchmarks/bench_learned.py --checkpoint runs/gpu/best.pt --scenes 20000 --device cuda --train-speed

On held-out simulated scenes (``--seed``, default 2_000_003: neither the training stream nor
the validation set) it prints and writes (``--json``) for ``music`` and ``learned``: success,
K_acc, K_under, K_over, phi/theta/r RMSE; for ``learned`` also with the SNR label shifted by
+-3 dB, with random label errors of 3 dB std, and without labels (estimated from the data).
``--train-speed`` also times training steps (scenes/s) of the checkpoint's configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

import risloc
from risloc._provenance import stamp
from risloc.estimators import get
from risloc.metrics import score


def _row(name, scenes, est, seconds):
    o = score(scenes.truth, est, snr_db=scenes.snr_db).overall
    return {"method": name, "success": o.success, "K_acc": o.K_acc, "K_under": o.K_under, "K_over": o.K_over,
            "rmse_phi_deg": o.rmse_phi_deg, "rmse_theta_deg": o.rmse_theta_deg, "rmse_r_m": o.rmse_r_m,
            "n_pairs": o.n_pairs, "seconds": round(seconds, 2), "scenes_per_s": round(len(scenes) / max(seconds, 1e-9), 1)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2_000_003)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-robustness", action="store_true")
    ap.add_argument("--train-speed", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sc = risloc.Scenario()
    scenes = risloc.simulate(sc, args.scenes, seed=args.seed, device=args.device)
    rows = []

    t = time.time()
    est = get("music")(scenes, batch=args.batch)
    _sync(args.device)
    rows.append(_row("music", scenes, est, time.time() - t))

    learned = get("learned")
    variants = [("learned", scenes, {})]
    if not args.no_robustness:
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        noisy = scenes.snr_db + 3.0 * torch.randn(len(scenes), generator=g, device=args.device)
        variants += [
            ("learned, SNR label +3 dB", dataclasses.replace(scenes, snr_db=scenes.snr_db + 3.0), {}),
            ("learned, SNR label -3 dB", dataclasses.replace(scenes, snr_db=scenes.snr_db - 3.0), {}),
            ("learned, SNR label +-3 dB random", dataclasses.replace(scenes, snr_db=noisy), {}),
            ("learned, no SNR label (estimated)", scenes, {"use_snr": False}),
            ("music, no SNR label (estimated)", scenes, None),
        ]
    for name, s, kw in variants:
        t = time.time()
        if kw is None:
            est = get("music")(s, batch=args.batch, use_snr=False)
        else:
            est = learned(s, checkpoint=args.checkpoint, device=args.device, batch=args.batch, **kw)
        _sync(args.device)
        # score against the TRUE SNR bins whatever label the estimator saw
        rows.append(_row(name, dataclasses.replace(s, snr_db=scenes.snr_db), est, time.time() - t))

    result = {"machine": f"{platform.processor() or platform.machine()} threads={torch.get_num_threads()} device={args.device}",
              "scenes": args.scenes, "seed": args.seed, "checkpoint": args.checkpoint, "rows": rows,
              "provenance": stamp(seed=args.seed, device=args.device, config=vars(args))}
    if args.train_speed:
        result["train_scenes_per_s"] = train_speed(args.checkpoint, args.device)

    print(f"{'method':36s} {'success':>8s} {'K_acc':>6s} {'under':>6s} {'over':>6s} {'phi°':>6s} {'theta°':>6s} {'r m':>6s} {'scn/s':>7s}")
    for r in rows:
        print(f"{r['method']:36s} {r['success']:8.3f} {r['K_acc']:6.3f} {r['K_under']:6.3f} {r['K_over']:6.3f} "
              f"{r['rmse_phi_deg']:6.2f} {r['rmse_theta_deg']:6.2f} {r['rmse_r_m']:6.2f} {r['scenes_per_s']:7.1f}")
    print(result["machine"], f"scenes={args.scenes} seed={args.seed}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


def train_speed(checkpoint, device, steps: int = 20) -> float:
    """Training scenes per second of the checkpoint's configuration (stream data, AMP as configured)."""
    import tempfile

    from risloc.nn.checkpoint import load_checkpoint
    from risloc.nn.config import TrainConfig, apply_overrides
    from risloc.nn.train import train

    cfg = TrainConfig.from_toml(load_checkpoint(checkpoint)["config"])
    cfg = apply_overrides(cfg, {"device": device, "epochs": 1, "steps_per_epoch": steps, "train_scenes": 0, "val_scenes": 64,
                                "val_locate": False, "calibrate": False, "log_every": 10**9})
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        summary = train(cfg, out, log=lambda s: None)
    return cfg.batch * steps / summary["time_s"]


if __name__ == "__main__":
    main()
