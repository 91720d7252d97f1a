"""Training throughput of the shipped network kind on however many GPUs ``torchrun`` gives it.

    torchrun --nproc_per_node=1 benchmarks/bench_train_scaling.py --out w1.json
    torchrun --nproc_per_node=2 benchmarks/bench_train_scaling.py --out w2.json
    torchrun --nproc_per_node=4 benchmarks/bench_train_scaling.py --out w4.json
    PYTHONPATH=src python3 benchmarks/bench_train_scaling.py --device cpu --steps 4 --warmup 1 --batch-per-rank 4   # smoke test

Runs the real trainer (:func:`risloc.nn.train.train`, ``configs/default.toml`` unless
``--config``) for ``--warmup`` + ``--steps`` steps of one epoch with a fixed batch per rank
(global batch = batch per rank x world size, so the work per GPU is the same for every world
size), and times the ``--steps`` steps after the warm-up (CUDA synchronised at both ends; the
scene simulation of every step, forward, loss, backward, gradient all-reduce, gate, AdamW and
EMA are inside; start-up, validation and checkpoints are not). Rank 0 writes one JSON object:
training scenes/s (all ranks together), the same per GPU, world size, batch per rank, seconds
per step, device names, torch version and the git commit. Scaling = scenes/s(W) / scenes/s(1)
of two such files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from risloc._files import atomic_write_text  # noqa: E402
from risloc._provenance import git_commit, stamp  # noqa: E402
from risloc.nn.config import TrainConfig, apply_overrides  # noqa: E402
from risloc.nn.train import train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "default.toml"))
    ap.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (cuDNN autotuning, allocator; default 30)")
    ap.add_argument("--batch-per-rank", type=int, default=256, help="scenes per GPU per step (default 256, the shipped run's batch)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--out", default=None, help="JSON file written by rank 0 (default: print only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="configuration override (repeatable)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.batch_per_rank < 1:
        raise SystemExit("bench_train_scaling: --steps, --warmup and --batch-per-rank must be >= 1")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = TrainConfig.load(args.config)
    cfg = apply_overrides(cfg, {
        "device": args.device, "epochs": 1, "steps_per_epoch": args.warmup + args.steps, "batch": args.batch_per_rank * world,
        "warmup_steps": min(cfg.warmup_steps, args.warmup + args.steps), "val_scenes": 64, "val_batch": 64, "val_locate": False,
        "calibrate": False, "log_every": 10**9, **dict(kv.split("=", 1) for kv in args.set),
    })
    marks: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in (args.warmup, args.warmup + args.steps):
            if torch.cuda.is_available() and cfg.device != "cpu":
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="risloc-bench-train-") as tmp:
        train(cfg, tmp, log=lambda s: None, on_step=on_step)
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    scenes = args.steps * args.batch_per_rank * world
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    result = {
        "bench": "train_scaling", "kind": cfg.model.kind, "config": Path(args.config).name,
        "world_size": world, "batch_per_rank": args.batch_per_rank, "global_batch": args.batch_per_rank * world,
        "timed_steps": args.steps, "warmup_steps": args.warmup, "seconds": round(seconds, 4),
        "seconds_per_step": round(seconds / args.steps, 6), "scenes_per_s": round(scenes / seconds, 1),
        "scenes_per_s_per_rank": round(scenes / seconds / world, 1),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "torch": torch.__version__, "commit": git_commit(), "overrides": args.set,
        "provenance": stamp(seed=cfg.seed, device="cuda" if cuda else "cpu", config=vars(args)),
    }
    if rank == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
