"""``risloc train``: train the learned estimator (see docs/learned.md).

    risloc train --config configs/cpu-quick.toml --out runs/quick
    risloc train --config configs/default.toml --out runs/gpu --model.width 192 --set loss.k_weight=0.2
    risloc train --out runs/quick --resume          # continue a killed run (same result)
    risloc train --config configs/default.toml --out runs/long --time-budget 540   # then, again and again:
    risloc train --out runs/long --resume --time-budget 540                        # each command <= 9 min
    torchrun --nproc_per_node=4 -m risloc train --config configs/default.toml --out runs/ddp   # 4 GPUs

Under ``torchrun`` the run is data-parallel (DistributedDataParallel; nccl on CUDA, gloo on
CPU): --batch is the GLOBAL batch, split evenly over the ranks; rank 0 validates, logs and
writes the checkpoints (docs/training-at-scale.md).

Every configuration field is also a flag (``--lr``, ``--model.width``, ``--loss.beta``,
``--scenario.k_max``, or ``--set KEY=VALUE``); flags override the --config file. The device
is chosen automatically (cuda if available) unless --device is given. The run folder gets
``config.toml``, ``metrics.jsonl`` (one line per epoch), ``last.pt``, ``best.pt`` (its K head
calibrated on the validation scenes at the end, also after --stop-after-epoch; ``risloc
calibrate`` does it for an existing checkpoint), ``weights.pt`` (best.pt without optimiser
state: the form of the packaged default weights) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..nn.config import TrainConfig, add_config_flags, config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the learned estimator", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML configuration file (default: the built-in defaults)")
    p.add_argument("--out", required=True, help="run folder (created; checkpoints, metrics.jsonl, config.toml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one (its checkpoints and metrics are replaced); without"
                        " it such an --out is refused")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="E",
                   help="end the run after epoch E (0-based) of the configured schedule, as if stopped there (--resume"
                        " continues it); best.pt is then calibrated and exported to weights.pt as at the end of the"
                        " schedule (how the shipped default is made: --stop-after-epoch 6)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock seconds this command may take, counted from the start of training (interpreter start-up,"
                        " a few seconds, comes on top): before they run out, write a resumable last.pt at the current step"
                        " and exit 0; --resume continues exactly there (same weights as one long run)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write last.pt every N steps (default: at epoch ends only)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="S",
                   help="under torchrun: seconds a rank waits for the others (rank 0's validation included) before failing"
                        " (default 1800)")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..nn.distributed import DEFAULT_TIMEOUT_S
    from ..nn.train import train

    if args.stop_after_epoch is not None and args.stop_after_epoch < 0:
        raise ValueError(f"--stop-after-epoch {args.stop_after_epoch}: must be >= 0 (0 = after the first epoch)")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget {args.time_budget}: must be > 0 seconds")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0")
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_toml())
        return 0
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite starts it again: give one of them")
    held = [name for name in ("last.pt", "best.pt", "metrics.jsonl") if (Path(args.out) / name).exists()]
    if held and not (args.resume or args.overwrite):
        raise ValueError(f"--out {args.out} holds a run ({', '.join(held)}): --resume continues it, --overwrite starts it again,"
                         " or choose another folder")
    if args.overwrite and os.environ.get("RANK", "0") == "0":  # what a new run might not rewrite (best.pt: no validation yet)
        for name in ("last.pt", "best.pt", "weights.pt", "summary.json"):
            (Path(args.out) / name).unlink(missing_ok=True)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, log=lambda s: print(s, flush=True),
                    stop_after_epoch=args.stop_after_epoch,
                    dist_timeout_s=args.dist_timeout or DEFAULT_TIMEOUT_S, time_budget_s=args.time_budget,
                    checkpoint_every=args.checkpoint_every)
    if summary.get("stopped") == "time_budget":
        return 0
    best = summary.get("calibration", {})
    if best and os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; rank 0 prints
        print(f"[DONE] best.pt calibrated: success={best.get('calibrated_success', float('nan')):.3f} "
              f"K_acc={best.get('calibrated_K_acc', float('nan')):.3f} T={best['temperature']:.3f} tau={best['threshold']:.3f}")
    return 0
