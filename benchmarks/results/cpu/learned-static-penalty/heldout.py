"""The default stage and the finer option of learned on the held-out static-signal scenes (CPU).

    python heldout.py default        # or: python heldout.py grow3_grid_ml

The 1 000 held-out static-signal scenes of the README's table (risloc.seeds.HELD_OUT_SEED, default
scenario with signal = "static", -5...20 dB); prints and writes heldout_VARIANT.json: success over
-5...20 dB and at 10...20 dB, K accuracy and K-hat < K at 10...20 dB, seconds.
"""
import json
import sys
import time

import risloc
from risloc.metrics import success_mask
from risloc.seeds import HELD_OUT_SEED

name = sys.argv[1]
options = {"default": {}, "grow3_grid_ml": {"grow": 3, "ml_options": {"grid_shape": (25, 13, 14)}}}[name]
scenes = risloc.simulate(risloc.Scenario(signal="static"), 1000, seed=HELD_OUT_SEED)
t = time.time()
e = risloc.locate(scenes, "learned", **options)
dt = time.time() - t
ok, K, snr = success_mask(scenes, e), scenes.truth.K, scenes.snr_db
hi = (snr >= 10) & (snr <= 20)
out = dict(success=float(ok.float().mean()), success_10_20=float(ok[hi].float().mean()), n_10_20=int(hi.sum()),
           K_acc_10_20=float((e.K == K)[hi].float().mean()), K_under_10_20=float((e.K < K)[hi].float().mean()), s=dt)
print(name, out, flush=True)
json.dump(out, open(f"heldout_{name}.json", "w"), indent=1)
