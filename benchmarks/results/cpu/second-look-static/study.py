"""Fixed-cost (no dictionary) variants of learned's second look on validation scenes at 10-20 dB.
python study.py SEED N SIGNAL CODEBOOK VARIANTS(comma)"""
import json, sys, time
import torch
import risloc
from risloc.metrics import success_mask
from risloc.nn import inference as inf
from risloc.estimators import Estimates

torch.set_num_threads(1)
seed, n, signal, codebook = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
variants = sys.argv[5].split(",")
import os
CK = os.environ.get("CKPT") or None
tag = os.environ.get("TAG", "")
sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, signal=signal, codebook=codebook)
scenes = risloc.simulate(sc, n, seed=seed)

def union(a, b):
    K = torch.full_like(a.K, a.phi.shape[1] + b.phi.shape[1])
    return Estimates(K, torch.cat([a.phi, b.phi], 1), torch.cat([a.theta, b.theta], 1), torch.cat([a.r, b.r], 1), method="c")

def looks(scenes, nlooks, ncand, grow_per_look, union_first=False, final_relax=True, over=None):
    with torch.no_grad():
        over = inf.default_over(scenes.scenario) if over is None else over
        options = inf.stage_options(scenes.scenario.signal, over=over)
        first, init = inf._start(scenes, CK, None, True, None, None, over)
        loaded, net_options, _ = inf.prepare_checkpoint("learned", ("spectrum", "covariance"), (CK or inf.DEFAULT_WEIGHTS), scenes, None, None)
        found = inf._likelihood_stage(scenes, init, None, {**options, "init_grow": 0, "init_relax": 0, "init_prune": 0})
        first_c = None
        if union_first:
            _, cand = inf._learned(scenes, CK, None, True, None, candidates=True, stage="detections")
        for i in range(nlooks):
            atoms = inf.second_look(loaded.model, scenes, found, ncand, options=net_options, autocast=inf.INFERENCE_AUTOCAST)
            if union_first: atoms = union(atoms, cand)
            last = i == nlooks - 1
            o = {**options, "atoms": atoms, "init_grow": grow_per_look if not last else options["init_grow"] if grow_per_look is None else grow_per_look,
                 "init_relax": options["init_relax"] if last and final_relax else 0, "init_prune": options["init_prune"] if last else 0}
            found = inf._likelihood_stage(scenes, found, None, o)
        return found

V = {
 "dict": lambda s: risloc.locate(s, "learned", checkpoint=CK),
 "net": lambda s: risloc.locate(s, "learned", search="network", checkpoint=CK),
 "net16": lambda s: looks(s, 1, 16, None),
 "net32": lambda s: looks(s, 1, 32, None),
 "look2": lambda s: looks(s, 2, 8, 1),
 "look3": lambda s: looks(s, 3, 8, 1),
 "look3c16": lambda s: looks(s, 3, 16, 1),
 "look2g2": lambda s: looks(s, 2, 8, 2),
 "netU": lambda s: looks(s, 1, 8, None, union_first=True),
 "ml": lambda s: risloc.locate(s, "ml"),
}
out = {"seed": seed, "n": n, "signal": signal, "codebook": codebook, "rows": {}}
for name in variants:
    t = time.time()
    est = V[name](scenes)
    dt = time.time() - t
    ok = success_mask(scenes.truth, est)
    K = scenes.truth.K.to(est.K.device)
    row = {"success": ok.float().mean().item(), "k_acc": (est.K == K).float().mean().item(),
           "k_under": (est.K < K).float().mean().item(), "k_over": (est.K > K).float().mean().item(), "n_success": int(ok.sum()),
           "n_k": int((est.K == K).sum()), "seconds": round(dt, 1)}
    out["rows"][name] = row
    print(tag, seed, signal, codebook, name, row, flush=True)
json.dump(out, open(f"./r{tag}_{signal}_{codebook}_{seed}_{'-'.join(variants)}.json", "w"), indent=1)
