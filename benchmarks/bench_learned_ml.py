"""Variants of the likelihood stage of ``learned`` / ``learned+ml`` on the same scenes: refinement steps, over-proposal, growth, pruning.

    PYTHONPATH=src python3 benchmarks/bench_learned_ml.py --scenes 1000 --device cpu --threads 2 --json out.json
    PYTHONPATH=src python3 benchmarks/bench_learned_ml.py --scenes 4000 --device cuda

Runs the packaged network once (``--checkpoint`` for another; its K-hat strongest detections),
then ``ml`` started from them (``init=``) with every option set of ``--variants`` (JSON list of dicts of
``ml`` options, plus ``"over": g`` for an over-proposal start, min(K-hat + g, K_max) sources, the
network's strongest detections; default: final_iterations 25 / 12 / 8, each
with init_prune 0 and 1), and prints success (overall and 10-20 dB), K_acc and the second
stage's scenes/s. The scenes are the first ``--scenes`` of the stream ``--seed`` (drawn on the
CPU); choose options on a validation seed (default 1000), never on the held-out seed of the
README's tables.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.bench import sync_device
from risloc.estimators import get
from risloc.metrics import score
from risloc.nn.inference import _learned, over_init
from risloc.scenes import Estimates

DEFAULT_VARIANTS = [{"iterations": it, "init_prune": p} for it in (25, 12, 8) for p in (0, 1)]


def _row(scenes, est, seconds) -> dict:
    sc = score(scenes.truth, est, snr_db=scenes.snr_db)
    hi = sc.subset(10.0, 20.0).overall
    return {"success": sc.overall.success, "success_10_20": hi.success, "K_acc": sc.overall.K_acc, "K_acc_10_20": hi.K_acc,
            "K_over": sc.overall.K_over, "K_under": sc.overall.K_under,
            "seconds": round(seconds, 3), "scenes_per_s": round(len(scenes) / max(seconds, 1e-9), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default=None, help="JSON list of ml option dicts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--with-ml", action="store_true", help="also run ml itself on the same scenes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scenes = risloc.simulate(risloc.Scenario(), args.scenes, seed=args.seed).to(device)
    variants = json.loads(args.variants) if args.variants else DEFAULT_VARIANTS
    sync_device(device)
    t = time.perf_counter()
    # the network, before refinement, in the registry's batches of learned (its candidates are not an estimator's output)
    step = get("learned").info.batch_for(device)
    parts = [_learned(scenes[a : a + step], args.checkpoint, None, True, None, candidates=True, stage="detections")
             for a in range(0, len(scenes), step)]
    first, cand = Estimates.cat([p[0] for p in parts]), Estimates.cat([p[1] for p in parts])
    sync_device(device)
    rows = [{"stage": "network (K-hat detections)", **_row(scenes, first, time.perf_counter() - t)}]
    print(json.dumps(rows[-1]), flush=True)
    if args.with_ml:
        get("ml")(scenes[:64])  # warm-up
        sync_device(device)
        t = time.perf_counter()
        est = get("ml")(scenes)
        sync_device(device)
        rows.append({"stage": "ml", **_row(scenes, est, time.perf_counter() - t)})
        print(json.dumps(rows[-1]), flush=True)
    for v in variants:
        opts = {k: x for k, x in v.items() if k != "over"}
        init = over_init(cand, first.K, int(v["over"])) if v.get("over") else first
        get("ml")(scenes[:64], init=init[:64], **opts)  # warm-up
        sync_device(device)
        t = time.perf_counter()
        est = get("ml")(scenes, init=init, **opts)
        sync_device(device)
        rows.append({"stage": "ml from learned", "options": v, **_row(scenes, est, time.perf_counter() - t)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"scenes": args.scenes, "seed": args.seed, "device": str(device), "torch": torch.__version__,
                                                 "rows": rows, "provenance": stamp(seed=args.seed, device=device, config=vars(args))},
                                                indent=1))


if __name__ == "__main__":
    main()
