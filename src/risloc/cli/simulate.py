"""``risloc simulate``: draw scenes of a scenario and write them to a scene file.

The scenario is built in this order: the defaults of docs/model.md, then ``--config``
(a TOML file of Scenario fields), then the dedicated flags (``--k``, ``--snr-db``,
``--signal``, ``--codes``), then every ``--set field=value``. Scenes are simulated and
written in chunks (memory stays bounded for 10^6 scenes) to a temporary file that is
renamed to ``--out`` only when complete.
"""

from __future__ import annotations

import argparse
import sys
import time


EPILOG = """\
examples:
  risloc simulate --out scenes.h5 --scenes 2000 --seed 0
  risloc simulate --out k1.h5 --scenes 100 --k 1 --snr-db 30 --signal static
  risloc simulate --out low.h5 --scenes 10000 --snr-db -5 5 --set k_max=3 --device cuda
  risloc simulate --out rough.h5 --scenes 2000 --set ris_phase_noise_deg=10 --set csi_nmse_db=-20

Impairments (docs/model.md, all off by default) are Scenario fields set with --set:
csi_nmse_db (dB, or none), ris_phase_noise_deg (degrees), ris_amplitude (ideal or practical,
with ris_beta_min, ris_mu, ris_kappa) and ris_failed_fraction. The file's H and codes are then
what the receiver knows; the true channel and realised codes go to truth/H and truth/codes.

Scene i of a seed is the same whatever --chunk or --start (use --start to extend a set:
--start 2000 --scenes 1000 gives scenes 2000..2999 of the same stream).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate scenes and write a scene file (HDF5)",
        description="Simulate scenes of the measurement model of docs/model.md and write them, with truth, "
        "to an HDF5 scene file (docs/scene-files.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="PATH", help="scene file to write (replaced atomically if it exists)")
    p.add_argument("--scenes", required=True, type=int, metavar="S", help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="random stream (default 0)")
    p.add_argument("--start", type=int, default=0, metavar="I", help="index of the first scene in the stream (default 0)")
    p.add_argument("--k", type=int, metavar="K", help="fix the number of sources to K (Scenario.k_fixed; arrays stay k_max wide)")
    p.add_argument(
        "--snr-db",
        type=float,
        nargs="+",
        metavar="X",
        help="per-scene SNR in dB: one value X (every scene) or a range LO HI (uniform); default -5 20",
    )
    p.add_argument("--signal", choices=("stochastic", "static"), help="signal model (default stochastic)")
    p.add_argument("--codes", choices=("random", "dft"), help="RIS codebook (default random)")
    p.add_argument("--config", metavar="TOML", help="scenario file (TOML of Scenario fields) to start from")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any Scenario field, e.g. --set k_max=3 --set r_max=5 (repeatable; radians, metres)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--chunk", type=int, default=8192, metavar="C", help="scenes per simulate/write step (default 8192)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def scenario_from_args(args: argparse.Namespace):
    """The Scenario that the flags describe (defaults, --config, dedicated flags, --set)."""
    from risloc.scenario import Scenario

    sc = Scenario.load(args.config) if args.config else Scenario()
    changes = {}
    if args.k is not None:
        changes["k_fixed"] = args.k
    if args.snr_db is not None:
        if len(args.snr_db) not in (1, 2):
            raise ValueError(f"--snr-db takes one value or two (LO HI), got {len(args.snr_db)}")
        changes["snr_db_min"], changes["snr_db_max"] = args.snr_db[0], args.snr_db[-1]
    if args.signal is not None:
        changes["signal"] = args.signal
    if args.codes is not None:
        changes["codebook"] = args.codes
    if changes:
        sc = sc.replace(**changes)
    return sc.with_overrides(args.set) if args.set else sc


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from risloc.io import ScenesWriter
    from risloc.simulate import simulate_chunks

    if args.scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {args.scenes}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.start < 0:
        raise ValueError(f"--start must be >= 0, got {args.start}")
    sc = scenario_from_args(args)
    device = torch.device(args.device)  # checked by risloc.cli.main (check_device)

    t0 = time.perf_counter()
    bar = tqdm(total=args.scenes, unit="scene", desc="simulate", disable=args.quiet, file=sys.stderr)
    try:
        with ScenesWriter(args.out, sc, expected=args.scenes) as writer:
            for scenes in simulate_chunks(sc, args.scenes, seed=args.seed, start=args.start, chunk=args.chunk, device=device):
                writer.write(scenes)
                bar.update(len(scenes))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    if not args.quiet:
        n, last = args.scenes, args.start + args.scenes - 1
        which = f"scene {args.start}" if n == 1 else f"scenes {args.start}..{last}"
        print(f"wrote {n} scene{'' if n == 1 else 's'} (seed {args.seed}, {which}) to {args.out} in {dt:.1f} s ({n / dt:.0f} scenes/s)")
    return 0
