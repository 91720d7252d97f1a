"""`risloc evaluate SCENES EST [--crb CRBFILE] [--json PATH|-]`: score estimates against the truth.

Prints the Markdown tables of risloc.metrics (overall, per SNR bin, per true K);
--json PATH also writes them as JSON, --json - writes only the JSON, to stdout.
The optional CRB file (as written by `risloc crb`) holds crb/phi, crb/theta, crb/r
(float [S, K_max], standard deviations in rad / m, NaN padded). Definitions: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="score an estimates file against the truth of a scene file",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenes", metavar="SCENES", help="scene file (HDF5) with a truth/ group")
    p.add_argument("est", metavar="EST", help="estimates file (HDF5) for the same scenes")
    p.add_argument("--crb", metavar="CRBFILE", help="CRB file (crb/phi, crb/theta, crb/r) for RMSE/sqrt(CRB) ratios")
    p.add_argument("--json", metavar="PATH|-", help="also write the scores as JSON to PATH ('-': only JSON, to stdout)")
    p.add_argument("--bins-db", type=float, default=5.0, help="SNR bin width in dB (default 5)")
    p.set_defaults(func=run)
    return p


def read_crb(path: str, n_scenes: int):
    """The CRB file (as written by ``risloc crb``) through :func:`risloc.io.load_crb`, checked
    to hold ``n_scenes`` scenes."""
    from risloc.io import load_crb

    crb = load_crb(path)
    if len(crb) != n_scenes:
        raise ValueError(f"{path}: crb/phi has {len(crb)} scenes but the scene file has {n_scenes}")
    return crb


def run(args: argparse.Namespace) -> int:
    from risloc import io, metrics

    info = io.scenes_file_info(args.scenes)  # header and shapes only: fail fast on the cheap checks
    if not info.has_truth:
        raise ValueError(f"{args.scenes}: no truth/ group; a file without truth cannot be scored")
    est = io.load_estimates(args.est)
    n_s, n_e = info.n_scenes, len(est)
    if n_s != n_e:
        raise ValueError(
            f"scene counts differ: {args.scenes} has {n_s} scenes, {args.est} has {n_e}; "
            "estimates must be for the same scenes, in the same order"
        )
    truth, snr_db = _read_truth(io, args.scenes)
    crb = read_crb(args.crb, n_s) if args.crb else None
    result = metrics.score(truth, est, snr_db=snr_db, crb=crb, bins_db=args.bins_db)

    if args.json == "-":
        sys.stdout.write(_json(result, args, est) + "\n")
        return 0
    method = getattr(est, "method", "") or "?"
    print(f"## {method} on {os.path.basename(args.scenes)} ({n_s} scenes)\n")
    print(result.format_table())
    if args.json:
        from risloc.scenario import atomic_write_text

        atomic_write_text(args.json, _json(result, args, est) + "\n")
    return 0


def _read_truth(io, path: str):
    """Truth and nominal SNR of a scene file, validated and streamed in chunks of 1024 scenes
    (about 40 MB of inputs each); only the truth and the SNR are kept, so files of 10^6 scenes
    fit in memory."""
    import dataclasses

    import torch

    from risloc.scenes import Truth

    truths, snrs = [], []
    for chunk in io.iter_scenes(path, chunk=1024):
        truths.append(dataclasses.replace(chunk.truth, H=None, codes=None) if chunk.truth is not None else None)  # no true H / codes
        snrs.append(chunk.snr_db)
    if not truths:
        raise ValueError(f"{path}: no scenes")
    snr = None if any(s is None for s in snrs) else torch.cat(snrs)
    return Truth.cat(truths), snr


def _json(result, args, est) -> str:
    import json

    d = json.loads(result.to_json())
    head = {"scenes": args.scenes, "estimates": args.est, "method": getattr(est, "method", ""), "crb": args.crb}
    return json.dumps({**head, **d}, indent=2)
