"""One scene of `learned` on the CPU with the options that trade set-up or precision for speed:
the default, conv_precision="bf16", ml's compile option, and both; alternated over --repeats
rounds in one process (the compile option's first call compiles, before the timed calls).

    python one_scene_options.py --threads 2 --repeats 3 --calls 9 --out one_scene_options.json
"""
import argparse, json, statistics, time
import torch
import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--calls", type=int, default=9)
ap.add_argument("--seed", type=int, default=5)
ap.add_argument("--out", default="one_scene_options.json")
args = ap.parse_args()
torch.set_num_threads(args.threads)
scene = risloc.simulate(risloc.Scenario(), 1, seed=args.seed)
variants = {"default": {}, "bf16": {"conv_precision": "bf16"}, "compile": {"ml_options": {"compile": True}},
            "bf16+compile": {"conv_precision": "bf16", "ml_options": {"compile": True}}}
first = {}
for name, kw in variants.items():
    t = time.perf_counter(); risloc.locate(scene, "learned", **kw); first[name] = time.perf_counter() - t
times = {name: [] for name in variants}
for _ in range(args.repeats):
    for name, kw in variants.items():
        ts = []
        for _ in range(args.calls):
            t = time.perf_counter(); risloc.locate(scene, "learned", **kw); ts.append(time.perf_counter() - t)
        times[name].append(1e3 * statistics.median(ts))
for name in variants:
    print(f"{name:14s} first call {first[name]:.1f} s, medians {[round(x, 1) for x in times[name]]} ms", flush=True)
atomic_write_text(args.out, json.dumps({"first_call_s": first, "median_ms": times,
                                        **stamp(seed=args.seed, device="cpu", config=vars(args))}, indent=1))
