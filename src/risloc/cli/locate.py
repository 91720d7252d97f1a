"""`risloc locate SCENES --out EST [--method NAME] ...`: run an estimator on a scene file.

The scene file is validated first (format, shapes, finite inputs, non-zero channels and
codes; see docs/scene-files.md), then streamed in chunks of --batch scenes through
the estimator; the estimates file is written atomically at the end (temporary name, then
rename), with the attribute `method` = what the estimator reports (its name, plus the
checkpoint hash for a learned method).

Options reach an estimator only when it takes them: --checkpoint goes to methods with a
`checkpoint` argument, --order-rule to methods with an `order_rule` argument (music),
--no-snr hides the files' SNR label from every method (and passes use_snr=False where
accepted, so the SNR is estimated from the data).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "locate",
        help="locate the sources of every scene of a scene file",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenes", metavar="SCENES", help="scene file (HDF5, risloc-scenes)")
    p.add_argument("--out", "-o", metavar="EST", required=True, help="estimates file to write (HDF5, risloc-estimates)")
    p.add_argument("--method", "-m", default="music", help="estimator name (default music; see --list)")
    p.add_argument("--list", action=_ListEstimators, help="list the registered estimators and exit")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=4096, help="scenes per chunk (default 4096)")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint for learned methods")
    p.add_argument("--order-rule", choices=("mdl", "aic", "eigengap"), help="model-order rule for methods that estimate K from eigenvalues")
    p.add_argument("--no-snr", action="store_true", help="ignore the files' SNR label (estimate it from the data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


class _ListEstimators(argparse.Action):
    """``--list``: print the names of the registered estimators, one per line, and exit; like
    ``--help``, it needs no other argument."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from risloc import estimators

        print("\n".join(estimators.available()))
        parser.exit()


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def estimator_options(fn, *, checkpoint=None, order_rule=None, no_snr=False, batch=None) -> dict:
    """The keyword options of ``fn`` that the command line sets (only those it accepts)."""
    opts: dict = {}
    if checkpoint is not None:
        if not _accepts(fn, "checkpoint"):
            raise ValueError("--checkpoint: this method does not take a checkpoint")
        opts["checkpoint"] = checkpoint
    if order_rule is not None:
        if not _accepts(fn, "order_rule"):
            raise ValueError("--order-rule: this method does not estimate K with an order rule")
        opts["order_rule"] = order_rule
    if no_snr and _accepts(fn, "use_snr"):
        opts["use_snr"] = False
    if batch is not None and _accepts(fn, "batch"):
        opts["batch"] = batch
    return opts


def run(args: argparse.Namespace) -> int:
    import torch

    from risloc import estimators, io
    from risloc.scenes import Estimates

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    fn = estimators.get(args.method)  # unknown names fail before any I/O
    opts = estimator_options(fn, checkpoint=args.checkpoint, order_rule=args.order_rule, no_snr=args.no_snr, batch=args.batch)
    device = torch.device(args.device)

    info = io.validate_scenes_file(args.scenes)  # refuses bad files before any work
    if args.checkpoint is not None:
        from risloc.nn.checkpoint import load_checkpoint

        load_checkpoint(args.checkpoint)  # a damaged or foreign checkpoint, too
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=info.n_scenes, desc=f"locate ({args.method})", unit="scene", file=sys.stderr)
    parts = []
    method = args.method
    t0 = time.perf_counter()
    for chunk in io.iter_scenes(args.scenes, args.batch, device=device, validate=False):
        if args.no_snr:
            chunk.snr_db = None
        est = fn(chunk, **opts)
        method = est.method or method
        parts.append(est.to("cpu"))
        if progress is not None:
            progress.update(len(chunk))
    if progress is not None:
        progress.close()
    if parts:
        est = Estimates.cat(parts)
    else:
        est = Estimates.empty(0, info.scenario.k_max)
    est.method = method
    io.save_estimates(est, args.out, info.scenario)
    dt = time.perf_counter() - t0
    print(f"risloc locate: {len(est)} scenes with {method} in {dt:.1f} s -> {args.out}", file=sys.stderr)
    return 0
