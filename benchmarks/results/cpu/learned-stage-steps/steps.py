"""learned's stage with fewer refinement steps in the pruning passes / after RELAX (monkeypatched), validation scenes, CPU."""
import sys, time, json, torch, risloc
from dataclasses import replace
from risloc.metrics import score
from risloc.estimators import ml
torch.set_num_threads(2)
seed, n, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
variants = json.loads(sys.argv[4]) if len(sys.argv) > 4 else [[3, 3], [1, 3], [3, 1], [1, 1]]
sc = risloc.Scenario(codebook="dft") if kind == "dft" else risloc.Scenario()
scenes = risloc.simulate(sc, n, seed=seed)
orig_prune, orig_refine = ml._prune, ml._refine
CFG = {"prune": 3, "after_relax": 3}

def prune(st, nll, F, k, prob):
    nll = torch.nan_to_num(nll, nan=float("inf"))
    cand, nll_c, F_c = ml._drop_one(st, k, prob, CFG["prune"])
    better = nll_c + prob.tau * (k - 1) < nll + prob.tau * k
    limit = ml._power_limit_db(prob)
    if limit is not None:
        better = better | (ml._power_spread_db(st) > limit)
    take = better & (k >= 2)
    st, nll, F = ml._take(take, (cand, nll_c, F_c), (st, nll, F))
    return st, nll, F, k - take.to(k.dtype)

import inspect
src = inspect.getsource(ml._init_path).replace(
    "        if opts.init_relax:\n            st, nll, _, F = _refine(st, prob, opts.final_iterations)",
    "        if opts.init_relax:\n            st, nll, _, F = _refine(st, prob, CFG['after_relax'])")
assert "CFG['after_relax']" in src
ns = dict(ml.__dict__); ns["CFG"] = CFG; ns["_prune"] = prune
exec(src, ns)
ml._init_path = ns["_init_path"]
ml._prune = prune
out = {}
for p, a in variants:
    CFG.update(prune=p, after_relax=a)
    t = time.perf_counter(); est = risloc.locate(scenes, "learned", batch=64); dt = time.perf_counter() - t
    s = score(scenes.truth, est, snr_db=scenes.snr_db); hi = s.subset(10.0, 20.0).overall
    n_hi = int(((scenes.snr_db >= 10) & (scenes.snr_db <= 20)).sum())
    r = {"successes": round(s.overall.success * n), "successes_10_20": round(hi.success * n_hi), "counts_10_20": round(hi.K_acc * n_hi), "n_10_20": n_hi, "s": round(dt, 1)}
    out[f"prune{p}_relax{a}"] = r
    print(seed, kind, p, a, r, flush=True)
json.dump(out, open(f"steps_{kind}_{seed}_{n}.json", "w"), indent=1)
