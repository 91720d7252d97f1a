"""Throughput of the simulator: scenes/s for simulation alone and for simulate-and-write.

    python benchmarks/bench_simulate.py                       # CPU, 65 536 scenes
    python benchmarks/bench_simulate.py --device cuda --scenes 4194304
    python benchmarks/bench_simulate.py --json out.json

Default scenario of docs/model.md. "simulate" keeps each chunk on the device (CUDA is
synchronised before the clock stops); "simulate + write" also copies each chunk to the host
and appends it to an HDF5 scene file in a temporary folder (so it includes the disk). Each
figure is the best of ``--repeat`` runs after a warm-up chunk; the CPU rows also give the
rate per CPU-second (process time), which is less sensitive to other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from risloc import Scenario, __version__
from risloc.bench import device_info, sync_device
from risloc.io import ScenesWriter
from risloc.simulate import simulate, simulate_chunks


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": device_info("cpu")["cpu_model"],
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "risloc": __version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_simulate(sc: Scenario, n: int, chunk: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) to simulate n scenes in chunks, results left on the device."""
    sync_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for scenes in simulate_chunks(sc, n, seed=1, chunk=chunk, device=device):
        del scenes
    sync_device(device)
    return time.perf_counter() - t0, time.process_time() - c0


def time_simulate_write(sc: Scenario, n: int, chunk: int, device: torch.device, folder: str) -> tuple[float, float, int]:
    """(wall s, CPU s, file bytes) to simulate n scenes and write them to an HDF5 scene file."""
    path = os.path.join(folder, "bench.h5")
    sync_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with ScenesWriter(path, sc, expected=n) as writer:
        for scenes in simulate_chunks(sc, n, seed=1, chunk=chunk, device=device):
            writer.write(scenes)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = os.path.getsize(path)
    os.remove(path)
    return wall, cpu, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--scenes", type=int, default=None, help="scenes per run (default 65536 on CPU, 2^21 on CUDA)")
    p.add_argument("--chunk", type=int, default=None, help="scenes per simulate call (default 8192 on CPU, 65536 on CUDA)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="skip the simulate-and-write figure")
    p.add_argument("--write-scenes", type=int, default=None, help="scenes for the write figure (default min(scenes, 65536))")
    p.add_argument("--tmpdir", default=None, help="folder for the temporary scene file (default: system temp)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    n = args.scenes or (1 << 21 if cuda else 65536)
    chunk = args.chunk or (65536 if cuda else 8192)
    n_write = args.write_scenes or min(n, 65536)
    sc = Scenario()

    simulate(sc, min(chunk, n), seed=0, device=device)  # warm-up (allocator, kernels, thread pools)
    sync_device(device)

    rows = []
    best = min((time_simulate(sc, n, chunk, device) for _ in range(args.repeat)), key=lambda t: t[0])
    rows.append({"what": "simulate", "scenes": n, "chunk": chunk, "wall_s": best[0], "cpu_s": best[1], "scenes_per_s": n / best[0], "scenes_per_cpu_s": n / best[1]})
    if not args.no_write:
        with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
            best_w = min((time_simulate_write(sc, n_write, chunk, device, folder) for _ in range(args.repeat)), key=lambda t: t[0])
        rows.append(
            {
                "what": "simulate + write",
                "scenes": n_write,
                "chunk": chunk,
                "wall_s": best_w[0],
                "cpu_s": best_w[1],
                "scenes_per_s": n_write / best_w[0],
                "scenes_per_cpu_s": n_write / best_w[1],
                "bytes_per_scene": best_w[2] / n_write,
            }
        )

    info = machine_info(device)
    where = info.get("gpu", info["cpu"])
    print(f"### risloc simulate throughput — {args.device}: {where}")
    print(f"torch {info['torch']}, {info['cpu_cores']} CPU cores, {info['torch_threads']} torch threads, load average {info['load_average_1min']}\n")
    print("| what | scenes | chunk | wall s | scenes/s | scenes per CPU-s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['scenes']} | {r['chunk']} | {r['wall_s']:.2f} | {r['scenes_per_s']:,.0f} | {r['scenes_per_cpu_s']:,.0f} |")
    if len(rows) > 1:
        print(f"\nscene file: {rows[1]['bytes_per_scene'] / 1024:.1f} KiB per scene")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "device": args.device, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
