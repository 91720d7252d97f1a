"""learned with the family network vs the mixed network, default geometry, static / dft scenes, validation seeds."""
import json, sys, time
import torch
import risloc
from risloc.metrics import success_mask
torch.set_num_threads(1)
seed, n, signal, codebook = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, signal=signal, codebook=codebook)
scenes = risloc.simulate(sc, n, seed=seed)
out = {"seed": seed, "n": n, "signal": signal, "codebook": codebook, "rows": {}}
for name, ck in (("mixed", None), ("family", "family")):
    t = time.time()
    est = risloc.locate(scenes, "learned", **({} if ck is None else {"checkpoint": ck}))
    ok = success_mask(scenes.truth, est)
    out["rows"][name] = {"success": ok.float().mean().item(), "k_acc": (est.K == scenes.truth.K).float().mean().item(),
                         "n_success": int(ok.sum()), "n_k": int((est.K == scenes.truth.K).sum()), "seconds": time.time() - t}
    print(seed, signal, codebook, name, out["rows"][name], flush=True)
json.dump(out, open(f"fam_{signal}_{codebook}_{seed}.json", "w"), indent=1)
