"""`risloc locate SCENES --out EST [--method NAME] ...`: run an estimator on a scene file.

The scene file is validated first (format, shapes, finite inputs, non-zero channels and
codes; see docs/scene-files.md), then streamed in chunks of --batch scenes (default: the
estimator's own batch size) through the estimator; the estimates file is written
atomically at the end (temporary name, then rename), with the attribute `method` = what
the estimator reports (its name, plus the checkpoint hash for a learned method).

Options reach an estimator only when it takes them (the estimator registry knows its
options): --checkpoint goes to learned methods, --order-rule to methods with an order rule
(music), --option KEY=VALUE to any method that has that option (e.g. learned's grow, relax,
prune; ml's iterations), --k N gives every scene N sources to methods that accept a known K (the answer
then has exactly N), --no-snr hides the files' SNR label from every method (and passes
use_snr=False where accepted, so the SNR is estimated from the data).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--method", "-m", default="learned", help="estimator name (default learned, the packaged network and a short likelihood stage; see --list)")
    p.add_argument("--list", action=_ListEstimators, help="list the registered estimators and exit")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=None, help="scenes per chunk (default: the estimator's batch size)")
    p.add_argument("--k", type=int, default=None, metavar="N", dest="k",
                   help="known number of sources of every scene (methods that accept a known K)")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint for learned methods: a file or a packaged model's name, e.g. mixed")
    p.add_argument("--order-rule", choices=("mdl", "aic", "eigengap"), help="model-order rule for methods that estimate K from eigenvalues")
    p.add_argument("--no-snr", action="store_true", help="ignore the files' SNR label (estimate it from the data)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="an option of the estimator (repeatable; VALUE read as JSON where it parses, and refused before any"
                        " work when it is not of the option's kind: a number, true/false, a list, an object of fields), "
                        "e.g. --method learned --option grow=0 --option relax=0 --option prune=0")
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


_SET_BY_FLAGS = {"checkpoint": "--checkpoint", "order_rule": "--order-rule", "use_snr": "--no-snr", "K": "--k",
                 "batch": "--batch", "device": "--device", "progress": "--no-progress"}


def parse_options(estimator, items, *, flag: str = "--option", reserved: dict[str, str] = _SET_BY_FLAGS) -> dict:
    """``KEY=VALUE`` texts -> keyword options of a registered ``estimator``. VALUE is read as
    JSON where it parses (``0``, ``0.7``, ``true``, ``{"iterations": 2}``), else kept as text
    (``refine=music``). Refused, naming ``flag`` and the item: no ``=``, an option the estimator
    does not take, one the command sets with a flag of its own (``reserved``: option -> flag;
    default: ``risloc locate``'s), one with a value per scene, a value of the wrong kind
    (:meth:`~risloc.estimators.Estimator.check_option`)."""
    import json

    name = estimator.info.name
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        if key in reserved:
            raise ValueError(f"{flag} {item!r}: use {reserved[key]} for {key}")
        if key in estimator.info.per_scene:
            raise ValueError(f"{flag} {item!r}: {name}'s {key} takes one value per scene; it cannot be set on the command line")
        if not estimator.accepts(key):
            raise ValueError(f"{flag} {item!r}: {name} has no option {key!r}; its options: {', '.join(sorted(estimator.options))}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        try:
            out[key] = estimator.check_option(key, value)
        except ValueError as exc:
            raise ValueError(f"{flag} {item!r}: {exc}") from None
    return out


def estimator_options(estimator, *, checkpoint=None, order_rule=None, no_snr=False, options=()) -> dict:
    """The keyword options of a registered ``estimator`` that the command line sets (only
    those it takes, from the registry's record of its options): the flags, then ``--option``
    items (:func:`parse_options`)."""
    opts: dict = parse_options(estimator, options)
    if checkpoint is not None:
        if not estimator.info.learned:
            raise ValueError("--checkpoint: this method does not take a checkpoint")
        opts["checkpoint"] = checkpoint
    if order_rule is not None:
        if not estimator.accepts("order_rule"):
            raise ValueError("--order-rule: this method does not estimate K with an order rule")
        opts["order_rule"] = order_rule
    if no_snr and estimator.accepts("use_snr"):
        opts["use_snr"] = False
    return opts


def run(args: argparse.Namespace) -> int:
    import torch

    from risloc import estimators, io
    from risloc._files import refuse_overwriting, require_folder
    from risloc.scenes import Estimates

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    estimator = estimators.get(args.method)  # unknown names fail before any I/O
    opts = estimator_options(estimator, checkpoint=args.checkpoint, order_rule=args.order_rule, no_snr=args.no_snr,
                             options=args.options)
    if args.k is not None and not estimator.info.accepts_k:
        raise ValueError(f"--k: {args.method} does not accept a known number of sources")
    device = torch.device(args.device)
    batch = args.batch if args.batch is not None else estimator.info.batch_for(device)

    refuse_overwriting(args.out, {"scene file": args.scenes})
    require_folder(args.out, "--out")
    info = io.validate_scenes_file(args.scenes)  # refuses bad files before any work
    if args.k is not None:  # a bad --k is refused before the progress bar starts (the one K validation)
        try:
            estimators.known_k(args.k, 1, info.scenario.k_max)
        except ValueError as exc:
            raise ValueError(f"--k {args.k}: {exc}") from None
    if args.checkpoint is not None:
        from risloc.nn.checkpoint import load_checkpoint, named_checkpoint

        opts["checkpoint"] = named_checkpoint(args.checkpoint, "--checkpoint")  # a packaged model's name, or a file
        load_checkpoint(opts["checkpoint"])  # a damaged or foreign checkpoint, too
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=info.n_scenes, desc=f"locate ({args.method})", unit="scene", file=sys.stderr)
    parts = []
    method = args.method
    t0 = time.perf_counter()
    for chunk in io.iter_scenes(args.scenes, batch, device=device, validate=False):
        if args.no_snr:
            chunk.snr_db = None
        est = estimator(chunk, K=args.k, batch=batch, **opts)
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
    n = len(est)
    print(f"risloc locate: {n} scene{'' if n == 1 else 's'} with {method} in {dt:.1f} s -> {args.out}", file=sys.stderr)
    return 0
