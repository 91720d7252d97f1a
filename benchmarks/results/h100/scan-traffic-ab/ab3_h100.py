"""Throughput and one scene of learned and ml in one process (code given by PYTHONPATH): 3 passes over
8 192 scenes of seed 1000 at batch 1 024 (ml: 2 048), 20 one-scene calls."""
import json, statistics, sys, time, torch, risloc
dev = torch.device("cuda")
big = risloc.simulate(risloc.Scenario(), 8192, seed=1000, device=dev)
def sync(): torch.cuda.synchronize()
res = {}
for m, s in (("learned", big), ("ml", big[:2048])):
    risloc.locate(s[:1024], m, batch=1024); risloc.locate(s[:1], m); sync()
    rates = []
    for _ in range(3):
        sync(); t = time.perf_counter(); risloc.locate(s, m, batch=1024); sync(); rates.append(round(len(s) / (time.perf_counter() - t)))
    ts = []
    for _ in range(20):
        sync(); t = time.perf_counter(); risloc.locate(s[:1], m); sync(); ts.append(1e3 * (time.perf_counter() - t))
    res[m] = {"scenes_per_s": rates, "one_scene_ms": round(statistics.median(ts), 2)}
print(sys.argv[1], json.dumps(res), flush=True)
json.dump(res, open(sys.argv[2], "w"))
