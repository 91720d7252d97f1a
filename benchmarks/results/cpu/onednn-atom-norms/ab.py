"""The atom norms' product on the CPU through oneDNN against the complex matmul (MKL), A/B in one process.

    PYTHONPATH=src python benchmarks/results/cpu/onednn-atom-norms/ab.py > ab.log

1. One scene at a time through the registry (default scenario, seed 5: neither a validation nor a
   held-out seed): 3 warm-up scenes per method, then two rounds alternating the old route
   (``risloc.grids.atom_norms`` with ``onednn=False``: the complex matmul, in chunks of 4 scenes
   in ``ml``'s dictionary and 16 in the front end as before) and the new default; median ms per scene.
2. Batches: ``learned`` and ``ml`` on 64 scenes at once, both routes, seconds per batch.
3. The answers: ``learned`` and ``ml`` on 400 scenes at 10-20 dB of the validation seed 1000
   (default scenario), both routes: scenes whose K-hat or positions differ, and the successes and
   correct counts of each route (the routes round differently, so a few answers may differ)."""
import json
import statistics
import time

import torch

import risloc
from risloc import grids
from risloc.metrics import success_mask
from risloc.nn.networks import spectrum

torch.set_num_threads(2)
new_route = grids.atom_norms


def old_route(H, codes, D, *, tensor_cores=None, onednn=None, chunk=None):
    if tensor_cores or D.device.type != "cpu":
        return new_route(H, codes, D, tensor_cores=tensor_cores, onednn=onednn, chunk=chunk)
    return new_route(H, codes, D, tensor_cores=False, onednn=False, chunk=chunk or (16 if D.shape[1] == 3456 else 4))


def use(route):  # ml calls grids.atom_norms, the spectrum network's front end its own import of it
    grids.atom_norms = spectrum.atom_norms = route


scenes = risloc.simulate(risloc.Scenario(), 40, seed=5)
for method, n in {"learned": 30, "learned+ml": 10, "ml": 6}.items():
    for i in range(3):
        risloc.locate(scenes[i], method)
    times = {"complex_matmul": [], "onednn": []}
    for rnd in range(2):
        for name, route in (("complex_matmul", old_route), ("onednn", new_route)):
            use(route)
            for i in range(3, 3 + n):
                t = time.perf_counter()
                risloc.locate(scenes[i], method)
                times[name].append(time.perf_counter() - t)
    use(new_route)
    print(json.dumps({"part": "one scene", "method": method, "scenes": n, "rounds": 2,
                      **{f"{k}_ms": round(1e3 * statistics.median(v), 1) for k, v in times.items()}}), flush=True)

batch = risloc.simulate(risloc.Scenario(), 64, seed=5)
for method in ("learned", "ml"):
    row = {"part": "batch of 64", "method": method}
    for rnd in range(2):
        for name, route in (("complex_matmul", old_route), ("onednn", new_route)):
            use(route)
            t = time.perf_counter()
            risloc.locate(batch, method)
            row.setdefault(f"{name}_s", []).append(round(time.perf_counter() - t, 2))
    use(new_route)
    print(json.dumps(row), flush=True)

val = risloc.simulate(risloc.Scenario(snr_db_min=10, snr_db_max=20), 400, seed=1000)
K = val.truth.K
for method in ("learned", "ml"):
    est = {}
    for name, route in (("complex_matmul", old_route), ("onednn", new_route)):
        use(route)
        est[name] = risloc.locate(val, method)
    use(new_route)
    a, b = est["complex_matmul"], est["onednn"]
    pos = torch.stack([(getattr(a, q).nan_to_num() - getattr(b, q).nan_to_num()).abs().amax(1) for q in ("phi", "theta")]).amax(0)
    row = {"part": "validation seed 1000, 400 scenes at 10-20 dB", "method": method,
           "scenes_with_other_K": int((a.K != b.K).sum()), "scenes_with_positions_moved_over_1e-4_rad": int((pos > 1e-4).sum()),
           **{f"{name}_successes": int(success_mask(val.truth, e).sum()) for name, e in est.items()},
           **{f"{name}_correct_K": int((e.K == K).sum()) for name, e in est.items()}}
    print(json.dumps(row), flush=True)
