"""learned with its likelihood stage's dictionary equal to the network's front-end grid
(24 x 12 x 12) against the signal model's default dictionary (stochastic 21 x 11 x 12, static
25 x 13 x 14), on validation seeds at 10-20 dB: default scenes, static signals, dft codes.

    python study.py SEED N CASE[,CASE...]      # python study.py 1000 400 default,static,dft

Writes grid_SEED_CASES.json: per case and variant success, K accuracy, K-hat < K, K-hat > K, seconds.
"""
import json, sys, time

import torch

import risloc
from risloc.metrics import success_mask

torch.set_num_threads(2)
seed, n = int(sys.argv[1]), int(sys.argv[2])
cases = {"default": {}, "static": {"signal": "static"}, "dft": {"codebook": "dft"}}
variants = {"learned": {}, "grid_net": {"ml_options": {"grid_shape": (24, 12, 12)}}}
out = {}
for case in sys.argv[3].split(","):
    sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, **cases[case])
    scenes = risloc.simulate(sc, n, seed=seed)
    K = scenes.truth.K
    for name, opts in variants.items():
        t = time.time()
        e = risloc.locate(scenes, "learned", **opts)
        dt = time.time() - t
        ok = success_mask(scenes, e)
        r = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                 K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
        out[f"{case}/{name}"] = r
        print(seed, case, name, {k: round(v, 4) for k, v in r.items()}, flush=True)
json.dump(out, open(f"grid_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"), indent=1)
