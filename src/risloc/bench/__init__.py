"""`risloc bench`: every estimator and the Cramér–Rao bound on one set of held-out scenes.

The benchmark is the toolkit's main report::

    scenes = simulate(scenario, n_scenes, seed=HELD_OUT_SEED)        drawn on the CPU, then moved
    crb    = crb_for_scenes(scenes)                                  the bound, same scenes
    for method in methods:  est = estimators.get(method)(batch)       timed per batch, same scenes
                            latency: median / p90 of single-scene calls
                            score = metrics.score(truth, est, snr_db=..., crb=crb)
    report: report.md (tables), results.json (everything), PNG figures

Sweeps (:mod:`~risloc.bench.sweep`, ``risloc bench --sweep FIELD=V1,V2,...``): the same
benchmark at every level of one scenario field, on the same seed and scene indices, with a
table and a plot of success against the level.

Held-out set. Scenes are the stream :data:`risloc.seeds.HELD_OUT_SEED` of
:func:`risloc.simulate` (scenes ``[0, n_scenes)``), distinct from the training streams and
from the validation seeds that defaults are chosen on (:mod:`risloc.seeds`); the report says
whether the seed it ran on is the held-out one. Scenes are always drawn on the CPU (torch's
CPU and CUDA generators differ) and then moved to ``device``, so the set is the same
whatever device runs the estimators.

The package: :mod:`~risloc.bench.run` (configuration, running and timing),
:mod:`~risloc.bench.report` (views, tables, report.md, results.json),
:mod:`~risloc.bench.figures` (the PNG figures), :mod:`~risloc.bench.sweep` (sweeps). The provenance of a run (version, commit,
device, versions) comes from :mod:`risloc._provenance`. See docs/bench.md.
"""

from .._provenance import device_info, git_info, versions
from ..seeds import HELD_OUT_SEED, VALIDATION_SEEDS
from .figures import spectrum_data
from .report import RANGE_BUCKETS_M, SEPARATION_BUCKETS, beamwidth, render_report, write_report
from .run import (
    DEFAULT_METHODS,
    FAILED,
    LATENCY_CALLS,
    NOT_RUN,
    OK,
    QUICK_BATCH,
    QUICK_LATENCY_CALLS,
    QUICK_SCENES,
    SNR_RANGES,
    BenchConfig,
    BenchResult,
    Latency,
    MethodResult,
    Sweep,
    Timing,
    check_method_options,
    crb_reference,
    one_scene_latency,
    resolve_method,
    run_benchmark,
    sync_device,
    timed_batches,
)
from .sweep import CRB_LABEL, SweepResult, run_sweep, run_sweeps

__all__ = [
    "BenchConfig", "BenchResult", "MethodResult", "Timing", "run_benchmark", "check_method_options", "write_report", "render_report",
    "crb_reference", "device_info", "sync_device", "git_info", "versions", "resolve_method", "timed_batches", "spectrum_data",
    "HELD_OUT_SEED", "VALIDATION_SEEDS", "DEFAULT_METHODS", "OK", "NOT_RUN", "FAILED", "QUICK_SCENES", "QUICK_BATCH", "SNR_RANGES",
    "RANGE_BUCKETS_M", "SEPARATION_BUCKETS", "beamwidth",
    "Latency", "one_scene_latency", "LATENCY_CALLS", "QUICK_LATENCY_CALLS",
    "Sweep", "SweepResult", "run_sweep", "run_sweeps", "CRB_LABEL",
]
