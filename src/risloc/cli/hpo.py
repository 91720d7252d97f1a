"""``risloc hpo``: Optuna search over the trainer's main knobs (needs ``pip install 'risloc[hpo]'``).

    risloc hpo --study s1 --storage runs/hpo/journal.log --config configs/cpu-quick.toml \\
               --space configs/hpo.toml --out runs/hpo --trials 40 --timeout 36000

Several workers: start the same command several times (e.g. one per GPU with
CUDA_VISIBLE_DEVICES=i); they share the study through the journal file. --trials is the study's
total of finished (complete or pruned) trials; each worker stops when it is reached or after
--timeout seconds. Each trial trains in OUT/trial-NNNN/ (its own train.log, metrics.jsonl,
checkpoints); after every epoch the validation metric is reported to Optuna and the median
pruner may stop the trial. OUT/best.toml is the best trial's full configuration:

    risloc train --config runs/hpo/best.toml --out runs/best

Configuration flags (--epochs 4, --set train.val_scenes=512, ...) apply to the base --config
before the search space. See docs/training-at-scale.md.
"""

from __future__ import annotations

import argparse
import sys

from ..nn.config import add_config_flags, config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("hpo", help="hyper-parameter search with Optuna (optional extra)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study name (workers with the same name and storage share it)")
    p.add_argument("--storage", required=True, help="journal file shared by the workers (or an Optuna RDB URL)")
    p.add_argument("--space", required=True, help="search-space TOML (e.g. configs/hpo.toml)")
    p.add_argument("--out", required=True, help="folder for trial runs and best.toml / best.json")
    p.add_argument("--config", help="base training configuration TOML (default: the built-in defaults)")
    p.add_argument("--trials", type=int, default=20, help="total finished trials of the study (default 20)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="this worker stops starting trials after S seconds")
    p.add_argument("--sampler-seed", type=int, default=None, help="seed of the TPE sampler (one worker: reproducible)")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..nn import hpo

    try:
        hpo.import_optuna()
    except hpo.OptunaMissing as exc:
        print(f"risloc hpo: {exc}", file=sys.stderr)
        return 2
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: must be >= 1")
    base = config_from_args(args)
    space = hpo.load_space(args.space, base)
    info = hpo.run_study(base, space, args.out, study_name=args.study, storage=args.storage, trials=args.trials,
                         timeout=args.timeout, sampler_seed=args.sampler_seed, log=lambda s: print(s, flush=True))
    return 0 if info is not None else 1
