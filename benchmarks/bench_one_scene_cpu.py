"""One-scene latency of ``learned`` on the CPU with and without the oneDNN route of the spectrum
network's convolutions (``risloc.nn.networks.spectrum._Conv3d``).

    python benchmarks/bench_one_scene_cpu.py --threads 2 --repeats 3 --out one_scene_cpu.json

For each repeat and each route (PyTorch's own kernel choice, i.e. ``_Conv3d.MIN_CELLS`` set out of
reach, then oneDNN in the channels-last layout on every grid, ``_Conv3d``'s route): the median of ``--calls`` timed calls (after one warm-up) of
the network stage alone (its detections) and of ``risloc.locate(scene, "learned")`` on one scene of
the default scenario. Writes the times (ms), the answers' agreement and the machine to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.nn.inference import _learned
from risloc.nn.networks import spectrum


def _median_ms(f, calls: int) -> float:
    f()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default="one_scene_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scene = risloc.simulate(risloc.Scenario(), 1, seed=args.seed)
    network = lambda: _learned(scene, None, None, True, None, candidates=True, stage="detections")  # noqa: E731
    whole = lambda: risloc.locate(scene, "learned")  # noqa: E731
    routes = {"pytorch": 10**12, "onednn": spectrum._Conv3d.MIN_CELLS}
    times = {name: {"network_ms": [], "learned_ms": []} for name in routes}
    answers = {}
    for _ in range(args.repeats):
        for name, cells in routes.items():
            spectrum._Conv3d.MIN_CELLS = cells
            times[name]["network_ms"].append(_median_ms(network, args.calls))
            times[name]["learned_ms"].append(_median_ms(whole, args.calls))
            answers[name] = whole()
    spectrum._Conv3d.MIN_CELLS = routes["onednn"]
    a, b = answers["pytorch"], answers["onednn"]
    agree = {"same_K": bool(torch.equal(a.K, b.K)),
             "max_angle_diff_rad": float(torch.nan_to_num((a.phi - b.phi).abs()).max().maximum(torch.nan_to_num((a.theta - b.theta).abs()).max())),
             "max_range_rel_diff": float(torch.nan_to_num((a.r - b.r).abs() / a.r).max())}
    out = {"format": "risloc-one-scene-cpu", "threads": args.threads, "calls": args.calls, "seed": args.seed,
           "times": times, "agreement": agree, **stamp(seed=args.seed, device="cpu", config=vars(args))}
    atomic_write_text(args.out, json.dumps(out, indent=1))
    for name in routes:
        print(name, {k: [round(x, 1) for x in v] for k, v in times[name].items()})
    print(agree)


if __name__ == "__main__":
    main()
