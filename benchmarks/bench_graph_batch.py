"""Large CUDA batches as one replayed CUDA graph: scenes/s, answers and memory against eager batches.

    PYTHONPATH=src python3 benchmarks/bench_graph_batch.py OUT.json [--scenes 4096] [--batch 1024]
        [--methods learned,learned+ml,ml] [--repeats 3] [--compile] [--linalg cusolver]

``risloc.cuda_graphs`` replays a CUDA graph for batches of at most ``GRAPH_MAX_SCENES`` scenes
(default 8: one-scene latency). This script sets that limit to ``--batch`` ("graph") or leaves it
at its default ("eager": a batch of ``--batch`` scenes then runs eagerly) and runs each method on
``--scenes`` default-scenario scenes of the validation seed 1000 drawn on the GPU, in batches of
``--batch``. Per method: one warm-up call per mode on one batch (the graph mode captures there;
its time is recorded as ``first_call_s``), then the two modes alternated ``--repeats`` times on
all scenes, each timed between two device synchronisations; the peak of
``torch.cuda.max_memory_allocated`` over the timed calls; and whether both modes give the same
answers (K-hat per scene, the largest position difference, each mode's success at 10-20 dB).
``--compile``: every method's likelihood steps run through ``ml``'s ``compile`` option;
``--linalg``: the batched factorisations' library (``torch.backends.cuda.preferred_linalg_library``)
in both modes; the registry's own cuSOLVER setting (``risloc._devices.cuda_factorisations``, which
replaces "default" by "cusolver" during every CUDA call) is turned off here, so that "default" is
torch's own choice.
"""
import argparse
import contextlib
import json
import time

import torch

import risloc
from risloc import cuda_graphs, estimators
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
ap.add_argument("--compile", action="store_true", help="the likelihood steps through ml's compile option")
ap.add_argument("--linalg", choices=("default", "cusolver", "magma"), default="default",
                help="torch.backends.cuda.preferred_linalg_library for both modes")
args = ap.parse_args()
estimators.cuda_factorisations = lambda device: contextlib.nullcontext()  # the library is --linalg
dev = torch.device("cuda")
torch.backends.cuda.preferred_linalg_library(args.linalg)
seed = VALIDATION_SEEDS[0]
scenes = risloc.simulate(risloc.Scenario(), args.scenes, seed=seed, device=dev)
default_limit = cuda_graphs.GRAPH_MAX_SCENES
limits = {"eager": default_limit, "graph": args.batch}
res = {"provenance": stamp(seed=seed, device=dev), "scenes": args.scenes, "batch": args.batch,
       "compile": args.compile, "linalg": args.linalg, "default_graph_max_scenes": default_limit, "methods": {}}


def options(method: str) -> dict:
    if not args.compile:
        return {}
    return {"compile": True} if method == "ml" else {"ml_options": {"compile": True}}


def run(method: str, mode: str, s):
    cuda_graphs.GRAPH_MAX_SCENES = limits[mode]
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        est = risloc.locate(s, method, batch=args.batch, **options(method))
        torch.cuda.synchronize()
        return est, time.perf_counter() - t
    finally:
        cuda_graphs.GRAPH_MAX_SCENES = default_limit


for method in args.methods.split(","):
    row = {"first_call_s": {}, "scenes_per_s": {"eager": [], "graph": []}, "peak_GiB": {}}
    res["methods"][method] = row
    try:
        for mode in limits:
            row["first_call_s"][mode] = round(run(method, mode, scenes[:args.batch])[1], 2)
        answers = {}
        for _ in range(args.repeats):
            for mode in limits:
                torch.cuda.reset_peak_memory_stats()
                est, dt = run(method, mode, scenes)
                row["scenes_per_s"][mode].append(round(args.scenes / dt))
                row["peak_GiB"][mode] = max(row["peak_GiB"].get(mode, 0.0),
                                            round(torch.cuda.max_memory_allocated() / 2**30, 2))
                answers[mode] = est
        same = agreement(answers["eager"], answers["graph"])
        row["same_K_fraction"], row["max_position_difference"] = same["same_K_fraction"], same["max_difference"]
        row["success_10_20_dB"] = {mode: round(float(score(scenes, est).subset(10, 20).overall.success), 4)
                                   for mode, est in answers.items()}
        row["graph_reserved_GiB"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    except RuntimeError as exc:  # e.g. out of memory in the capture: recorded, the next method runs
        row["error"] = str(exc)[:500]
    print(method, json.dumps(row), flush=True)
    torch.cuda.empty_cache()
atomic_write_text(args.out, json.dumps(res, indent=1))
