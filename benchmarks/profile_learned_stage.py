"""Where ``learned``'s likelihood stage spends its time on CUDA, by function of ``ml``.

    PYTHONPATH=src python3 benchmarks/profile_learned_stage.py OUT.json

On 8 192 scenes of the validation seed 1000, batches of 1 024 and 4 096: the packaged network's
detections (``learned``'s start), then ``ml``'s ``init`` path with ``learned``'s options (the
files of earlier commits ran that commit's stage), with ``ml``'s functions
wrapped to record their inclusive time between two device synchronisations (the wrappers add
synchronisations, so the total is slower than an unwrapped run; nested functions are counted
in their callers too). Writes microseconds per scene per function and the total.
"""
import collections
import json
import sys
import time

import torch
import risloc
from risloc._files import atomic_write_text
from risloc.estimators import get, ml as M
from risloc.nn.inference import LEARNED_OVER, _start, stage_options
from risloc.scenes import Estimates
dev = torch.device("cuda")
scenes = risloc.simulate(risloc.Scenario(), 8192, seed=1000).to(dev)
first = Estimates.cat([_start(scenes[a:a + 1024], None, None, True, None, None, LEARNED_OVER)[1] for a in range(0, 8192, 1024)])
acc = collections.defaultdict(float)
def wrap(name):
    f = getattr(M, name)
    def g(*a, **k):
        torch.cuda.synchronize(); t = time.perf_counter()
        out = f(*a, **k)
        torch.cuda.synchronize(); acc[name] += time.perf_counter() - t
        return out
    setattr(M, name, g)
for n in ["_measured_dictionary", "_add_stochastic", "_refine", "_drop_one", "_ls_powers", "_decide_range", "_grow", "_relax", "_prune", "_evaluate", "unit_power"]:
    wrap(n)
ml = get("ml")
opts = stage_options("stochastic")
res = {}
for B in (1024, 4096):
    ml(scenes[:B], init=first[:B], batch=B, **opts)
    acc.clear(); torch.cuda.synchronize(); t = time.perf_counter()
    for a in range(0, 8192, B):
        ml(scenes[a:a + B], init=first[a:a + B], batch=B, **opts)
    torch.cuda.synchronize(); tot = time.perf_counter() - t
    res[B] = {"total_us_per_scene": tot / 8192 * 1e6, **{k: v / 8192 * 1e6 for k, v in acc.items()}}
    print(B, json.dumps({k: round(v, 1) for k, v in res[B].items()}), flush=True)
atomic_write_text(sys.argv[1], json.dumps(res, indent=1))
