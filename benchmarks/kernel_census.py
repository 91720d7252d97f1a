"""Where the CUDA kernels of a one-scene call come from: one eager call, kernels counted by name.

A one-scene call on a GPU is bound by the number of kernels it launches (about 2 us each on an
H100, replayed from a CUDA graph or not). This script turns the graphs off
(``risloc.cuda_graphs.GRAPH_MAX_SCENES = 0``), runs ``risloc.locate`` once on one scene of the
default scenario (seed 5, as ``benchmarks/profile_one_scene.py``) to warm up, then once under
``torch.profiler`` and prints the total kernel count and kernel time, the 40 most frequent
kernels (count, summed device time, name) and the 40 most frequent host-side operators.

    PYTHONPATH=src python3 benchmarks/kernel_census.py ml > kcount-ml.log     (CUDA only)
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import risloc
from risloc import cuda_graphs


def main(method: str = "ml") -> None:
    if not torch.cuda.is_available():
        raise SystemExit("kernel_census.py: needs a CUDA device")
    cuda_graphs.GRAPH_MAX_SCENES = 0  # eager: the profiler sees every kernel with its name
    sc = risloc.simulate(risloc.Scenario(), 1, seed=5, device="cuda")
    risloc.locate(sc, method=method)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        risloc.locate(sc, method=method)
        torch.cuda.synchronize()
    kernels, ktime = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]] += 1
            ktime[e.name[:90]] += e.device_time_total
    print(method, "kernels", sum(kernels.values()), "kernel time ms", sum(ktime.values()) / 1e3)
    for name, n in kernels.most_common(40):
        print(f"{n:7d} {ktime[name] / 1e3:8.2f} ms  {name}")
    print("\noperators by calls (host):")
    for row in sorted(prof.key_averages(), key=lambda r: -r.count)[:40]:
        print(f"{row.count:7d} {row.key}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
