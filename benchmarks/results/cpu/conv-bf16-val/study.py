"""learned with the spectrum network's CPU convolutions in bfloat16 (option conv_precision="bf16")
against float32 (the default), on validation scenes.

    OMP_NUM_THREADS=1 python study.py SEED N SNR_MIN SIGNAL CODEBOOK    # python study.py 1000 400 10 stochastic random

Scenes: N scenes of the default scenario with SIGNAL and CODEBOOK at SNR_MIN...20 dB, seed SEED.
Both precisions are warmed up on 2 scenes first, then timed on all N. Writes
bf16_SEED_SNRMIN_SIGNAL_CODEBOOK.json (success, K accuracy, seconds, and per scene the hit and K-hat).
"""
import json, sys, time
import risloc
from risloc.metrics import success_mask
seed, n, snr_min, signal, codebook = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
sc = risloc.Scenario(signal=signal, codebook=codebook, snr_db_min=snr_min, snr_db_max=20)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
for p in ("fp32", "bf16"):
    risloc.locate(scenes[:2], "learned", conv_precision=p)
out = {}
for p in ("fp32", "bf16"):
    t = time.time()
    e = risloc.locate(scenes, "learned", conv_precision=p)
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[p] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()), s=dt, ok=ok.tolist(), Khat=e.K.tolist())
    print(seed, snr_min, signal, codebook, p, {k: round(v, 4) for k, v in out[p].items() if k not in ("ok", "Khat")}, flush=True)
a, b = out["fp32"], out["bf16"]
print("scenes whose hit differs:", sum(x != y for x, y in zip(a["ok"], b["ok"])), "whose K-hat differs:", sum(x != y for x, y in zip(a["Khat"], b["Khat"])))
json.dump(out, open(f"bf16_{seed}_{int(snr_min)}_{signal}_{codebook}.json", "w"))
