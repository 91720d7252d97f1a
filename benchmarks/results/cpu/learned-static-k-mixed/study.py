"""learned on static-signal scenes at 10-20 dB (validation seeds), with its packaged default network:
the default stage against three growth steps with ml's 25 x 13 x 14 dictionary, and ml.

    python study.py SEED N VARIANT[,VARIANT...]     # python study.py 1000 400 learned,grow3_grid_ml,ml

Writes static_SEED_VARIANTS.json (success, K accuracy, K-hat < K, K-hat > K, seconds).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n = int(sys.argv[1]), int(sys.argv[2])
sc = risloc.Scenario(signal="static", snr_db_min=10, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
variants = {"learned": {}, "grid_ml": {"ml_options": {"grid_shape": (25, 13, 14)}}, "relax2": {"relax": 2},
            "grow3_grid_ml": {"grow": 3, "ml_options": {"grid_shape": (25, 13, 14)}}}
out = {}
for name in sys.argv[3].split(","):
    t = time.time()
    e = risloc.locate(scenes, "ml") if name == "ml" else risloc.locate(scenes, "learned", **variants[name])
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
json.dump(out, open(f"static_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"), indent=1)
