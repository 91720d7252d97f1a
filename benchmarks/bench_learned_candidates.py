"""``learned``'s likelihood stage with its growth and RELAX searches over the network's own
candidates instead of ``ml``'s dictionary (validation only).

    PYTHONPATH=src python3 benchmarks/bench_learned_candidates.py --device cuda --scenes 4000 --json out.json

On ``--scenes`` scenes of the validation seed ``--seed`` (default 1000): the packaged network's
K-hat detections, then ``ml``'s ``init`` path with ``learned``'s options (``LEARNED_DEFAULTS``,
one growth, one RELAX of the weakest source, one pruning pass) where the searches score (a)
``ml``'s dictionary (the default), (b) the n = 8 / 16 / 32 strongest local maxima of the
network's heat map, moved by their offsets (``ml``'s ``atoms`` option), (c) those 16 plus a
coarse grid, (d) a coarse grid alone; and (e) the 3 refinement steps alone. Prints and writes
success (all SNRs, 10-20 dB), K accuracy, K_over and K_under at 10-20 dB and the stage's
scenes/s (batches of 1 024 on CUDA).
"""
import argparse
import json
import time

import torch
import risloc
from risloc import grids
from risloc.estimators import get
from risloc.metrics import score
from risloc.nn.inference import DEFAULT_WEIGHTS, INFERENCE_AUTOCAST, LEARNED_DEFAULTS, load_model, run_model
from risloc.nn.networks import spectrum as spm
from risloc.scenes import Estimates
from risloc._files import atomic_write_text
from risloc._provenance import stamp

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--scenes", type=int, default=4000)
ap.add_argument("--seed", type=int, default=1000)
ap.add_argument("--json", default=None)
args = ap.parse_args()
dev = torch.device(args.device)
loaded = load_model(DEFAULT_WEIGHTS, device=dev)
model, cal, options = loaded.model, loaded.calibration, loaded.options
N = args.scenes
scenes = risloc.simulate(risloc.Scenario(), N, seed=args.seed).to(dev)
grid = model.grid(dev)
firsts, cands = [], {n: [] for n in (8, 16, 32)}
with torch.no_grad():
    for a in range(0, N, 1024):
        s = scenes[a:a + 1024]
        est, pred = run_model(model, s, options=options, calibration=cal, autocast=INFERENCE_AUTOCAST, stage="detections")
        firsts.append(est)
        d = pred.detections
        for n in cands:
            c = spm.decode(d.heat, d.offset, d.cell_log_power, grid, model.scenario, n)
            cands[n].append(Estimates(torch.full((len(s),), n, device=dev), c.phi.float(), c.theta.float(), c.r.float()))
first = Estimates.cat(firsts)
cands = {n: Estimates.cat(v) for n, v in cands.items()}
sc = risloc.Scenario()
def coarse(shape):
    g = grids.dictionary(sc, shape, device=dev)
    rep = lambda x: x.float().unsqueeze(0).expand(N, -1)
    return rep(g.phi), rep(g.theta), rep(1.0 / g.rho)
def union(c, shape):
    p, t, r = coarse(shape)
    return Estimates(c.K + p.shape[1], torch.cat([c.phi, p], 1), torch.cat([c.theta, t], 1), torch.cat([c.r, r], 1))
ml = get("ml")
base = {**LEARNED_DEFAULTS, "init_grow": 1, "init_relax": 1, "init_prune": 1}
variants = [("default (dictionary 25x13x14)", base, None), ("refine only (3 steps)", {**LEARNED_DEFAULTS}, None)]
for n in (8, 16, 32):
    variants.append((f"network top-{n}", base, cands[n]))
variants.append(("network top-16 + grid 13x7x7", base, union(cands[16], (13, 7, 7))))
variants.append(("network top-16 + grid 9x5x5", base, union(cands[16], (9, 5, 5))))
variants.append(("grid 13x7x7 alone", base, union(Estimates(torch.zeros(N, dtype=torch.long, device=dev), cands[8].phi[:, :0], cands[8].theta[:, :0], cands[8].r[:, :0]), (13, 7, 7))))
rows = []
for name, opts, atoms in variants:
    kw = dict(opts) if atoms is None else dict(opts, atoms=atoms)
    ml(scenes[:1024], init=first[:1024], **{k: (v[:1024] if k == "atoms" else v) for k, v in kw.items()}); (torch.cuda.synchronize() if dev.type == "cuda" else None)
    t = time.perf_counter()
    est = ml(scenes, init=first, **kw)
    (torch.cuda.synchronize() if dev.type == "cuda" else None); dt = time.perf_counter() - t
    rep = score(scenes.truth, est, snr_db=scenes.snr_db)
    hi = rep.subset(10.0, 20.0).overall
    rows.append({"variant": name, "success": rep.overall.success, "success_10_20": hi.success, "K_acc_10_20": hi.K_acc,
                 "K_over_10_20": hi.K_over, "K_under_10_20": hi.K_under, "stage_scenes_per_s": round(N / dt)})
    print(json.dumps(rows[-1]), flush=True)
if args.json:
    atomic_write_text(args.json, json.dumps({"scenes": N, "seed": args.seed, "rows": rows,
                                             "provenance": stamp(seed=args.seed, device=dev, config=vars(args))}, indent=1))
