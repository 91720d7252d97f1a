"""`risloc bench`: every estimator and the Cramér–Rao bound on one held-out set of scenes.

Simulates --scenes scenes of the held-out seed stream (default 2000 scenes of seed
7000003, risloc.seeds.HELD_OUT_SEED, drawn on the CPU so the set does not depend on
--device; the report says whether --seed is the held-out seed), runs the CRB and every method
of --methods on the same scenes, times each method (scenes/s on --device, first batch
excluded as warm-up), scores them (risloc.metrics) and writes DIR/report.md,
DIR/results.json and PNG plots. A method that is not available is reported as
"not run: <reason>" (with a warning), an exception inside one as "failed: <message>"
(fatal with --strict). --oracle-k adds a row "METHOD (K known)" for every method that
accepts a known K, run with the true K of each scene. --quick: 200 scenes in batches of 50, default options for every
method, one torch thread on the CPU (--threads to change). Beside scenes/s, the one-scene
latency of every method: median and 90th percentile of --latency-calls calls on one scene.

--sweep FIELD=V1,V2,...: instead of one benchmark, the same benchmark (methods, options,
scenes, seed) at every level of a scenario field, e.g. --sweep ris_phase_noise_deg=0,5,10,20;
writes DIR/sweep.md, DIR/sweep.json, DIR/sweep_success.png and each level's report.md and
results.json in a subfolder. Repeat --sweep for several sweeps (each in DIR/FIELD/). See docs/bench.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    from risloc.bench import DEFAULT_METHODS, LATENCY_CALLS, QUICK_BATCH, QUICK_LATENCY_CALLS, QUICK_SCENES
    from risloc.seeds import HELD_OUT_SEED, VALIDATION_SEEDS

    p = subparsers.add_parser(
        "bench",
        help="benchmark every estimator and the CRB on held-out scenes (report.md, results.json, plots)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenes", type=int, default=None, metavar="S",
                   help=f"number of held-out scenes (default 2000; {QUICK_SCENES} with --quick)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                   help=f"seed of the scene stream (default {HELD_OUT_SEED}, the held-out seed nothing is tuned on; "
                        f"choose defaults on the validation seeds {', '.join(map(str, VALIDATION_SEEDS))})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2,...",
                   help=f"comma-separated estimators (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--device", default=None, help="torch device of the estimators and the CRB (default: cuda if available, else cpu)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help=f"scenes per estimator call, the timing unit (default 256; {QUICK_BATCH} with --quick)")
    p.add_argument("--out", default="bench-report", metavar="DIR", help="report folder (default bench-report)")
    p.add_argument("--quick", action="store_true", help=f"small run: {QUICK_SCENES} scenes, batch {QUICK_BATCH}, default method options, 1 CPU thread")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint of the learned pipeline: learned, learned+ml; a file or a packaged model's name, e.g. mixed "
                        "(default: packaged weights, if any)")
    p.add_argument("--method-checkpoint", action="append", default=[], metavar="NAME=CKPT",
                   help="checkpoint of another learned method (a file or a packaged model's name), e.g. subspacenet=runs/ssn/best.pt (repeatable)")
    p.add_argument("--method-option", action="append", default=[], metavar="NAME:KEY=VALUE", dest="method_options",
                   help="an option of one method (repeatable; VALUE read as JSON where it parses; recorded in the report; "
                        "tried on one scene before the run, so a value the method refuses ends the command), e.g. learned:grow=0")
    p.add_argument("--signal", choices=("stochastic", "static"), default=None, help="signal model of the scenes (default: the scenario's)")
    p.add_argument("--config", default=None, metavar="SCENARIO.toml", help="scenario TOML (default: the default scenario of docs/model.md)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="override a scenario field (repeatable), e.g. --set k_max=3")
    p.add_argument("--limit", action="append", default=[], metavar="METHOD=N",
                   help="score METHOD of --methods on the first N scenes only (stated in the report; repeatable)")
    p.add_argument("--oracle-k", action="store_true",
                   help="also run every method that accepts a known K with the true K (rows 'METHOD (K known)')")
    p.add_argument("--no-crb", action="store_true", help="skip the CRB (no RMSE/√CRB ratios)")
    p.add_argument("--no-order-rules", action="store_true", help="skip the source-counting table of the order rules")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--spectrum-scene", type=int, default=None, metavar="I", help="scene of the MUSIC-spectrum plot, 0..S-1 (default: the first with K >= 2 and an SNR of 10-20 dB)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for the run (default: torch's default, 1 with --quick on the CPU)")
    p.add_argument("--strict", action="store_true", help="an exception inside a method (or the CRB) is fatal")
    p.add_argument("--timing-repeats", type=int, default=1, metavar="R",
                   help="time R passes over each method's timed batches and report the median (default 1)")
    p.add_argument("--latency-calls", type=int, default=None, metavar="N",
                   help=f"single-scene calls per method behind the one-scene latency (median, p90), after one warm-up call "
                        f"(default {LATENCY_CALLS}; {QUICK_LATENCY_CALLS} with --quick; 0: not measured)")
    p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...", dest="sweeps",
                   help="run the benchmark at every value of a scenario field, on the same scenes (repeatable: one sweep "
                        "each, in DIR/FIELD/), e.g. --sweep csi_nmse_db=-30,-20,-10 or --sweep signal=stochastic,static")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _methods(text: str) -> list[str]:
    """The names of ``--methods``."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _limits(items: list[str], methods: str) -> dict[str, int]:
    """``METHOD=N`` texts -> ``{METHOD: N}`` for methods of ``--methods``, each N >= 1."""
    names = _methods(methods)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--limit {item!r}: expected METHOD=N")
        name, n = item.split("=", 1)
        name = name.strip()
        if name not in names:
            raise ValueError(f"--limit {item!r}: {name!r} is not one of --methods ({', '.join(names)})")
        try:
            out[name] = int(n)
        except ValueError:
            raise ValueError(f"--limit {item!r}: N must be an integer") from None
        if out[name] < 1:
            raise ValueError(f"--limit {item!r}: N must be >= 1")
    return out


def run(args: argparse.Namespace) -> int:
    import warnings

    from risloc.bench import (LATENCY_CALLS, QUICK_BATCH, QUICK_LATENCY_CALLS, QUICK_SCENES, BenchConfig, check_method_options,
                              run_benchmark, run_sweeps)
    from risloc.scenario import Scenario

    n_scenes = args.scenes if args.scenes is not None else (QUICK_SCENES if args.quick else 2000)
    if n_scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {n_scenes}")
    if args.spectrum_scene is not None and not 0 <= args.spectrum_scene < n_scenes:
        raise ValueError(f"--spectrum-scene {args.spectrum_scene}: the benchmark has {n_scenes} scenes (0..{n_scenes - 1})")
    scenario = Scenario.load(args.config) if args.config else Scenario()
    if args.overrides:
        scenario = scenario.with_overrides(args.overrides)
    if args.signal:
        scenario = scenario.replace(signal=args.signal)
    make = BenchConfig.quick_preset if args.quick else BenchConfig
    cfg = make(
        scenes=n_scenes,
        seed=args.seed,
        methods=args.methods,
        device=args.device,
        batch=args.batch if args.batch is not None else (QUICK_BATCH if args.quick else 256),
        out=args.out,
        scenario=scenario,
        checkpoint=args.checkpoint,
        method_checkpoints=_method_checkpoints(args.method_checkpoint),
        method_options=_method_options(args.method_options, args.methods),
        limits=_limits(args.limit, args.methods),
        crb=not args.no_crb,
        strict=args.strict,
        quick=args.quick,
        plots=not args.no_plots,
        spectrum_scene=args.spectrum_scene,
        threads=args.threads,
        progress=not args.no_progress,
        oracle_k=args.oracle_k,
        timing_repeats=args.timing_repeats,
        order_rules=not args.no_order_rules,
        latency_calls=args.latency_calls if args.latency_calls is not None else (QUICK_LATENCY_CALLS if args.quick else LATENCY_CALLS),
        sweeps=tuple(args.sweeps),
    )
    check_method_options(cfg, flag="--method-option")  # a value the method refuses, before any work (as risloc locate)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_sweeps(cfg, keep=False) if cfg.sweeps else [run_benchmark(cfg)]
    shown = set()
    for w in caught:  # the report's own warnings are printed with the summary below (a sweep: once each)
        text = str(w.message)
        if not text.startswith("risloc bench:"):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif cfg.sweeps and text not in shown:
            shown.add(text)
            print(f"WARNING: {text}", file=sys.stderr)
    for result in results:
        if cfg.sweeps:
            print(f"## sweep {result.sweep.field}: success\n\n{result.table('success')}\n")
            if result.out is not None:
                print(f"sweep: {result.out}\n")
        else:
            print(result.summary())
    print(f"wall time {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _method_checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--method-checkpoint {item!r}: expected NAME=CKPT")
        out[name.strip()] = path.strip()
    return out


_SET_BY_FLAGS = {"checkpoint": "--checkpoint or --method-checkpoint", "K": "--oracle-k", "batch": "--batch", "device": "--device",
                 "progress": "--no-progress"}
"""Estimator options that ``risloc bench`` sets through flags of its own (refused in --method-option)."""


def _method_options(items: list[str], methods: str) -> dict[str, dict]:
    """``NAME:KEY=VALUE`` texts -> ``{NAME: {KEY: value}}`` for the methods of ``--methods``,
    each checked against the estimator's options (:func:`risloc.cli.locate.parse_options`)."""
    from risloc import estimators
    from risloc.cli.locate import parse_options

    names = _methods(methods)
    out: dict[str, dict] = {}
    for item in items:
        name, sep, option = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--method-option {item!r}: expected NAME:KEY=VALUE")
        if name not in names:
            raise ValueError(f"--method-option {item!r}: {name!r} is not one of --methods ({', '.join(names)})")
        out.setdefault(name, {}).update(parse_options(estimators.get(name), [option], flag=f"--method-option {name}:",
                                                      reserved=_SET_BY_FLAGS))
    return out
