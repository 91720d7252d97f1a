import torch, risloc, math, sys
from risloc.nn import inference as inf
torch.set_num_threads(2)
seed=int(sys.argv[1]); signal=sys.argv[2]
sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, signal=signal)
s = risloc.simulate(sc, 400, seed=seed)
with torch.no_grad():
    over = inf.default_over(sc); options = inf.stage_options(signal, over=over)
    first, init = inf._start(s, None, None, True, None, None, over)
    loaded, net_options, _ = inf.prepare_checkpoint("learned", ("spectrum","covariance"), inf.DEFAULT_WEIGHTS, s, None, None)
    found = inf._likelihood_stage(s, init, None, {**options, "init_grow": 0, "init_relax": 0, "init_prune": 0})
    atoms = inf.second_look(loaded.model, s, found, 32, options=net_options, autocast=inf.INFERENCE_AUTOCAST)
    est = inf._likelihood_stage(s, found, None, {**options, "atoms": inf.second_look(loaded.model, s, found, 8, options=net_options, autocast=inf.INFERENCE_AUTOCAST)})
    dic = risloc.locate(s, "learned")
t = s.truth
def dist(p1,t1,r1,p2,t2,r2):
    return torch.maximum(torch.maximum((p1-p2).abs()/math.radians(2),(t1-t2).abs()/math.radians(2)),(r1-r2).abs()/(0.1*r1))
under = (est.K < t.K)
print("under", int(under.sum()), "dict under among them", int((dic.K[under] < t.K[under]).sum()))
for i in torch.nonzero(under).flatten().tolist()[:40]:
    K=int(t.K[i]); 
    rows=[]
    for k in range(K):
        d_est = dist(t.phi[i,k], t.theta[i,k], t.r[i,k], est.phi[i,:int(est.K[i])], est.theta[i,:int(est.K[i])], est.r[i,:int(est.K[i])])
        if len(d_est) and d_est.min() < 1: continue
        d_c = dist(t.phi[i,k], t.theta[i,k], t.r[i,k], atoms.phi[i], atoms.theta[i], atoms.r[i])
        rank = int(torch.argmin(d_c)); 
        pw = float(t.power[i,k]/t.power[i,:K].sum())
        rows.append(f"k{k} p={pw:.2f} nearest cand d={float(d_c.min()):.2f} rank={rank}")
    print(i, "K", K, "Khat", int(est.K[i]), "dictK", int(dic.K[i]), "snr", round(float(s.snr_db[i]),1), "; ".join(rows))
