import time, statistics, torch, risloc
from risloc import grids
from risloc.nn.networks import spectrum
torch.set_num_threads(2)
scenes = risloc.simulate(risloc.Scenario(), 8, seed=5)
def med(f, n=5):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)
new = grids.abs2
old = lambda z: z.abs().square()
res = {"abs().square()": [], "Re(z conj z)": []}
for _ in range(3):
    for name, fn in (("abs().square()", old), ("Re(z conj z)", new)):
        grids.abs2 = fn; spectrum.abs2 = fn
        res[name].append(round(statistics.median([med(lambda: risloc.locate(scenes[i:i+1], "learned")) for i in range(8)]), 1))
print(res)
