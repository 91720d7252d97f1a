"""learned with the dictionary search vs the second look (search="network"), packaged default (mixed) network,
validation scenes at 10-20 dB. python sl_mixed.py SEED N SIGNAL CODEBOOK"""
import json, sys, time
import torch
import risloc
from risloc.metrics import success_mask

torch.set_num_threads(1)
seed, n, signal, codebook = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, signal=signal, codebook=codebook)
scenes = risloc.simulate(sc, n, seed=seed)
out = {"seed": seed, "n": n, "signal": signal, "codebook": codebook, "rows": {}}
for name, method, opts in [("dict", "learned", {}), ("net", "learned", {"search": "network"}), ("ml", "ml", {})]:
    t = time.time()
    est = risloc.locate(scenes, method, **opts)
    dt = time.time() - t
    ok = success_mask(scenes.truth, est)
    kacc = (est.K == scenes.truth.K).float().mean().item()
    out["rows"][name] = {"success": ok.float().mean().item(), "k_acc": kacc, "n_success": int(ok.sum()), "n_k": int((est.K == scenes.truth.K).sum()), "seconds": dt}
    print(seed, signal, codebook, name, out["rows"][name], flush=True)
json.dump(out, open(f"./sl_{signal}_{codebook}_{seed}.json", "w"), indent=1)
