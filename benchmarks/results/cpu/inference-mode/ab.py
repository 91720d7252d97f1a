"""One scene at a time on the CPU through the registry, with and without inference mode, A/B in one process.

    PYTHONPATH=src python benchmarks/results/cpu/inference-mode/ab.py > ab.log

For each method: 3 warm-up scenes, then rounds that alternate the registry's inference mode
(risloc.estimators.uses_inference_mode, on by default off CUDA) off and on over the same scenes;
prints the median milliseconds per scene of each and checks that both give the same answers."""
import json
import statistics
import time

import torch

import risloc
from risloc import estimators

torch.set_num_threads(2)
scenes = risloc.simulate(risloc.Scenario(), 40, seed=5)  # default scenario, seed 5 (not a validation or held-out seed)
default_rule = estimators.uses_inference_mode
plan = {"learned": 30, "music": 20, "learned+ml": 10, "ml": 6}
for method, n in plan.items():
    for i in range(3):
        risloc.locate(scenes[i], method)
    times = {"no_grad": [], "inference_mode": []}
    for rnd in range(2):
        for mode in ("no_grad", "inference_mode"):
            estimators.uses_inference_mode = default_rule if mode == "inference_mode" else (lambda device: False)
            for i in range(3, 3 + n):
                t = time.perf_counter()
                risloc.locate(scenes[i], method)
                times[mode].append(time.perf_counter() - t)
    estimators.uses_inference_mode = lambda device: False
    a = risloc.locate(scenes[3 : 3 + n], method)
    estimators.uses_inference_mode = default_rule
    b = risloc.locate(scenes[3 : 3 + n], method)
    same = torch.equal(a.K, b.K) and all(torch.equal(getattr(a, q).nan_to_num(), getattr(b, q).nan_to_num()) for q in ("phi", "theta", "r"))
    row = {"method": method, "scenes": n, "rounds": 2, "no_grad_ms": round(1e3 * statistics.median(times["no_grad"]), 1),
           "inference_mode_ms": round(1e3 * statistics.median(times["inference_mode"]), 1), "same_answers": same}
    print(json.dumps(row), flush=True)
