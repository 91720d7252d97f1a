"""One stochastic likelihood evaluation (NLL, gradient, Fisher matrix), eager against ``ml``'s
``compile`` option (``risloc.estimators.ml_core.stochastic_eval(..., compiled=True)``).

    python benchmarks/bench_likelihood_eval.py --device cuda --batches 1,1024,4096 --out eval.json
    python benchmarks/bench_likelihood_eval.py --device cpu --batches 1,64 --out eval_cpu.json

For each batch size: the scenes of the default scenario (``--seed``) with their true sources in
``--slots`` slots (the rest inactive), the time of one evaluation (median of ``--repeats`` runs of
``--calls`` calls after warm-up; on CUDA also replayed as one CUDA graph of ``--calls`` calls, the
way a few scenes run in ``ml``), the CUDA kernels of one call (profiler), the first call's time of
the compiled form (its compilation) and the largest relative difference of NLL, gradient and Fisher
matrix between the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import risloc
from risloc import grids
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.bench.run import sync_device
from risloc.estimators.ml_core import stochastic_eval, unit_power


def _inputs(B: int, slots: int, seed: int, device: torch.device):
    scenes = risloc.simulate(risloc.Scenario(), B, seed=seed, device=device)
    y, H, _ = unit_power(scenes.y, scenes.H)
    t = scenes.truth
    pick = lambda v, fill: torch.nan_to_num(v[:, :slots].float(), fill)  # noqa: E731
    active = torch.isfinite(t.phi[:, :slots])
    args = (pick(t.phi, 0.1), pick(t.theta, 0.1), 1 / pick(t.r, 2.0), torch.log(pick(t.power, 1.0) / scenes.H.abs().square().mean((1, 2)).view(-1, 1)).nan_to_num(0.0),
            torch.log(t.noise_var.float() / scenes.y.abs().square().mean((1, 2))), active, y, H, scenes.codes, scenes.scenario)
    return args, grids.maps(H, scenes.codes)


def _time(f, calls: int, repeats: int, device) -> float:
    out = []
    for _ in range(repeats):
        sync_device(str(device))
        t = time.perf_counter()
        for _ in range(calls):
            f()
        sync_device(str(device))
        out.append((time.perf_counter() - t) / calls)
    return statistics.median(out)


def _graph_time(f, calls: int, repeats: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            f()
    return _time(g.replay, 1, repeats, "cuda") / calls


def _kernels(f) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        f()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,1024,4096")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default="likelihood_eval.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        x, G = _inputs(B, args.slots, args.seed, device)
        with torch.inference_mode():
            eager = lambda: stochastic_eval(*x, G=G)  # noqa: E731
            fused = lambda: stochastic_eval(*x, G=G, compiled=True)  # noqa: E731
            sync_device(str(device))
            t0 = time.perf_counter()
            fused()
            sync_device(str(device))
            row = {"batch": B, "slots": args.slots, "first_compiled_call_s": round(time.perf_counter() - t0, 2)}
            a, b = eager(), fused()
            row["max_rel_diff"] = {n: float((u - v).abs().max() / u.abs().max()) for n, u, v in zip(("nll", "grad", "fisher"), a, b)}
            for name, f in (("eager", eager), ("compiled", fused)):
                f()
                r = {"us_per_call": 1e6 * _time(f, args.calls, args.repeats, device)}
                if cuda:
                    r["us_per_call_graph"] = 1e6 * _graph_time(f, args.calls, args.repeats)
                    r["kernels"] = _kernels(f)
                row[name] = {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"format": "risloc-likelihood-eval", "device_name": torch.cuda.get_device_name() if cuda else "cpu",
           "threads": torch.get_num_threads(), "rows": rows, **stamp(seed=args.seed, device=str(device), config=vars(args))}
    atomic_write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
