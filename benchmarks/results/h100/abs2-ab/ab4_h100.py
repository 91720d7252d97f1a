"""|z|^2 as abs().square() or Re(z conj z) (risloc.grids.abs2), alternated in one process on one H100:
learned, 3 rounds x 2 passes over 8 192 scenes of seed 1000 at batch 1 024, and 20 one-scene calls."""
import json, statistics, sys, time, torch, risloc
from risloc import grids
from risloc.nn.networks import spectrum
dev = torch.device("cuda")
big = risloc.simulate(risloc.Scenario(), 8192, seed=1000, device=dev)
def sync(): torch.cuda.synchronize()
V = {"abs().square()": lambda z: z.abs().square(), "Re(z conj z)": grids.abs2}
res = {k: {"scenes_per_s": [], "one_scene_ms": []} for k in V}
def setv(fn): grids.abs2 = fn; spectrum.abs2 = fn
for k, fn in V.items():
    setv(fn); risloc.locate(big[:1024], "learned", batch=1024); risloc.locate(big[:1], "learned")
same = None
for rnd in range(3):
    for k, fn in V.items():
        setv(fn)
        for _ in range(2):
            sync(); t = time.perf_counter(); est = risloc.locate(big, "learned", batch=1024); sync()
            res[k]["scenes_per_s"].append(round(len(big) / (time.perf_counter() - t)))
        ts = []
        for _ in range(20):
            sync(); t = time.perf_counter(); risloc.locate(big[:1], "learned"); sync(); ts.append(1e3 * (time.perf_counter() - t))
        res[k]["one_scene_ms"].append(round(statistics.median(ts), 2))
        print(rnd, k, res[k]["scenes_per_s"][-2:], res[k]["one_scene_ms"][-1], flush=True)
json.dump({"device": torch.cuda.get_device_name(), "results": res}, open(sys.argv[1], "w"), indent=1)
