"""One scene of learned on the CPU, the two stochastic grids alternated in one process (3 rounds,
median over 8 scenes of seed 5 of the median of 5 calls each); prints ms (one_scene_ab.log)."""
import time, statistics, torch, risloc
from risloc.nn import inference as inf
torch.set_num_threads(2)
scenes = risloc.simulate(risloc.Scenario(), 8, seed=5)
grids = {"21x11x12": (21, 11, 12), "24x12x12 reused": (24, 12, 12)}
def med(f, n=10):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)
res = {k: [] for k in grids}
for rep in range(3):
    for name, g in grids.items():
        inf.LEARNED_GRID["stochastic"] = g
        res[name].append(statistics.median([med(lambda: risloc.locate(scenes[i:i+1], "learned"), 5) for i in range(8)]))
print({k: [round(x, 1) for x in v] for k, v in res.items()})
