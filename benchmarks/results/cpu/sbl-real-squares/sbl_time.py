import time, torch, risloc
torch.set_num_threads(2)
sc = risloc.simulate(risloc.Scenario(), 64, seed=5)
risloc.locate(sc[:2], "sbl")
t = time.perf_counter(); e = risloc.locate(sc, "sbl"); t64 = time.perf_counter() - t
ts = []
for i in range(8):
    t = time.perf_counter(); risloc.locate(sc[i:i+1], "sbl"); ts.append(time.perf_counter() - t)
ts.sort()
print(f"64 scenes {t64:.2f} s, one scene median {ts[4]*1e3:.1f} ms", e.K[:16].tolist(), float(e.phi.nan_to_num(0).sum()))
