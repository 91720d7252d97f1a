"""`risloc crb SCENES --out FILE [--signal stochastic|static] [--device D] [--batch B] [--threads T]`.

Cramér–Rao bounds on (phi, theta, r) of every source of a scene file (which must have its
truth/ group). Writes ``crb/phi``, ``crb/theta``, ``crb/r`` (float32 ``[S, K_max]``: standard
deviations sqrt(CRB) in radians and metres, NaN after the first K of a scene, inf where the
position is unidentifiable) and ``crb/regular`` (int8 ``[S]``). Root attributes ``format``,
``version`` and ``scenario`` are copied from the scene file; ``content = "crb"`` and ``signal``
are added. The signal model defaults to the scenario's (``stochastic``: Slepian–Bangs with
unknown powers and noise variance; ``static``: deterministic amplitudes g_k = sqrt(p_k)).
See docs/crb.md.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "crb",
        help="Cramér–Rao bounds on the source positions of a scene file",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenes", metavar="SCENES", help="scene file (HDF5) with a truth/ group")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="CRB file to write (HDF5)")
    p.add_argument("--signal", choices=("stochastic", "static"), default=None,
                   help="signal model (default: the scenario's 'signal')")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=4096, help="scenes read per chunk (default 4096)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a loaded, shared CPU, 1 can be much faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from risloc._files import refuse_overwriting
    from risloc.io import crb_file

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    refuse_overwriting(args.out, {"scene file": args.scenes})  # crb_file checks the folder before any work
    crb_file(args.scenes, args.out, signal=args.signal, device=args.device, batch=args.batch, progress=not args.no_progress)
    return 0
