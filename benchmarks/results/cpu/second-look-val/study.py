"""Variants of learned's likelihood stage (and network) on validation scenes at 10-20 dB (CPU, one torch thread).

    python study.py SEED N VARIANT[,VARIANT...] [SIGNAL] [CODEBOOK]

Variants: default (risloc.locate "learned"), mixed (the same with checkpoint="mixed"), relax_all
(ml_options relax_sources=0), over2 (over=2, prune=1), relax2 (relax=2), dict / net (learned with
search="dictionary" / "network"), fixed (K-hat + 1 detections refined, 2 pruning passes, no
search), p1cC (RELAX of the weakest over the first look's C strongest heat maxima), p2cC (the same
over the second look's), p2fullC (the second look's C candidates with the signal model's
growth/RELAX/pruning counts), p2add1 (the second look's strongest candidate away from the refined
sources added, then 3 pruning passes), ml. The p* variants build the second look with this
script's own copy of the cancelling front end (mfs_cancel; written before the package had one);
dict / net use the package. Writes p2_SIGNAL_CODEBOOK_SEED_VARIANTS.json (printed as it goes).
"""
import json, sys, time, dataclasses
import torch
import risloc
from risloc.metrics import success_mask
from risloc.nn import inference as inf
from risloc.nn.networks import spectrum as sp
from risloc.nn.inputs import prepare_inputs, forward
from risloc.estimators import get
from risloc import physics
from risloc.scenes import Estimates

torch.set_num_threads(1)
seed, n = int(sys.argv[1]), int(sys.argv[2])
signal = sys.argv[4] if len(sys.argv) > 4 else "stochastic"
codebook = sys.argv[5] if len(sys.argv) > 5 else "random"
sc = risloc.Scenario(snr_db_min=10, snr_db_max=20, signal=signal, codebook=codebook)
scenes = risloc.simulate(sc, n, seed=seed)
K = scenes.truth.K
loaded = inf._cached_model(inf.DEFAULT_WEIGHTS, scenes.device)
model = loaded.model
orig_mfs = sp.matched_filter_spectra


def mfs_cancel(atoms, valid):
    """matched_filter_spectra whose first picks cancel the given steering vectors [B, J, N] (valid [B, J]);
    picks beyond them (or invalid slots) by argmax as usual."""
    def f(y, H, codes, grid, *, picks=0, chunk=None, tensor_cores=None, cancel=None):
        B, L, M = y.shape
        Q = grid.D.shape[1]
        D = grid.D.to(y.device)
        yb, Hb, cb = y.to(torch.complex64), H.to(torch.complex64), codes.to(torch.complex64)
        n0 = sp.atom_norms(Hb, cb, D, tensor_cores=False)
        tc = sp.dictionary_product(sp.back_project(yb, Hb, cb).conj(), D, tensor_cores=False)
        n_ = n0; floor = 1e-3 * n0
        ynorm = yb.abs().square().sum(-1); total = ynorm.sum(1, keepdim=True).clamp(min=1e-30)
        mf = tc.abs().square() / n0.clamp(min=1e-30)
        c_out = mf / ynorm.unsqueeze(-1).clamp(min=1e-30)
        S = mf.sum(1) / total
        n_s = max(picks, 1)
        S_out = torch.zeros(B, n_s, Q); S_out[:, 0] = S
        res = torch.ones(B, picks + 1)
        basis = []; left = ynorm
        for j in range(picks):
            q = S.argmax(1)
            d = D.T[q]
            if j < atoms.shape[1]:
                d = torch.where(valid[:, j, None], atoms[:, j], d)
            bvec = torch.einsum("bmn,bln->blm", Hb, cb * d.unsqueeze(1))
            for e in basis:
                bvec = bvec - e * (e.conj() * bvec).sum(-1, keepdim=True)
            e = bvec / torch.linalg.vector_norm(bvec, dim=-1, keepdim=True).clamp(min=1e-30)
            basis.append(e)
            z = sp.dictionary_product(sp.back_project(e, Hb, cb).conj(), D, tensor_cores=False)
            ey = (e.conj() * yb).sum(-1)
            tc = torch.addcmul(tc, z, ey.conj().unsqueeze(-1), value=-1)
            za = z.abs(); n_ = torch.addcmul(n_, za, za, value=-1).clamp_(min=0)
            left = (left - ey.abs().square()).clamp(min=0)
            res[:, j + 1] = left.sum(1) / total.squeeze(1)
            S = (tc.abs().square_() / torch.where(n_ > floor, n_, torch.inf)).sum(1) / total
            if j + 1 < n_s:
                S_out[:, j + 1] = S
        return sp.Spectra(S_out, c_out, res)
    return f


def second_pass(ref: Estimates, ncand: int):
    """Candidates [B, ncand] from the network run on spectra that cancel ref's sources first."""
    opts = loaded.options
    inputs = prepare_inputs(scenes.y, scenes.H, scenes.codes, scenes.snr_db, regularisation=opts.regularisation)
    kk = torch.arange(ref.phi.shape[1]).view(1, -1)
    valid = (kk < ref.K.view(-1, 1)) & torch.isfinite(ref.phi)
    atoms = physics.steering(torch.nan_to_num(ref.phi), torch.nan_to_num(ref.theta), torch.nan_to_num(ref.r, nan=1.0), sc,
                             dtype=torch.complex64)
    sp.matched_filter_spectra = mfs_cancel(atoms, valid)
    try:
        with torch.no_grad():
            pred = forward(model, inputs, opts, None)
    finally:
        sp.matched_filter_spectra = orig_mfs
    return pred


def candidates_of(pred, ncand):
    det = pred.detections
    grid = model.grid(scenes.device)
    d = sp.decode(det.heat, det.offset, det.cell_log_power, grid, sc, ncand)
    full = torch.full((len(scenes),), ncand, dtype=torch.int64)
    return Estimates(full, d.phi, d.theta, d.r)


def first_pass():
    opts = loaded.options
    inputs = prepare_inputs(scenes.y, scenes.H, scenes.codes, scenes.snr_db, regularisation=opts.regularisation)
    with torch.no_grad():
        pred = forward(model, inputs, opts, None)
    Kh = inf.count_sources(pred, inputs, opts, sc, loaded.calibration)
    return pred, Kh


ML = get("ml")
base = {**inf.LEARNED_DEFAULTS, "relax_sources": inf.LEARNED_RELAX_SOURCES[signal], "batch": n}


def run(name):
    pred1, Kh = first_pass()
    cand1 = sp.SpectrumKind().candidates(pred1)
    init = inf.over_init(cand1, Kh, 1)
    ml = lambda init, **o: ML(scenes, init=init, snr_db=True, **{**base, **o})
    if name == "default":
        return risloc.locate(scenes, "learned")
    if name == "relax_all":
        return risloc.locate(scenes, "learned", ml_options={"relax_sources": 0})
    if name == "over2":
        return risloc.locate(scenes, "learned", over=2, prune=1)
    if name == "relax2":
        return risloc.locate(scenes, "learned", relax=2)
    if name == "mixed":
        return risloc.locate(scenes, "learned", checkpoint="mixed")
    if name in ("dict", "net"):
        return risloc.locate(scenes, "learned", search={"dict": "dictionary", "net": "network"}[name])
    if name == "fixed":  # K+1 detections, refinement, 2 prunes
        return ml(init, init_grow=0, init_relax=0, init_prune=2)
    ref = ml(init, init_grow=0, init_relax=0, init_prune=0)
    if name.startswith("p1c"):  # first-pass candidates for relax
        c = candidates_of(pred1, int(name[3:]))
        return ml(ref, atoms=c, init_grow=0, init_relax=1, init_prune=2)
    pred2 = second_pass(ref, 0)
    if name.startswith("p2c"):  # second-pass candidates for RELAX of weakest
        c = candidates_of(pred2, int(name[3:]))
        return ml(ref, atoms=c, init_grow=0, init_relax=1, init_prune=2)
    if name.startswith("p2full"):  # second-pass candidates with the signal model's stage counts
        c = candidates_of(pred2, int(name[6:]))
        so = inf.stage_options(signal)
        return ml(ref, atoms=c, init_grow=so["init_grow"], init_relax=so["init_relax"], init_prune=so["init_prune"])
    if name.startswith("p2g"):  # second-pass candidates: one growth + relax
        c = candidates_of(pred2, int(name[3:]))
        return ml(ref, atoms=c, init_grow=1, init_relax=1, init_prune=2)
    if name.startswith("p2add"):  # strongest second-pass detection not near a refined source, added; refine; prune 3
        c = candidates_of(pred2, 16)
        grid = model.grid(scenes.device)
        def cells(phi, theta, r):
            u = torch.stack([torch.sin(phi), torch.sin(theta), 1 / r], -1)
            return (u - grid.lo) / grid.step
        cc = cells(c.phi, c.theta, c.r)  # [B,16,3]
        rc = cells(torch.nan_to_num(ref.phi, nan=9.0), torch.nan_to_num(ref.theta, nan=9.0), torch.nan_to_num(ref.r, nan=1e-3))
        dist = (cc.unsqueeze(2) - rc.unsqueeze(1)).abs().amax(-1)  # [B,16,K]
        kk = torch.arange(rc.shape[1]).view(1, 1, -1)
        dist = torch.where(kk < ref.K.view(-1, 1, 1), dist, torch.full_like(dist, 99.0))
        far = dist.amin(-1) > float(name[5:] or 1.0)
        j = torch.argmax(far.int(), 1)  # first far candidate
        has = far.any(1) & (ref.K < sc.k_max)
        phi, theta, r = ref.phi.clone(), ref.theta.clone(), ref.r.clone()
        b = torch.arange(n)
        slot = ref.K.clamp(max=sc.k_max - 1)
        phi[b[has], slot[has]] = c.phi[b[has], j[has]]
        theta[b[has], slot[has]] = c.theta[b[has], j[has]]
        r[b[has], slot[has]] = c.r[b[has], j[has]]
        init2 = Estimates(ref.K + has.long(), phi, theta, r)
        return ml(init2, init_grow=0, init_relax=0, init_prune=3)
    raise KeyError(name)


out = {}
for name in sys.argv[3].split(","):
    t = time.time()
    if name == "ml":
        e = risloc.locate(scenes, "ml")
    else:
        e = run(name)
    dt = time.time() - t
    ok = success_mask(scenes, e)
    out[name] = dict(success=float(ok.float().mean()), K_acc=float((e.K == K).float().mean()),
                     K_under=float((e.K < K).float().mean()), K_over=float((e.K > K).float().mean()), s=dt)
    print(seed, name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
json.dump(out, open(f"p2_{signal}_{codebook}_{seed}_{sys.argv[3].replace(',', '_')}.json", "w"), indent=1)
