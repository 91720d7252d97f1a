"""Scenes/s and peak GPU memory of ``learned`` and ``learned+ml`` end to end, by batch size.

    PYTHONPATH=src python3 benchmarks/bench_learned_batch.py OUT.json [--scenes 8192] [--batches 1024,2048,4096]

On ``--scenes`` scenes of the validation seed 1000 drawn on the GPU (packaged default network,
default options): each estimator is called once on one batch (warm-up), then on all scenes with
``batch=B``, timed between two device synchronisations; ``torch.cuda.max_memory_allocated``
over that call is the peak. This is what chose the estimators' default batch on CUDA
(``EstimatorInfo.batch_cuda``).
"""
import argparse
import json
import time

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.estimators import get
from risloc.seeds import VALIDATION_SEEDS

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--scenes", type=int, default=8192)
ap.add_argument("--batches", default="1024,2048,4096")
args = ap.parse_args()
dev = torch.device("cuda")
seed = VALIDATION_SEEDS[0]
scenes = risloc.simulate(risloc.Scenario(), args.scenes, seed=seed, device=dev)
res = {"provenance": stamp(seed=seed, device=dev), "scenes": args.scenes, "runs": {}}
for name in ("learned", "learned+ml"):
    est = get(name)
    for b in (int(x) for x in args.batches.split(",")):
        est(scenes[:b], batch=b, progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        est(scenes, batch=b, progress=False)
        torch.cuda.synchronize()
        row = {"scenes_per_s": round(args.scenes / (time.perf_counter() - t)),
               "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        res["runs"][f"{name} batch {b}"] = row
        print(name, b, row, flush=True)
atomic_write_text(args.out, json.dumps(res, indent=1))
