import torch, risloc, math, sys
from risloc.nn.networks.spectrum import matched_filter_spectra, spectrum_grid, _local_max_scores
torch.set_num_threads(2)
for signal in ["static", "stochastic"]:
    sc = risloc.Scenario(signal=signal, snr_db_min=10, snr_db_max=20)
    s = risloc.simulate(sc, 300, seed=11)
    g = spectrum_grid(sc, (24, 12, 12))
    sp = matched_filter_spectra(s.y, s.H, s.codes, g, picks=5, coherent=True)
    t = s.truth
    u = torch.sin(t.phi); v = torch.sin(t.theta); rho = 1 / t.r
    cell = ((torch.stack([u, v, rho], -1) - g.lo) / g.step)  # [B,K,3]
    res = {}
    for name, spec in [("S0", sp.S[:, 0]), ("C0", sp.C[:, 0]), ("S4", sp.S[:, 4]), ("C4", sp.C[:, 4])]:
        pk = _local_max_scores(spec, g.shape)
        top = torch.topk(pk, 8, dim=1).indices  # [B,8]
        pos = g.positions(top)  # [B,8,3]
        d = (cell.unsqueeze(2) - pos.unsqueeze(1)).abs().amax(-1)  # [B,K,8]
        act = torch.arange(5).view(1, -1) < t.K.view(-1, 1)
        hit = (d.amin(-1) <= 1.0) & act
        res[name] = round(hit.sum().item() / act.sum().item(), 3)
    print(signal, res)
