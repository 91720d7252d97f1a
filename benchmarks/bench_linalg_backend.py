"""Scenes/s of the estimators on CUDA with torch's default factorisation library against cuSOLVER/cuBLAS.

    PYTHONPATH=src python3 benchmarks/bench_linalg_backend.py OUT.json [--scenes 4096] [--batch 1024]
        [--methods learned,learned+ml,ml] [--repeats 3]

torch chooses per call between MAGMA and cuSOLVER/cuBLAS for batched factorisations
(``torch.backends.cuda.preferred_linalg_library``, "default"); for batches of more than 16
matrices larger than 16 x 16 its default is MAGMA, whose batched routines cannot be captured in
a CUDA graph. This script runs each method on ``--scenes`` default-scenario scenes of the
validation seed 1000 drawn on the GPU, in batches of ``--batch`` (eagerly: larger than
``risloc.cuda_graphs.GRAPH_MAX_SCENES``), with the library set to "default" and to "cusolver"
in turn, ``--repeats`` times after one warm-up call each, timed between two device
synchronisations; and compares the answers (K-hat per scene, largest position difference,
success at 10-20 dB). The script sets the library itself: the registry's own cuSOLVER setting
(``risloc._devices.cuda_factorisations``, which replaces "default" by "cusolver" during every
CUDA call) is turned off here, so that "default" is torch's own choice.
"""
import argparse
import contextlib
import json
import time

import torch

import risloc
from risloc import estimators
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.metrics import agreement, score
from risloc.seeds import VALIDATION_SEEDS

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--scenes", type=int, default=4096)
ap.add_argument("--batch", type=int, default=1024)
ap.add_argument("--methods", default="learned,learned+ml,ml")
ap.add_argument("--repeats", type=int, default=3)
args = ap.parse_args()
estimators.cuda_factorisations = lambda device: contextlib.nullcontext()  # the library is this script's choice
dev = torch.device("cuda")
seed = VALIDATION_SEEDS[0]
scenes = risloc.simulate(risloc.Scenario(), args.scenes, seed=seed, device=dev)
libraries = ("default", "cusolver")
res = {"provenance": stamp(seed=seed, device=dev), "scenes": args.scenes, "batch": args.batch, "methods": {}}


def run(method: str, library: str, s):
    torch.backends.cuda.preferred_linalg_library(library)
    torch.cuda.synchronize()
    t = time.perf_counter()
    est = risloc.locate(s, method, batch=args.batch)
    torch.cuda.synchronize()
    return est, time.perf_counter() - t


for method in args.methods.split(","):
    row = {"scenes_per_s": {lib: [] for lib in libraries}}
    for lib in libraries:
        run(method, lib, scenes[:args.batch])
    answers = {}
    for _ in range(args.repeats):
        for lib in libraries:
            answers[lib], dt = run(method, lib, scenes)
            row["scenes_per_s"][lib].append(round(args.scenes / dt))
    same = agreement(answers["default"], answers["cusolver"])
    row["same_K_fraction"], row["max_position_difference"] = same["same_K_fraction"], same["max_difference"]
    row["success_10_20_dB"] = {lib: round(float(score(scenes, est).subset(10, 20).overall.success), 4)
                               for lib, est in answers.items()}
    res["methods"][method] = row
    print(method, json.dumps(row), flush=True)
torch.backends.cuda.preferred_linalg_library("default")
atomic_write_text(args.out, json.dumps(res, indent=1))
