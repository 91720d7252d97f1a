"""One H100, one process, variants alternated in 3 rounds: learned with the stacked maps G (the
likelihood evaluations' G v) or without (H (c * v)), on 21x11x12 or on the network's 24x12x12 (read
from the front end); ml with and without the maps. Scenes/s at batch 1 024 on 8 192 scenes of seed
1000 (two passes per round) and the median of 20 one-scene calls per round."""
import json, statistics, sys, time, torch, risloc
from risloc.estimators import ml, ml_core
from risloc.nn import inference
dev = torch.device("cuda")
big = risloc.simulate(risloc.Scenario(), 8192, seed=1000, device=dev)
mlset = big[:2048]
def sync(): torch.cuda.synchronize()
V = {"learned 21x11x12 H(c*v)": ("learned", (21, 11, 12), False), "learned 21x11x12 Gv": ("learned", (21, 11, 12), True),
     "learned 24x12x12 Gv": ("learned", (24, 12, 12), True), "ml H(c*v)": ("ml", None, False), "ml Gv": ("ml", None, True)}
res = {k: {"scenes_per_s": [], "one_scene_ms": []} for k in V}
def setv(grid, g):
    ml.maps = ml_core.maps if g else (lambda H, c: None)
    if grid: inference.LEARNED_GRID["stochastic"] = grid
for k, (m, grid, g) in V.items():  # warm-up of every variant
    setv(grid, g); risloc.locate(big[:1024], m, batch=1024); risloc.locate(big[:1], m)
for rnd in range(3):
    for k, (m, grid, g) in V.items():
        setv(grid, g)
        s = big if m == "learned" else mlset
        for _ in range(2):
            sync(); t = time.perf_counter(); risloc.locate(s, m, batch=1024); sync()
            res[k]["scenes_per_s"].append(round(len(s) / (time.perf_counter() - t)))
        ts = []
        for _ in range(20):
            sync(); t = time.perf_counter(); risloc.locate(big[:1], m); sync(); ts.append(1e3 * (time.perf_counter() - t))
        res[k]["one_scene_ms"].append(round(statistics.median(ts), 2))
        print(rnd, k, res[k]["scenes_per_s"][-2:], res[k]["one_scene_ms"][-1], flush=True)
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": res}, open(sys.argv[1], "w"), indent=1)
