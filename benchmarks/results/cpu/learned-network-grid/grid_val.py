"""learned on validation scenes: the stage on its 21 x 11 x 12 dictionary (default) against the
network's 24 x 12 x 12 (ml_options grid_shape). Run as `PYTHONPATH=src python grid_val.py SEED N [stochastic|dft]`;
writes val_<kind>_<seed>_<n>.json in the current folder (the files here)."""
import sys, time, json, torch, risloc
from risloc.metrics import score
torch.set_num_threads(2)
seed = int(sys.argv[1]); n = int(sys.argv[2]); signal = sys.argv[3] if len(sys.argv) > 3 else "stochastic"
sc = risloc.Scenario(codebook="dft") if signal == "dft" else (risloc.Scenario() if signal == "stochastic" else risloc.Scenario(signal=signal))
scenes = risloc.simulate(sc, n, seed=seed)
out = {}
for name, opt in (("default", {}), ("net_grid", {"ml_options": {"grid_shape": (24, 12, 12)}})):
    t = time.perf_counter()
    est = risloc.locate(scenes, "learned", batch=64, **opt)
    dt = time.perf_counter() - t
    s = score(scenes.truth, est, snr_db=scenes.snr_db)
    hi = s.subset(10.0, 20.0).overall
    out[name] = dict(success=s.overall.success, success_10_20=hi.success, K_acc_10_20=hi.K_acc, K_acc=s.overall.K_acc, s=round(dt,1),
                     hits=getattr(hi, "n_success", None))
    print(name, out[name], flush=True)
json.dump(out, open(f"val_{signal}_{seed}_{n}.json", "w"))
