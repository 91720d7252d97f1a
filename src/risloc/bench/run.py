"""Running and timing: simulate the scenes, run the CRB and every method on them, score.

Timing rules (see docs/bench.md). Each method is called on batches of ``batch`` scenes that
already sit on the device; the wall time of each call is taken with ``time.perf_counter``
between two ``torch.cuda.synchronize`` (on CUDA). The first batch is a warm-up (caches,
kernels, lazy imports, model loading) and is excluded; if there is only one batch it is run
twice and the second run is timed. With ``timing_repeats`` = R the timed batches are run R
times and the median pass is reported. Simulation, moving results back to the CPU, scoring,
plots and file writing are outside the timed region. The learned estimator keeps its
loaded checkpoint between calls (``risloc.nn.inference``), so the file is read once, in the
warm-up batch.

One-scene latency (``latency_calls`` = n > 0): after a method's batches, it is called n more
times on a batch of ONE scene (scenes 0, 1, ..., cycling), after one untimed warm-up call;
each call is timed alone (CUDA synchronised on both sides) and the median and 90th percentile
of the n times are reported (:class:`Latency`). Not done for the "(K known)" rows.

Not-run and failed methods are kept: a method that is not registered, or that needs a
checkpoint that is not there, is reported as ``not run: <reason>``; an exception inside a
method is reported as ``failed: <message>`` (``strict=True`` re-raises it).

Known K (``oracle_k``): every method whose registry entry accepts a known K
(:attr:`risloc.estimators.EstimatorInfo.accepts_k`) runs a second time with the true K of
each scene, reported as the row ``"<method> (K known)"``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .. import estimators, metrics
from .._provenance import device_info, git_info, now, versions
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from ..seeds import HELD_OUT_SEED

LEARNED_PIPELINE = ("learned", "learned+ml")
"""Methods that read the learned pipeline's checkpoint (``--checkpoint``)."""
DEFAULT_METHODS = ("learned", "learned+ml", "ml", "ml-robust", "sbl", "music", "music+ml", "mvdr", "ramezani", "subspacenet")
"""Methods run when none are named (those missing are reported as not run)."""

QUICK_SCENES = 200
"""Scenes of ``--quick`` (all methods on the same scenes)."""

QUICK_BATCH = 50
"""Batch of ``--quick`` (the first batch is the timing warm-up)."""

QUICK_CPU_THREADS = 1
"""torch threads of ``--quick`` on the CPU: on a shared 2-core machine with other jobs, two
threads made the ml estimator ~15x slower (OpenMP threads waiting on each other) than one."""

LATENCY_CALLS = 20
"""Single-scene calls per method behind the one-scene latency (``--latency-calls``)."""

QUICK_LATENCY_CALLS = 5
"""Single-scene calls per method of ``--quick`` (keeps the quick run within its CPU budget)."""

SNR_RANGES = ((10.0, 20.0), (-5.0, 20.0))
"""SNR ranges reported besides the 5 dB bins (both ends included)."""

NOT_RUN, FAILED, OK = "not run", "failed", "ok"


# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sweep:
    """The benchmark at each level of one scenario field: level i runs on
    ``scenario.replace(**{field: values[i]})``, same seed, scenes ``[0, scenes)``.

    ``Sweep.parse("ris_phase_noise_deg=0,5,10", scenario)``; values are read by the field's
    type as ``--set`` reads them (:meth:`risloc.Scenario.with_overrides`), strings included
    (``signal=stochastic,static``)."""

    field: str
    values: tuple

    @classmethod
    def parse(cls, text: str, scenario: Scenario | None = None) -> "Sweep":
        """``"FIELD=V1,V2,..."`` -> :class:`Sweep`; ValueError naming the field and the value
        for an unknown field, a value the field cannot take (on ``scenario``) or no value."""
        base = scenario if scenario is not None else Scenario()
        name, sep, rest = str(text).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--sweep {text!r}: expected FIELD=V1,V2,...")
        known = [f.name for f in dataclasses.fields(Scenario)]
        if name not in known:
            raise ValueError(f"--sweep {text!r}: unknown Scenario field {name!r}; known: {', '.join(known)}")
        items = [v.strip() for v in rest.split(",") if v.strip()]
        if not items:
            raise ValueError(f"--sweep {text!r}: give at least one value of {name}")
        values = []
        for item in items:
            try:
                values.append(getattr(base.with_overrides([f"{name}={item}"]), name))
            except ValueError as exc:
                raise ValueError(f"--sweep {name}={rest}: value {item!r} of {name}: {exc}") from None
        return cls(name, tuple(values))

    def check(self, scenario: Scenario) -> None:
        """Every level is a valid scenario on ``scenario`` (ValueError naming field and value)."""
        if self.field not in {f.name for f in dataclasses.fields(Scenario)}:
            raise ValueError(f"Sweep.field = {self.field!r}: not a Scenario field")
        if not self.values:
            raise ValueError(f"Sweep {self.field}: give at least one value")
        for v in self.values:
            if list(self.values).count(v) > 1:
                raise ValueError(f"Sweep {self.field}: the value {self.text(v)} is given twice")
        self.scenarios(scenario)

    def scenarios(self, scenario: Scenario) -> list[Scenario]:
        """The scenario of every level: ``scenario`` with the field set to each value."""
        out = []
        for v in self.values:
            try:
                out.append(scenario.replace(**{self.field: v}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"Sweep {self.field}: value {self.text(v)}: {exc}") from None
        return out

    @staticmethod
    def text(value) -> str:
        """A level as written in tables, folder names and legends (``none`` for None)."""
        if value is None:
            return "none"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "values": list(self.values)}


@dataclass
class BenchConfig:
    """What to benchmark. Defaults: 2 000 default-scenario scenes of the held-out seed
    (:data:`risloc.seeds.HELD_OUT_SEED`), every method."""

    scenes: int = 2000
    seed: int = HELD_OUT_SEED
    methods: tuple[str, ...] = DEFAULT_METHODS
    device: str | None = None
    """Torch device of the estimators and the CRB; None: 'cuda' if available, else 'cpu'."""
    batch: int = 256
    """Scenes per estimator call (and timing unit)."""
    out: str | os.PathLike | None = "bench-report"
    """Report folder; None: compute only, write nothing."""
    scenario: Scenario = field(default_factory=Scenario)
    checkpoint: str | os.PathLike | None = None
    """Checkpoint of the learned pipeline (methods learned, learned+ml); None: the packaged default."""
    method_checkpoints: dict[str, str] = field(default_factory=dict)
    """Checkpoints of other learned methods by name, e.g. ``{"subspacenet": "runs/ssn/best.pt"}``."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra keyword options per method of ``methods``, e.g. ``{"ml": {"iterations": 2}}`` (recorded in
    results.json). A value the estimator refuses makes the method fail when it runs;
    :func:`check_method_options` refuses it up front (``risloc bench`` does)."""
    limits: dict[str, int] = field(default_factory=dict)
    """Optional per-method scene caps (the first n scenes only) of methods of ``methods``; stated in the report. Avoid."""
    crb: bool = True
    strict: bool = False
    """Re-raise an exception inside a method (or the CRB) instead of reporting it as failed."""
    quick: bool = False
    """Marks the run as the ``--quick`` configuration in the report (see :meth:`quick_preset`)."""
    plots: bool = True
    spectrum_scene: int | None = None
    """Scene of the MUSIC-spectrum plot (0 .. scenes - 1); None: the first scene with K >= 2 and 10 <= SNR <= 20 dB."""
    threads: int | None = None
    """torch intra-op CPU threads during the run (``torch.set_num_threads``, restored after); None: unchanged."""
    spectrum_grid: tuple[int, int, int] = (97, 49, 16)
    """(n_phi, n_theta, n_r) of the spectrum plot (angles uniform, ranges uniform in 1/r)."""
    progress: bool = True
    oracle_k: bool = False
    """Also run every method that accepts a known K with the true K (rows "<method> (K known)")."""
    order_rules: bool = True
    """Also count the sources of every scene with each order rule of
    :func:`risloc.estimators.order.order_estimates` (the source-counting table of the report)."""
    timing_repeats: int = 1
    """Passes over the timed batches per method (the results are those of the first); the
    reported time is the median pass (a short run on a shared or freshly started GPU varies by
    tens of percent from run to run)."""
    latency_calls: int = LATENCY_CALLS
    """Single-scene calls per method behind the one-scene latency (median and 90th percentile,
    after one warm-up call); 0: not measured."""
    sweeps: tuple["Sweep", ...] = ()
    """Sweeps over scenario fields (:class:`Sweep`, or ``"FIELD=V1,V2,..."`` texts read against
    ``scenario``), run by :func:`risloc.bench.sweep.run_sweeps`; empty: one benchmark."""

    def __post_init__(self):
        if self.scenes < 1:
            raise ValueError(f"BenchConfig.scenes = {self.scenes}: must be >= 1")
        if isinstance(self.timing_repeats, bool) or not isinstance(self.timing_repeats, int) or self.timing_repeats < 1:
            raise ValueError(f"BenchConfig.timing_repeats = {self.timing_repeats!r}: must be an integer >= 1")
        if self.batch < 1:
            raise ValueError(f"BenchConfig.batch = {self.batch}: must be >= 1")
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(dict.fromkeys(self.methods))  # unique, in order
        if not self.methods:
            raise ValueError("BenchConfig.methods: name at least one method")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"BenchConfig.threads = {self.threads}: must be >= 1")
        for what, per_method in (("limits", self.limits), ("method_options", self.method_options)):
            for name in per_method:
                if name not in self.methods:
                    raise ValueError(f"BenchConfig.{what}[{name!r}]: {name!r} is not one of methods ({', '.join(self.methods)})")
        for name, n in self.limits.items():
            if int(n) < 1:
                raise ValueError(f"BenchConfig.limits[{name!r}] = {n}: must be >= 1")
        if self.spectrum_scene is not None and not 0 <= self.spectrum_scene < self.scenes:
            raise ValueError(f"BenchConfig.spectrum_scene = {self.spectrum_scene}: the benchmark has {self.scenes} scenes "
                             f"(0..{self.scenes - 1})")
        if isinstance(self.latency_calls, bool) or not isinstance(self.latency_calls, int) or self.latency_calls < 0:
            raise ValueError(f"BenchConfig.latency_calls = {self.latency_calls!r}: must be an integer >= 0 (0: no latency)")
        if isinstance(self.sweeps, (str, Sweep)):
            self.sweeps = (self.sweeps,)
        self.sweeps = tuple(s if isinstance(s, Sweep) else Sweep.parse(s, self.scenario) for s in self.sweeps)
        seen = [s.field for s in self.sweeps]
        for s in self.sweeps:
            s.check(self.scenario)
            if seen.count(s.field) > 1:
                raise ValueError(f"BenchConfig.sweeps: the field {s.field!r} is swept twice; give its values in one sweep")

    @classmethod
    def quick_preset(cls, **changes) -> "BenchConfig":
        """The ``--quick`` configuration: :data:`QUICK_SCENES` scenes, batch :data:`QUICK_BATCH`,
        :data:`QUICK_LATENCY_CALLS` single-scene calls per method for the latency,
        every method with its default options (no cheaper settings), same scenes for all; on
        the CPU one torch thread (:data:`QUICK_CPU_THREADS`) unless ``threads`` is given."""
        base: dict[str, Any] = dict(scenes=QUICK_SCENES, batch=QUICK_BATCH, quick=True, latency_calls=QUICK_LATENCY_CALLS)
        base.update(changes)
        if base.get("threads") is None and cls(**{**base, "threads": None}).resolved_device().type == "cpu":
            base["threads"] = QUICK_CPU_THREADS
        return cls(**base)

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["scenario"] = self.scenario.to_dict()
        d["device"] = str(self.resolved_device())
        d["out"] = None if self.out is None else str(self.out)
        d["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        d["method_checkpoints"] = {k: str(v) for k, v in self.method_checkpoints.items()}
        d["methods"] = list(self.methods)
        d["sweeps"] = [s.to_dict() for s in self.sweeps]
        return d

    def checkpoint_for(self, name: str) -> str | os.PathLike | None:
        """The checkpoint given for method ``name`` (``checkpoint`` serves the learned pipeline's methods)."""
        if name in self.method_checkpoints:
            return self.method_checkpoints[name]
        return self.checkpoint if name in LEARNED_PIPELINE else None


@dataclass
class Timing:
    """Wall time of the timed batches (warm-up excluded): the median over ``passes``."""

    seconds: float = 0.0
    scenes: int = 0
    warmup_scenes: int = 0
    warmup_seconds: float = 0.0
    batches: int = 0
    passes: list[float] = field(default_factory=list)
    """Wall time of each pass over the timed batches (``BenchConfig.timing_repeats`` of them)."""

    @property
    def scenes_per_s(self) -> float:
        return self.scenes / self.seconds if self.seconds > 0 and self.scenes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "scenes_per_s": self.scenes_per_s}


@dataclass
class Latency:
    """One-scene latency: the wall time of ``n`` single-scene calls (warm-up call excluded)."""

    calls_s: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def n(self) -> int:
        return len(self.calls_s)

    @property
    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.calls_s)) if self.calls_s else float("nan")

    @property
    def p90_ms(self) -> float:
        """90th percentile (linear interpolation between order statistics, ``numpy.percentile``)."""
        return 1e3 * float(np.percentile(self.calls_s, 90)) if self.calls_s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median_ms, "p90": self.p90_ms, "n": self.n, "warmup": 1e3 * self.warmup_s,
                "calls": [1e3 * t for t in self.calls_s], "unit": "ms"}


@dataclass
class MethodResult:
    """One method's outcome: ``status`` is 'ok', 'not run' or 'failed' (with ``reason``)."""

    name: str
    status: str
    reason: str = ""
    method: str = ""
    """The registered estimator (``name`` is the row: the method, or "<method> (K known)")."""
    known_k: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    n_scenes: int = 0
    timing: Timing | None = None
    latency: Latency | None = None
    """One-scene latency (``BenchConfig.latency_calls``); None when not measured."""
    estimates: Estimates | None = field(default=None, repr=False)
    score: metrics.Score | None = field(default=None, repr=False)
    error: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def status_text(self) -> str:
        return OK if self.ok else f"{self.status}: {self.reason}"


@dataclass
class BenchResult:
    """Everything a benchmark produced (scenes, CRB, per-method results) and where it was written."""

    config: BenchConfig
    scenes: Scenes = field(repr=False)
    crb: Any = field(default=None, repr=False)
    crb_status: str = OK
    crb_timing: Timing | None = None
    methods: dict[str, MethodResult] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    wall_s: float = 0.0
    simulate_s: float = 0.0
    files: list[str] = field(default_factory=list)
    spectrum: dict[str, Any] = field(default_factory=dict)
    order: dict[str, np.ndarray] = field(default_factory=dict)
    """K-hat ``[S]`` of every order rule (``BenchConfig.order_rules``)."""
    order_status: str = f"{NOT_RUN}: disabled"
    order_timing: Timing | None = None

    # -- views ---------------------------------------------------------------------------
    # -- views (risloc.bench.report) -------------------------------------------------------
    def views(self):
        """(key, title, metrics of a method's score, scene mask) for every reported view."""
        from .report import views

        return views(self)

    def crb_reference(self, mask: np.ndarray) -> dict[str, float] | None:
        """RMS of sqrt(CRB) over the true sources of the masked scenes (finite bounds only) and
        the CRB-efficient success; None without a CRB."""
        if self.crb is None:
            return None
        return crb_reference(self.scenes.truth, self.crb, mask)

    def table(self, key: str = "overall", *, timing: bool | None = None) -> str:
        """The Markdown table of one view (rows: methods, plus the bound)."""
        from .report import table

        return table(self, key, timing=timing)

    def summary(self) -> str:
        """What ``risloc bench`` prints: status lines, overall and SNR-range tables, timing."""
        from .report import summary

        return summary(self)

    def to_dict(self) -> dict[str, Any]:
        """Everything of results.json (strict-JSON-able after cleaning)."""
        from .report import results_dict

        return results_dict(self)

def _np(t) -> np.ndarray:
    if torch.is_tensor(t):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _truth_n(scenes: Scenes, n: int):
    return scenes.truth if n >= len(scenes) else scenes.truth[:n]


def sync_device(device) -> None:
    """Wait for the work queued on ``device`` (``torch.cuda.synchronize`` on CUDA; nothing on
    the CPU): call it on both sides of a timed region."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def crb_reference(truth, crb, mask: np.ndarray | None = None) -> dict[str, float]:
    """For the scenes in ``mask``: RMS of sqrt(CRB) of phi, theta [deg] and r [m] over the true
    sources whose bound of that coordinate is finite, the number of sources and of infinite
    bounds, and the CRB-efficient success (:func:`risloc.metrics.crb_success_probability`)."""
    K = _np(truth.K).astype(np.int64)
    S = K.shape[0]
    mask = np.ones(S, bool) if mask is None else np.asarray(mask, bool)
    p = metrics.crb_success_probability(truth, crb)
    out: dict[str, float] = {"n_scenes": int(mask.sum())}
    active = np.arange(_np(crb.phi).shape[1])[None, :] < K[:, None]
    sel = active & mask[:, None]
    out["n_sources"] = int(sel.sum())
    n_inf = 0
    for name, scale in (("phi", 180 / math.pi), ("theta", 180 / math.pi), ("r", 1.0)):
        v = _np(getattr(crb, name)).astype(np.float64)
        ok = sel & np.isfinite(v)
        n_inf = max(n_inf, int((sel & np.isinf(v)).sum()))
        out[f"rms_sqrt_crb_{name}"] = float(math.sqrt(np.mean(v[ok] ** 2)) * scale) if ok.any() else float("nan")
    out["n_infinite"] = n_inf
    pm = p[mask]
    pm = pm[np.isfinite(pm)]
    out["success_crb"] = float(pm.mean()) if pm.size else float("nan")
    return out




# ----------------------------------------------------------------------------------------------
# running the methods
# ----------------------------------------------------------------------------------------------
def resolve_method(name: str, checkpoint) -> tuple[estimators.Estimator | None, dict[str, Any], str]:
    """``(estimator, options, reason)``: the estimator is None (and ``reason`` says why) when the
    method is not registered or needs a checkpoint that is not there (from the registry's metadata)."""
    try:
        est = estimators.get(name)
    except ValueError:
        try:
            module = estimators.info(name).module
        except ValueError:
            return None, {}, f"unknown method {name!r} (known names: {', '.join(estimators.available()) or 'none'})"
        return None, {}, f"not registered in this installation (module {module} is missing or does not register {name!r})"
    except ImportError as exc:
        return None, {}, f"its module could not be imported ({type(exc).__name__}: {exc})"
    options: dict[str, Any] = {}
    if est.info.learned:
        if checkpoint is not None:
            options["checkpoint"] = str(checkpoint)
        else:
            default = est.info.default_weights_path()
            flag = "--checkpoint CKPT" if name in LEARNED_PIPELINE else f"--method-checkpoint {name}=CKPT"
            if default is None:
                return None, {}, f"no checkpoint (pass {flag}; no packaged weights for this method)"
            if not default.is_file():
                return None, {}, f"no checkpoint (pass {flag}; there is no packaged default {est.info.default_weights})"
    return est, options, ""


def timed_batches(fn: Callable, scenes: Scenes, batch: int, device: torch.device, *, desc: str = "",
                  progress: bool = True, cat: Callable | None = None, indexed: bool = False, repeats: int = 1):
    """Run ``fn`` on consecutive batches of ``scenes`` (already on ``device``); returns
    ``(results concatenated on the CPU, Timing)``. The first batch is the warm-up (not timed);
    a single batch is run twice, the second run timed. ``repeats`` > 1: the timed batches are
    run that many times in all (the results are the first pass's) and the time is the median
    pass. ``indexed``: ``fn(batch, start)`` with the batch's first scene index (e.g. to slice
    per-scene inputs such as a known K)."""
    from tqdm.auto import tqdm

    S = len(scenes)
    starts = list(range(0, S, batch))
    timing = Timing()
    parts = []
    bar = tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress)
    for i, a in enumerate(bar):
        part = scenes[a : a + batch]
        sync_device(device)
        t0 = time.perf_counter()
        res = fn(part, a) if indexed else fn(part)
        sync_device(device)
        dt = time.perf_counter() - t0
        if i == 0:
            timing.warmup_scenes, timing.warmup_seconds = len(part), dt
            if len(starts) == 1:
                sync_device(device)
                t0 = time.perf_counter()
                res = fn(part, a) if indexed else fn(part)
                sync_device(device)
                timing.seconds += time.perf_counter() - t0
                timing.scenes += len(part)
                timing.batches += 1
        else:
            timing.seconds += dt
            timing.scenes += len(part)
            timing.batches += 1
        if len(res) != len(part):
            raise ValueError(f"{desc}: returned {len(res)} results for a batch of {len(part)} scenes")
        parts.append(res.to("cpu"))
        bar.set_postfix_str(f"{timing.scenes_per_s:.3g} scenes/s" if timing.scenes else "warm-up")
    bar.close()
    timing.passes = [timing.seconds]
    timed = starts[1:] if len(starts) > 1 else starts
    for _ in range(int(repeats) - 1):  # further passes over the timed batches, results discarded
        total = 0.0
        for a in timed:
            part = scenes[a : a + batch]
            sync_device(device)
            t0 = time.perf_counter()
            fn(part, a) if indexed else fn(part)
            sync_device(device)
            total += time.perf_counter() - t0
        timing.passes.append(total)
    timing.seconds = statistics.median(timing.passes)
    out = (cat or type(parts[0]).cat)(parts)
    return out, timing


def one_scene_latency(fn: Callable, scenes: Scenes, calls: int, device: torch.device) -> Latency:
    """``fn`` called ``calls`` times on a batch of one scene (scenes 0, 1, ... of ``scenes``,
    cycling), after one untimed warm-up call on scene 0; each call timed alone with
    ``time.perf_counter`` between two :func:`sync_device`."""
    out = Latency()
    for i in range(-1, int(calls)):
        one = scenes[max(i, 0) % len(scenes)]
        sync_device(device)
        t0 = time.perf_counter()
        res = fn(one)
        sync_device(device)
        dt = time.perf_counter() - t0
        if len(res) != 1:
            raise ValueError(f"returned {len(res)} results for a batch of one scene")
        if i < 0:
            out.warmup_s = dt
        else:
            out.calls_s.append(dt)
    return out


def _run_method(name: str, cfg: BenchConfig, scenes_dev: Scenes, truth_cpu, snr_cpu, crb_cpu, device, *,
                known_k: bool = False) -> MethodResult:
    from .report import jsonable

    row = f"{name} (K known)" if known_k else name
    est_fn, options, reason = resolve_method(name, cfg.checkpoint_for(name))
    options.update(cfg.method_options.get(name, {}))
    if est_fn is None:
        return MethodResult(row, NOT_RUN, reason, method=name, known_k=known_k, options=jsonable(options))
    n = min(len(scenes_dev), int(cfg.limits.get(name, len(scenes_dev))))
    res = MethodResult(row, OK, method=name, known_k=known_k, options=jsonable(options),
                       defaults=jsonable(dict(est_fn.options)), n_scenes=n)
    try:
        torch.manual_seed(cfg.seed)
        sub = scenes_dev if n == len(scenes_dev) else scenes_dev[:n]
        t = truth_cpu if n == len(truth_cpu) else truth_cpu[:n]
        if known_k:
            K_all = t.K.to(device=device, dtype=torch.int64)

            def call(s: Scenes, a: int) -> Estimates:
                return est_fn(s, K=K_all[a : a + len(s)], batch=cfg.batch, **options)
        else:
            def call(s: Scenes, a: int) -> Estimates:
                return est_fn(s, batch=cfg.batch, **options)

        est, timing = timed_batches(call, sub, cfg.batch, device, desc=row, progress=cfg.progress, indexed=True,
                                    repeats=cfg.timing_repeats)
        snr = None if snr_cpu is None else snr_cpu[:n]
        crb = None if crb_cpu is None else (crb_cpu if n == len(crb_cpu) else crb_cpu[:n])
        res.score = metrics.score(t, est, snr_db=snr, crb=crb)
        res.estimates, res.timing, res.label = est, timing, getattr(est, "method", "") or name
        if cfg.latency_calls and not known_k:
            res.latency = one_scene_latency(lambda s: call(s, 0), sub, cfg.latency_calls, device)
    except Exception as exc:  # noqa: BLE001 - reported, or re-raised with --strict
        if cfg.strict:
            raise
        msg = f"{type(exc).__name__}: {exc}".strip()
        return MethodResult(row, FAILED, msg.splitlines()[0][:500], method=name, known_k=known_k, options=res.options,
                            defaults=res.defaults, n_scenes=n, error=traceback.format_exc())
    return res


def checkpoint_files(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with its checkpoints (``checkpoint``, ``method_checkpoints``) as files: a bare name
    such as ``"mixed"`` becomes the packaged model's file
    (:func:`risloc.nn.checkpoint.named_checkpoint`). An unknown name (ValueError listing the
    packaged models) or a missing file (FileNotFoundError) is refused naming the flag."""
    from ..nn.checkpoint import named_checkpoint

    checkpoint = cfg.checkpoint
    if checkpoint is not None:
        checkpoint = named_checkpoint(checkpoint, "--checkpoint")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file")
    files = {}
    for name, path in cfg.method_checkpoints.items():
        files[name] = str(named_checkpoint(path, f"--method-checkpoint {name}:"))
        if not Path(files[name]).is_file():
            raise FileNotFoundError(f"--method-checkpoint {name}={path}: no such file")
    return dataclasses.replace(cfg, checkpoint=checkpoint, method_checkpoints=files)


def run_benchmark(config: BenchConfig | None = None, **changes) -> BenchResult:
    """Simulate the held-out scenes, run the CRB and every method on them, score, write the report.

    ``config`` (or keyword changes to the default :class:`BenchConfig`). Returns a
    :class:`BenchResult`; with ``config.out`` set, ``report.md``, ``results.json`` and the
    PNG plots are written there (each file atomically).
    """
    cfg = dataclasses.replace(config, **changes) if config is not None else BenchConfig(**changes)
    if cfg.sweeps:
        raise ValueError("BenchConfig.sweeps is set: run the sweeps with risloc.bench.run_sweeps (one benchmark per level)")
    cfg = checkpoint_files(cfg)
    with _torch_threads(cfg.threads):
        return _run_benchmark(cfg)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_method_options(config: BenchConfig, *, flag: str = "BenchConfig.method_options") -> None:
    """Refuse, before any benchmark work, an option value that its method refuses (``learned``'s
    ``over = -1``), as ``risloc locate`` refuses it on its first batch; the benchmark itself would
    report the method as failed.

    The estimators check their option values when called, so every method with options in
    ``config.method_options`` is called once with them on one scene (scene 0 of the benchmark's
    stream). A ``ValueError`` there is raised again here, after ``flag``, unless the same call
    without the options fails too: then the options are not at fault, and the benchmark reports
    the method as failed. Methods that will not run (:func:`resolve_method`) are skipped; the
    benchmark reports them as not run.
    """
    from ..simulate import simulate

    given = {name: opts for name, opts in config.method_options.items() if opts}
    if not given:
        return
    cfg = checkpoint_files(config)
    device = cfg.resolved_device()
    with _torch_threads(cfg.threads):
        scene = dataclasses.replace(simulate(cfg.scenario, 1, seed=cfg.seed, device="cpu").to(device), truth=None)
        for name, opts in given.items():
            est_fn, options, _ = resolve_method(name, cfg.checkpoint_for(name))
            if est_fn is None:
                continue
            try:
                est_fn(scene, **options, **opts)
                continue
            except ValueError as exc:
                refused = exc
            except Exception:  # noqa: BLE001 - not a refused value: the benchmark reports it
                continue
            try:
                est_fn(scene, **options)
            except Exception:  # noqa: BLE001 - it fails without the options too: the benchmark reports it
                continue
            raise ValueError(f"{flag}: {refused}") from None


def _run_benchmark(cfg: BenchConfig) -> BenchResult:
    from ..crb import CRBResult, crb_for_scenes
    from ..simulate import simulate

    device = cfg.resolved_device()
    started, t_start = now(), time.perf_counter()

    t0 = time.perf_counter()
    scenes = simulate(cfg.scenario, cfg.scenes, seed=cfg.seed, device="cpu")
    simulate_s = time.perf_counter() - t0
    # what a receiver is given: the estimators never see the truth (the CRB and the scoring do)
    scenes_dev = scenes.to(device)
    inputs_dev = dataclasses.replace(scenes_dev, truth=None)
    result = BenchResult(cfg, scenes, device=device_info(device), versions=versions(), git=git_info(),
                         started=started, simulate_s=simulate_s)

    from tqdm.auto import tqdm

    steps = (["CRB"] if cfg.crb else []) + list(cfg.methods)
    if cfg.oracle_k:
        steps += [(m, True) for m in cfg.methods if _accepts_k(m)]
    if cfg.order_rules:
        steps.append("order rules")
    bar = tqdm(steps, desc="bench", unit="method", disable=not cfg.progress)
    for step in bar:
        bar.set_postfix_str(step if isinstance(step, str) else f"{step[0]} (K known)")
        if step == "CRB" and cfg.crb:
            try:
                result.crb, result.crb_timing = timed_batches(
                    lambda s: crb_for_scenes(s), scenes_dev, cfg.batch, device, desc="CRB", progress=cfg.progress, cat=CRBResult.cat,
                    repeats=cfg.timing_repeats)
            except Exception as exc:  # noqa: BLE001
                if cfg.strict:
                    raise
                result.crb_status = f"{FAILED}: {type(exc).__name__}: {exc}"
                warnings.warn(f"risloc bench: the CRB failed ({result.crb_status}); scores without CRB ratios", stacklevel=2)
            continue
        if step == "order rules":
            _run_order_rules(result, inputs_dev, cfg, device)
            continue
        name, known = (step, False) if isinstance(step, str) else step
        r = _run_method(name, cfg, inputs_dev, scenes.truth, scenes.snr_db, result.crb, device, known_k=known)
        result.methods[r.name] = r
        if not r.ok:
            warnings.warn(f"risloc bench: {r.name}: {r.status_text}", stacklevel=2)
    bar.close()
    if not cfg.crb:
        result.crb_status = f"{NOT_RUN}: disabled"

    if cfg.out is not None:
        from .report import write_json, write_report

        write_report(result, cfg.out)
    result.finished = now()
    result.wall_s = time.perf_counter() - t_start
    if cfg.out is not None:  # results.json again with the final wall time
        write_json(result, Path(cfg.out))
    return result


def _run_order_rules(result: BenchResult, scenes_dev: Scenes, cfg: BenchConfig, device) -> None:
    """Every order rule's K-hat on the scenes (timed like a method; failures are reported, not raised)."""
    from ..estimators.order import SCENE_RULES, order_estimates

    def call(s: Scenes) -> torch.Tensor:  # [S, rules]
        ks = order_estimates(s, rules=SCENE_RULES)
        return torch.stack([ks[rule] for rule in SCENE_RULES], 1)

    try:
        ks, result.order_timing = timed_batches(call, scenes_dev, cfg.batch, device, desc="order rules", progress=cfg.progress,
                                                cat=lambda parts: torch.cat([p.cpu() for p in parts]), repeats=cfg.timing_repeats)
        result.order = {rule: _np(ks[:, i]).astype(np.int64) for i, rule in enumerate(SCENE_RULES)}
        result.order_status = OK
    except Exception as exc:  # noqa: BLE001
        if cfg.strict:
            raise
        result.order_status = f"{FAILED}: {type(exc).__name__}: {exc}"
        warnings.warn(f"risloc bench: the order rules failed ({result.order_status})", stacklevel=2)


def _accepts_k(name: str) -> bool:
    try:
        return estimators.info(name).accepts_k
    except ValueError:
        return False
