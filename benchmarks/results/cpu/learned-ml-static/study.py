"""learned+ml on static-signal scenes (validation seeds): its default stage against the static stage
of learned (three growth steps, every source re-searched by RELAX), with learned and ml beside.

    python study.py SEED N SNR_MIN VARIANT[,VARIANT...] [SUFFIX]    # python study.py 1000 400 10 lml,lml_static,learned,ml

Scenes: N static-signal scenes of the default scenario at SNR_MIN...20 dB. Writes
static_SEED_SNRMIN[SUFFIX].json (success, K accuracy, K-hat < K, K-hat > K, seconds per variant).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n, snr_min = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sc = risloc.Scenario(signal="static", snr_db_min=snr_min, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
variants = {"lml": ("learned+ml", {}),
            "lml_static": ("learned+ml", {"grow": 3, "ml_options": {"relax_sources": 0}}),
            "lml_prune2": ("learned+ml", {"prune": 2}), "learned": ("learned", {}),
            "learned_prune2": ("learned", {"prune": 2}), "learned_grow4": ("learned", {"grow": 4}), "ml": ("ml", {})}
out = {}
for name in sys.argv[4].split(","):
    method, opts = variants[name]
    t = time.time()
    e = risloc.locate(scenes, method, **opts)
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, snr_min, name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
json.dump(out, open(f"static_{seed}_{int(snr_min)}{sys.argv[5] if len(sys.argv) > 5 else ''}.json", "w"), indent=1)
