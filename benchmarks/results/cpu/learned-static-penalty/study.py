"""The order penalty of learned's likelihood stage on static-signal scenes at 10-20 dB (validation seeds).

    python study.py SEED N TAU[,TAU...]     # e.g. python study.py 1000 400 10,12,14

Simulates N static-signal scenes of the default scenario at 10-20 dB with the seed SEED, runs
``learned`` with ``ml_options={"penalty_static": TAU}`` for each TAU (14 is ``ml``'s calibrated
default) and ``ml`` itself on the CPU, and prints / writes success, K accuracy, the shares of
scenes with K-hat < K and K-hat > K, and the seconds taken to static_penalty_SEED_TAUS.json.
"""
import json
import sys
import time

import risloc
from risloc.metrics import success_mask

seed, n = int(sys.argv[1]), int(sys.argv[2])
sc = risloc.Scenario(signal="static", snr_db_min=10, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
out = {}
for tau in ["ml"] + sys.argv[3].split(","):
    method, options = ("ml", {}) if tau == "ml" else ("learned", {"ml_options": {"penalty_static": float(tau)}})
    t = time.time()
    e = risloc.locate(scenes, method, **options)
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[tau] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                    K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, tau, out[tau], flush=True)
json.dump(out, open(f"static_penalty_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"), indent=1)
