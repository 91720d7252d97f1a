"""learned on one H100: the stage on 21x11x12 (measuring its dictionary) against the network's 24x12x12
(new code: reading the front end's measured dictionary), throughput, one scene, validation scores."""
import json, statistics, sys, time, torch, risloc
from risloc.metrics import score
from risloc.nn import inference
tag, out = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
val = risloc.simulate(risloc.Scenario(), 4000, seed=1000, device=dev)
big = risloc.simulate(risloc.Scenario(), 8192, seed=1000, device=dev)
res = {}
def sync(): torch.cuda.synchronize()
for name, grid in (("21x11x12", (21, 11, 12)), ("24x12x12", (24, 12, 12))):
    inference.LEARNED_GRID["stochastic"] = grid
    risloc.locate(big[:1024], "learned", batch=1024); sync()
    rates = []
    for _ in range(3):
        t = time.perf_counter(); risloc.locate(big, "learned", batch=1024); sync(); rates.append(len(big) / (time.perf_counter() - t))
    one = big[:1]
    for _ in range(3): risloc.locate(one, "learned")
    ts = []
    for _ in range(20):
        sync(); t = time.perf_counter(); risloc.locate(one, "learned"); sync(); ts.append(1e3 * (time.perf_counter() - t))
    est = risloc.locate(val, "learned", batch=1024)
    sc = score(val.truth, est, snr_db=val.snr_db); hi = sc.subset(10.0, 20.0).overall
    n_hi = int(((val.snr_db >= 10) & (val.snr_db <= 20)).sum())
    res[name] = {"scenes_per_s": [round(r) for r in rates], "one_scene_ms_median": round(statistics.median(ts), 2),
                 "one_scene_ms_p90": round(sorted(ts)[17], 2), "successes": round(sc.overall.success * len(val)),
                 "successes_10_20": round(hi.success * n_hi), "correct_counts_10_20": round(hi.K_acc * n_hi), "scenes_10_20": n_hi}
    print(tag, name, res[name], flush=True)
json.dump({"code": tag, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": res}, open(out, "w"), indent=1)
