"""learned+ml on default scenes (validation seeds): its 8 refinement steps per stage against fewer.

    python study.py SEED N SNR_MIN VARIANT[,VARIANT...]    # python study.py 1000 400 10 it8,it5,it4

Scenes: N default-scenario scenes at SNR_MIN...20 dB. Writes it_SEED_SNRMIN.json (success, K
accuracy, K-hat < K, K-hat > K, seconds per variant).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n, snr_min = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
scenes = risloc.simulate(risloc.Scenario(snr_db_min=snr_min, snr_db_max=20), n, seed=seed)
K = scenes.truth.K
variants = {f"it{i}": {"ml_options": {"iterations": i, "greedy_iterations": i}} for i in (3, 4, 5, 8)}
out = {}
for name in sys.argv[4].split(","):
    t = time.time()
    e = risloc.locate(scenes, "learned+ml", **variants[name])
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, snr_min, name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
json.dump(out, open(f"it_{seed}_{int(snr_min)}.json", "w"), indent=1)
