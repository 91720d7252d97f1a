"""learned+ml on dft-code scenes (validation seeds): its default start (one extra detection) against
two extra detections (learned's start with dft codes), with ml beside.

    python study.py SEED N SNR_MIN VARIANT[,VARIANT...]    # python study.py 1000 400 10 lml,lml_over2,ml

Scenes: N default-scenario scenes with dft codes at SNR_MIN...20 dB. Writes dft_SEED_SNRMIN.json
(success, K accuracy, K-hat < K, K-hat > K, seconds per variant).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n, snr_min = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sc = risloc.Scenario(codebook="dft", snr_db_min=snr_min, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
variants = {"lml": ("learned+ml", {}), "lml_over2": ("learned+ml", {"over": 2}),
            "lml_over2_grow0": ("learned+ml", {"over": 2, "grow": 0}), "learned": ("learned", {}), "ml": ("ml", {})}
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
json.dump(out, open(f"dft_{seed}_{int(snr_min)}.json", "w"), indent=1)
