"""Inference mode for large CUDA batches: A/B of scenes/s at batch 1024 in one process (one GPU)."""
import json, sys, time
import torch, risloc
from risloc import estimators
default_rule = estimators.uses_inference_mode
scenes = risloc.simulate(risloc.Scenario(), 8192, seed=77).to("cuda")
plan = {"learned": 8192, "learned+ml": 4096, "music": 8192, "ml": 2048}
out = []
for method, n in plan.items():
    s = scenes[:n]
    risloc.locate(s[:1024], method, batch=1024); torch.cuda.synchronize()
    rates = {"no_grad": [], "inference_mode": []}
    ests = {}
    for rnd in range(2):
        for mode in ("no_grad", "inference_mode"):
            estimators.uses_inference_mode = default_rule if mode == "no_grad" else (lambda d: True)
            torch.cuda.synchronize(); t = time.perf_counter()
            e = risloc.locate(s, method, batch=1024); torch.cuda.synchronize()
            rates[mode].append(round(n / (time.perf_counter() - t), 1))
            ests[mode] = e
    estimators.uses_inference_mode = default_rule
    a, b = ests["no_grad"], ests["inference_mode"]
    same = bool(torch.equal(a.K, b.K)) and all(torch.equal(getattr(a, q).nan_to_num(), getattr(b, q).nan_to_num()) for q in ("phi", "theta", "r"))
    row = {"method": method, "scenes": n, "batch": 1024, "scenes_per_s": rates, "same_answers": same}
    print(json.dumps(row), flush=True); out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
