"""learned on static-signal scenes (validation seeds): its static dictionary (25 x 13 x 14, the default) against a finer one (33 x 17 x 16).

    OMP_NUM_THREADS=1 python study.py SEED N SNR_MIN    # python study.py 1000 400 10

Scenes: N static-signal scenes of the default scenario at SNR_MIN...20 dB. Both variants warmed up on
2 scenes. Writes grid_SEED_SNRMIN.json (success, K accuracy, K-hat < K, K-hat > K, seconds; per scene hit and K-hat).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n, snr_min = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
scenes = risloc.simulate(risloc.Scenario(signal="static", snr_db_min=snr_min, snr_db_max=20), n, seed=seed)
K = scenes.truth.K
variants = {"grid 25x13x14 (default)": {}, "grid 33x17x16": {"ml_options": {"grid_shape": (33, 17, 16)}}}
for kw in variants.values():
    risloc.locate(scenes[:2], "learned", **kw)
out = {}
for name, kw in variants.items():
    t = time.time()
    e = risloc.locate(scenes, "learned", **kw)
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt,
                     ok=ok.tolist(), Khat=e.K.tolist())
    print(seed, snr_min, name, {k: round(v, 4) for k, v in out[name].items() if k not in ("ok", "Khat")}, flush=True)
json.dump(out, open(f"grid_{seed}_{int(snr_min)}.json", "w"))
