"""What one scene costs: the host-side work behind ``risloc.locate`` on a single scene.

    python benchmarks/profile_one_scene.py --device cuda --methods ml,learned,learned+ml --out one_scene_profile.json
    python benchmarks/profile_one_scene.py --device cuda --methods learned,learned:fixed,learned:network --out parts.json
    python benchmarks/profile_one_scene.py --device cuda --methods ml --graph-max-scenes 0 --top 40 --out ml_eager.json

``learned:fixed`` is ``learned`` with the refinement steps alone (``over=0, grow=0, relax=0,
prune=0``: no dictionary search, no pruning) and ``learned:network`` the network's own positions
(``refine="music"``), so the rows split a one-scene call into its parts; ``METHOD:compile`` is the
method with ``ml``'s ``compile`` option (its likelihood's real-arithmetic steps through
``torch.compile``; the warm-up call compiles).

For each method, on one scene of the default scenario (``--seed``; ``--signal static`` for static
signals): the median wall time of
``--calls`` calls after one warm-up call, then one call under ``torch.profiler`` with the counts
that bound a one-scene call on a GPU: operators dispatched (``aten::`` calls), CUDA kernels
launched, host reads of device values (``aten::item`` / ``aten::_local_scalar_dense``, each a wait
for the device) and the device time of the kernels against the call's wall time; then the
``--top`` operators by host time and the ``--top`` most frequent CUDA kernels by name, with their
count and summed device time (with ``--graph-max-scenes 0`` the call runs eagerly, so every kernel
carries its own name: where the kernels of a one-scene call come from). A call whose kernels keep
the GPU busy for a small fraction of its wall time is bound by the host: by Python and operator
dispatch (about 5-20 us per operator) and by its waits, not by the GPU. On the CPU the kernel counts
are zero and the operator counts still hold.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import risloc
from risloc._files import atomic_write_text
from risloc._provenance import stamp
from risloc.bench.run import one_scene_latency, sync_device


VARIANTS = {
    "learned:fixed": ("learned", {"over": 0, "grow": 0, "relax": 0, "prune": 0}),
    "learned:network": ("learned", {"refine": "music"}),
    "learned:compile": ("learned", {"ml_options": {"compile": True}}),
    "learned+ml:compile": ("learned+ml", {"ml_options": {"compile": True}}),
    "ml:compile": ("ml", {"compile": True}),
}
"""Named variants of a method: (method, options)."""


def profile_call(f, device: str, top: int) -> dict:
    """One call of ``f`` under the profiler: operator, kernel and host-read counts, device time."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync_device(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        f()
        sync_device(device)
    wall = time.perf_counter() - t
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    reads = sum(1 for e in ops if e.name == "aten::_local_scalar_dense")  # .item(), bool(t), int(t) of a tensor
    device_us = sum(e.time_range.elapsed_us() for e in kernels)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    count, kernel_us = collections.Counter(), collections.Counter()
    for e in kernels:
        count[e.name] += 1
        kernel_us[e.name] += e.time_range.elapsed_us()
    return {
        "profiled_wall_ms": 1e3 * wall,
        "aten_ops": len(ops),
        "top_level_aten_ops": sum(1 for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")),
        "cuda_kernels": len(kernels),
        "host_reads": reads,
        "kernel_time_ms": device_us / 1e3,
        "top_ops": table,
        "top_kernels": [{"name": name, "count": n, "time_ms": kernel_us[name] / 1e3} for name, n in count.most_common(top)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="ml,learned,learned+ml")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--signal", choices=("stochastic", "static"), default="stochastic")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--graph-max-scenes", type=int, default=None,
                    help="risloc.cuda_graphs.GRAPH_MAX_SCENES for this run (0: everything eagerly)")
    ap.add_argument("--out", default="one_scene_profile.json")
    args = ap.parse_args()
    if args.graph_max_scenes is not None:
        from risloc import cuda_graphs as graphs

        graphs.GRAPH_MAX_SCENES = args.graph_max_scenes
    scene = risloc.simulate(risloc.Scenario(signal=args.signal), 1, seed=args.seed, device=args.device)
    out = {"calls": args.calls, "methods": {}, **stamp(seed=args.seed, device=args.device, config=vars(args))}
    for name in args.methods.split(","):
        method, options = VARIANTS.get(name, (name, {}))
        # the bench's one-scene latency: one warm-up call (model loading, first launches, graph
        # captures), then each call timed alone
        lat = one_scene_latency(lambda one: risloc.locate(one, method, **options), scene, args.calls, torch.device(args.device))
        rec = {"median_ms": lat.median_ms}
        rec.update(profile_call(lambda: risloc.locate(scene, method, **options), args.device, args.top))
        out["methods"][name] = rec
        print(f"{name}: {rec['median_ms']:.1f} ms median; profiled call: {rec['aten_ops']} aten ops "
              f"({rec['top_level_aten_ops']} top-level), {rec['cuda_kernels']} CUDA kernels, {rec['host_reads']} host reads, "
              f"kernel time {rec['kernel_time_ms']:.1f} ms of {rec['profiled_wall_ms']:.1f} ms", flush=True)
        print(rec["top_ops"], flush=True)
        for k in rec["top_kernels"]:
            print(f"{k['count']:7d} {k['time_ms']:8.2f} ms  {k['name'][:90]}", flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
