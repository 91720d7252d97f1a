"""One-scene latency of ``learned`` on the CPU by route of the spectrum network's convolutions
(``risloc.nn.networks.spectrum._Conv3d``).

    python benchmarks/bench_one_scene_cpu.py --threads 2 --repeats 3 --out one_scene_cpu.json
    python benchmarks/bench_one_scene_cpu.py --threads 2 --repeats 3 --batch 64 --out one_scene_cpu.json

For each repeat and each route (PyTorch's own kernel choice, i.e. ``_Conv3d.MIN_CELLS`` set out of
reach; oneDNN in float32 in the channels-last layout on every grid, ``_Conv3d``'s default route;
and, where oneDNN has a bfloat16 convolution on this CPU, the same in bfloat16, the option
``conv_precision="bf16"``): the median of ``--calls`` timed calls (after one warm-up) of
the network stage alone (its detections) and of ``risloc.locate(scene, "learned")`` on one scene of
the default scenario; with ``--batch N`` also one timed call of ``learned`` on N scenes per repeat
(scenes/s). The routes alternate within each repeat. Writes the times (ms), the answers'
agreement with the default route and the machine to ``--out``.
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
    ap.add_argument("--batch", type=int, default=0, help="also time learned on this many scenes (0: no)")
    ap.add_argument("--out", default="one_scene_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scene = risloc.simulate(risloc.Scenario(), 1, seed=args.seed)
    many = risloc.simulate(risloc.Scenario(), args.batch, seed=args.seed + 1) if args.batch else None
    routes = {"pytorch": (10**12, "fp32"), "onednn": (spectrum._Conv3d.MIN_CELLS, "fp32")}
    if spectrum.onednn_bf16():
        routes["onednn-bf16"] = (spectrum._Conv3d.MIN_CELLS, "bf16")
    default_cells = spectrum._Conv3d.MIN_CELLS
    times = {name: {"network_ms": [], "learned_ms": [], **({"batch_scenes_per_s": []} if many else {})} for name in routes}
    answers = {}
    for _ in range(args.repeats):
        for name, (cells, precision) in routes.items():
            spectrum._Conv3d.MIN_CELLS = cells
            with spectrum.set_cpu_conv_precision(precision):
                network = lambda: _learned(scene, None, None, True, None, candidates=True, stage="detections")  # noqa: E731
                times[name]["network_ms"].append(_median_ms(network, args.calls))
            whole = lambda: risloc.locate(scene, "learned", conv_precision=precision)  # noqa: E731
            times[name]["learned_ms"].append(_median_ms(whole, args.calls))
            answers[name] = whole()
            if many is not None:
                t = time.perf_counter()
                risloc.locate(many, "learned", conv_precision=precision)
                times[name]["batch_scenes_per_s"].append(args.batch / (time.perf_counter() - t))
    spectrum._Conv3d.MIN_CELLS = default_cells
    agree = {}
    for name in routes:
        a, b = answers["onednn"], answers[name]
        agree[name] = {"same_K": bool(torch.equal(a.K, b.K)),
                       "max_angle_diff_rad": float(torch.nan_to_num((a.phi - b.phi).abs()).max().maximum(torch.nan_to_num((a.theta - b.theta).abs()).max())),
                       "max_range_rel_diff": float(torch.nan_to_num((a.r - b.r).abs() / a.r).max())}
    out = {"format": "risloc-one-scene-cpu", "threads": args.threads, "calls": args.calls, "seed": args.seed,
           "times": times, "agreement": agree, **stamp(seed=args.seed, device="cpu", config=vars(args))}
    atomic_write_text(args.out, json.dumps(out, indent=1))
    for name in routes:
        print(name, {k: [round(x, 1) for x in v] for k, v in times[name].items()}, agree[name])


if __name__ == "__main__":
    main()
