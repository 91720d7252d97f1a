"""Typical Cramér–Rao bounds of the default scenario: the tables of docs/crb.md.

    python benchmarks/crb_typical_values.py --json benchmarks/results/cpu/crb_typical_values.json

On ``--scenes`` default scenes (seed ``--seed``, positions as simulated) the noise variance of
every scene is reset so that its SNR, on the scene's realised clean power (docs/model.md), is
0, 10 or 20 dB; then, over all sources:

* percentiles 10 / 50 / 90 of sqrt(CRB) of phi, theta (deg), r (m) and r / r_true, for the
  stochastic and the static model (static amplitudes g_k = sqrt(p_k), zero phase);
* the median of sqrt(CRB(r)) (absolute and relative) and of sqrt(CRB(phi)) by true range,
  stochastic model, on the first ``--range-scenes`` scenes;
* for the static model at 20 dB, the quantiles of sqrt(CRB(phi)) with uniformly random phases
  of g divided by sqrt(CRB(phi)) with zero phases, over the sources of scenes with K >= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import device_info, git_commit
from risloc.crb import crb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--range-scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase-seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    sc = risloc.Scenario()
    s = risloc.simulate(sc, args.scenes, seed=args.seed)
    t = s.truth
    clean_power = t.noise_var.double() * 10 ** (s.snr_db.double() / 10)  # realised clean power P of each scene
    active = torch.isfinite(t.phi)
    deg = 180 / math.pi

    def bound(snr_db: float, signal: str, sel=slice(None), gain=None):
        nv = clean_power[sel] / 10 ** (snr_db / 10)
        return crb(s.H[sel], s.codes[sel], t.phi[sel], t.theta[sel], t.r[sel], t.power[sel], nv, sc, signal=signal, gain=gain)

    def pct(x: torch.Tensor) -> list[float]:
        q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype))
        return [float(v) for v in q]

    percentiles = []
    for signal in ("stochastic", "static"):
        for snr in (0.0, 10.0, 20.0):
            b = bound(snr, signal)
            r_true = t.r.double()[active]
            percentiles.append({
                "signal": signal, "snr_db": snr,
                "phi_deg": pct(b.phi[active] * deg), "theta_deg": pct(b.theta[active] * deg),
                "r_m": pct(b.r[active]), "r_rel": pct(b.r[active] / r_true),
            })

    n = min(args.range_scenes, args.scenes)
    sel = slice(0, n)
    act = active[:n]
    r_true = t.r.double()[:n][act]
    by_range = []
    b0, b20 = bound(0.0, "stochastic", sel), bound(20.0, "stochastic", sel)
    for lo, hi in ((0.5, 2.0), (2.0, 5.0), (5.0, 10.0)):
        m = (r_true >= lo) & (r_true < hi) if hi < 10 else (r_true >= lo) & (r_true <= hi)
        by_range.append({
            "r_lo": lo, "r_hi": hi, "n_sources": int(m.sum()),
            "median_r_m_0db": float(b0.r[act][m].median()), "median_r_rel_0db": float((b0.r[act] / r_true)[m].median()),
            "median_r_m_20db": float(b20.r[act][m].median()), "median_r_rel_20db": float((b20.r[act] / r_true)[m].median()),
            "median_phi_deg_20db": float((b20.phi[act] * deg)[m].median()),
        })

    multi = (t.K >= 2).unsqueeze(1) & active
    gen = torch.Generator().manual_seed(args.phase_seed)
    phase = 2 * math.pi * torch.rand(t.phi.shape, generator=gen, dtype=torch.float64)
    amp = torch.sqrt(torch.nan_to_num(t.power.double(), nan=0.0))
    g_random = amp * torch.exp(1j * phase)
    zero = bound(20.0, "static")
    rand = bound(20.0, "static", gain=g_random)
    ratio = (rand.phi / zero.phi)[multi]
    qs = [0.01, 0.1, 0.5, 0.9, 0.99]
    phase_ratio = dict(zip([str(q) for q in qs], [float(v) for v in torch.quantile(ratio, torch.tensor(qs, dtype=ratio.dtype))]))

    out = {
        "script": "benchmarks/crb_typical_values.py",
        "args": vars(args),
        "git": git_commit(),
        "machine": {"cpu": device_info("cpu")["cpu_model"], "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min_start": os.getloadavg()[0]},
        "versions": {"risloc": getattr(risloc, "__version__", "unknown"), "torch": torch.__version__, "python": sys.version.split()[0]},
        "scenes": args.scenes, "sources": int(active.sum()),
        "percentiles_10_50_90": percentiles,
        "by_range_stochastic": by_range,
        "static_20db_phase_ratio_phi_quantiles": {"sources": int(multi.sum()), "quantiles": phase_ratio},
        "wall_s": time.perf_counter() - t_start,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
