"""Variants of learned's likelihood stage on dft-code scenes at 10-20 dB (validation seeds).

    python study.py SEED N VARIANT[,VARIANT...]     # python study.py 1000 400 ml,learned,grow1,grid_ml,grow1_grid_ml

Simulates N scenes of the default scenario with dft codes at 10-20 dB with the seed SEED, runs each
variant on the CPU and writes dft_SEED_VARIANTS.json (success, K accuracy, K-hat < K, K-hat > K, seconds).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n = int(sys.argv[1]), int(sys.argv[2])
sc = risloc.Scenario(codebook="dft", snr_db_min=10, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
variants = {"ml": ("ml", {}), "learned": ("learned", {}), "grow1": ("learned", {"grow": 1}),
            "grid_ml": ("learned", {"ml_options": {"grid_shape": (25, 13, 14)}}),
            "grow1_grid_ml": ("learned", {"grow": 1, "ml_options": {"grid_shape": (25, 13, 14)}})}
out = {}
for name in sys.argv[3].split(","):
    m, o = variants[name]
    t = time.time(); e = risloc.locate(scenes, m, **o); dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
json.dump(out, open(f"dft_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"), indent=1)
