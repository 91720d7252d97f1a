"""``risloc calibrate CHECKPOINT``: fit the K-head calibration of a learned checkpoint.

    risloc calibrate runs/default/best.pt
    risloc calibrate src/risloc/weights/default.pt --device cuda

Fits the temperature T of the K logits and the fall-back threshold tau (risloc.nn.calibrate)
on the trainer's validation scenes of the checkpoint's own configuration (its ``val_seed`` and
``val_scenes``, or its ``val_file``; --scenes N takes the first N of them), as ``risloc train``
does at the end of a run, and writes them into the checkpoint (``best.pt`` or an exported
``weights.pt``), atomically. Prints one line: T, tau, and the K-head negative log-likelihood
and K accuracy on those scenes before (T = 1, no fall-back) and after.
"""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit the K-head calibration (T, tau) of a learned checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint to calibrate in place (best.pt or weights.pt)")
    p.add_argument("--scenes", type=int, default=None, metavar="N",
                   help="validation scenes to fit on (default: the checkpoint's val_scenes, as in training)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="scenes per forward pass (default: the checkpoint's val_batch; memory only, same result)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..nn.checkpoint import load_checkpoint
    from ..nn.config import TrainConfig
    from ..nn.train import calibrate_checkpoint, validation_scenes

    if args.scenes is not None and args.scenes < 1:
        raise ValueError(f"--scenes {args.scenes}: must be >= 1")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be >= 1")
    device = torch.device(args.device)  # checked by risloc.cli.main (check_device)
    state = load_checkpoint(args.checkpoint)  # a missing, damaged or foreign file is refused before any work
    cfg = TrainConfig.from_toml(state["config"])
    del state
    t0 = time.perf_counter()
    scenes = validation_scenes(cfg, args.scenes, device=device)
    r = calibrate_checkpoint(args.checkpoint, scenes, log=lambda line: None, progress=not args.no_progress, batch=args.batch)
    source = f"val_file {cfg.val_file}" if cfg.val_file else f"val_seed {cfg.val_seed}"
    print(f"risloc calibrate: {args.checkpoint}: T={r['temperature']:.4f} tau={r['threshold']:.4f} ({r['order_rule']} fall-back)"
          f" on {r['scenes']} validation scenes ({source}): k_nll {r['k_nll_before']:.4f} -> {r['k_nll_after']:.4f},"
          f" K_acc {r['K_acc_before']:.4f} -> {r['K_acc_after']:.4f} ({time.perf_counter() - t0:.0f} s on {device})")
    return 0
