"""Variants of learned's likelihood stage on static-signal scenes at 10-20 dB (validation seeds).

    python study.py SEED N VARIANT[,VARIANT...]     # e.g. python study.py 1000 400 ml,learned,grow2,over2

Simulates N static-signal scenes of the default scenario at 10-20 dB with the seed SEED, runs each
variant (see ``variants``) on the CPU and prints / writes success, K accuracy and the share of
scenes with K-hat < K (``risloc.metrics.success_mask``) and the seconds taken to
static_var_SEED_VARIANTS.json.
"""
import sys, time, torch, json
import risloc
from risloc.metrics import success_mask
seed = int(sys.argv[1]); n = int(sys.argv[2])
sc = risloc.Scenario(signal="static", snr_db_min=10, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
variants = {"ml": ("ml", {}), "learned": ("learned", {}), "grow2": ("learned", {"grow": 2}), "over2": ("learned", {"over": 2}),
            "grow2over2": ("learned", {"grow": 2, "over": 2}), "grow3": ("learned", {"grow": 3}), "m_learned": ("learned", {"checkpoint": "mixed"}), "m_grow2": ("learned", {"grow": 2, "checkpoint": "mixed"})}
out = {}
for name in sys.argv[3].split(","):
    m, o = variants[name]
    t = time.time(); e = risloc.locate(scenes, m, **o); dt = time.time() - t
    ok = success_mask(scenes, e); K = scenes.truth.K
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()), K_under=float((e.K < K).float().mean()), s=dt)
    print(seed, name, out[name], flush=True)
json.dump(out, open(f"static_var_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"))
