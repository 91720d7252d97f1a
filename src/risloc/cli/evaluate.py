"""`risloc evaluate SCENES EST [--crb CRBFILE] [--json PATH|-]`: score estimates against the truth.

Prints the Markdown tables of risloc.metrics (overall, per SNR bin, per true K);
--json PATH also writes them as JSON, --json - writes only the JSON, to stdout.
The optional CRB file (as written by `risloc crb`) holds crb/phi, crb/theta, crb/r
(float [S, K_max], standard deviations in rad / m, NaN padded). Definitions: docs/metrics.md.
The estimates file must be for the scenes of the scene file: as many scenes, and the same
arrays, snapshots, position box and k_max in its scenario attribute (risloc locate copies the
scene file's); otherwise the command stops before scoring.
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


SCORING_FIELDS = ("wavelength", "n_h", "n_v", "spacing_h", "spacing_v", "m_bs", "bs_spacing", "snapshots",
                  "phi_min", "phi_max", "theta_min", "theta_max", "r_min", "r_max", "k_max")
"""The scenario fields in which an estimates file must agree with its scene file: the arrays and
the snapshots (the shape of the data: estimates for another surface, base station or L answered
other scenes), the prior box of the positions and k_max (the most sources either file counts).
The other fields may legitimately differ, and are not compared: they describe how the scenes
were drawn (SNR range, signal model, codebook, channel statistics, impairments, ...), which an
estimator run from Python may assume otherwise, e.g. an ideal surface on scenes with phase
noise. ``risloc locate`` copies the scene file's scenario."""


def check_same_scenario(scenes_scenario, est_scenario, scenes_path: str, est_path: str) -> None:
    """ValueError naming the :data:`SCORING_FIELDS` in which the two files' scenarios differ, and both files."""
    differ = [f"{name} ({getattr(scenes_scenario, name)!r} vs {getattr(est_scenario, name)!r})"
              for name in SCORING_FIELDS if getattr(scenes_scenario, name) != getattr(est_scenario, name)]
    if differ:
        raise ValueError(f"{est_path} does not hold estimates for {scenes_path}: their scenarios differ in {', '.join(differ)} "
                         "(scene file vs estimates file)")


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
    from risloc._files import refuse_overwriting, require_folder

    if args.json and args.json != "-":
        inputs = {"scene file": args.scenes, "estimates file": args.est, **({"CRB file": args.crb} if args.crb else {})}
        refuse_overwriting(args.json, inputs, flag="--json")
        require_folder(args.json, "--json")
    info = io.scenes_file_info(args.scenes)  # header and shapes only: fail fast on the cheap checks
    if not info.has_truth:
        raise ValueError(f"{args.scenes}: no truth/ group; a file without truth cannot be scored")
    check_same_scenario(info.scenario, io.estimates_file_info(args.est).scenario, args.scenes, args.est)
    est = io.load_estimates(args.est)  # validated as it is read
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
