"""`risloc bench`: every estimator and the Cramér–Rao bound on one held-out set of scenes.

The benchmark is the toolkit's main report::

    scenes = simulate(scenario, n_scenes, seed=HELD_OUT_SEED)        drawn on the CPU, then moved
    crb    = crb_for_scenes(scenes)                                  the bound, same scenes
    for method in methods:  est = estimators.get(method)(batch)       timed per batch, same scenes
                            score = metrics.score(truth, est, snr_db=..., crb=crb)
    report: report.md (tables), results.json (everything), PNG plots

Held-out set. Scenes are the stream ``seed = 2026`` of :func:`risloc.simulate` (scenes
``[0, n_scenes)``), a stream distinct from training (``TrainConfig.seed = 0``) and from
validation during training (``val_seed = 1_000_003``): with ``SeedSequence([seed, block])``
per block of 1024 scenes no block of another seed is ever reused. They are always drawn on
the CPU (torch's CPU and CUDA generators differ) and then moved to ``device``, so the set
is the same whatever device runs the estimators.

Timing rules (see docs/bench.md). Each method is called on batches of ``batch`` scenes that
already sit on the device; the wall time of each call is taken with ``time.perf_counter``
between two ``torch.cuda.synchronize`` (on CUDA). The first batch is a warm-up (caches,
kernels, lazy imports, model loading) and is excluded; if there is only one batch it is run
twice and the second run is timed. Simulation, moving results back to the CPU, scoring,
plots and file writing are outside the timed region. The learned estimator keeps its
loaded checkpoint between calls (``risloc.nn.inference``), so the file is read once, in the
warm-up batch.

Not-run and failed methods are kept: a method that is not registered, or that needs a
checkpoint that is not there, is reported as ``not run: <reason>``; an exception inside a
method is reported as ``failed: <message>`` (``strict=True`` re-raises it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import estimators, metrics
from ._files import atomic_write_text, nan_to_none
from .scenario import Scenario
from .scenes import Estimates, Scenes

HELD_OUT_SEED = 2026
"""Seed of the benchmark's scene stream (distinct from training's 0 and validation's 1_000_003)."""

LEARNED_PIPELINE = ("learned", "learned+ml")
"""Methods that read the learned pipeline's checkpoint (``--checkpoint``)."""
DEFAULT_METHODS = ("learned", "learned+ml", "ml", "music", "mvdr", "ramezani", "subspacenet")
"""Methods run when none are named (those missing are reported as not run)."""

QUICK_SCENES = 200
"""Scenes of ``--quick`` (all methods on the same scenes)."""

QUICK_BATCH = 50
"""Batch of ``--quick`` (the first batch is the timing warm-up)."""

QUICK_CPU_THREADS = 1
"""torch threads of ``--quick`` on the CPU: on a shared 2-core machine with other jobs, two
threads made the ml estimator ~15x slower (OpenMP threads waiting on each other) than one."""

SNR_RANGES = ((10.0, 20.0), (-5.0, 20.0))
"""SNR ranges reported besides the 5 dB bins (both ends included)."""

NOT_RUN, FAILED, OK = "not run", "failed", "ok"


# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to benchmark. Defaults: 2 000 default-scenario scenes of seed 2026, every method."""

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
    """Extra keyword options per method, e.g. ``{"ml": {"batch": 32}}`` (recorded in results.json)."""
    limits: dict[str, int] = field(default_factory=dict)
    """Optional per-method scene caps (the first n scenes only); stated in the report. Avoid."""
    crb: bool = True
    strict: bool = False
    """Re-raise an exception inside a method (or the CRB) instead of reporting it as failed."""
    quick: bool = False
    """Marks the run as the ``--quick`` configuration in the report (see :meth:`quick_preset`)."""
    plots: bool = True
    spectrum_scene: int | None = None
    """Scene of the MUSIC-spectrum plot; None: the first scene with K >= 2 and 10 <= SNR <= 20 dB."""
    threads: int | None = None
    """torch intra-op CPU threads during the run (``torch.set_num_threads``, restored after); None: unchanged."""
    spectrum_grid: tuple[int, int, int] = (97, 49, 16)
    """(n_phi, n_theta, n_r) of the spectrum plot (angles uniform, ranges uniform in 1/r)."""
    progress: bool = True

    def __post_init__(self):
        if self.scenes < 1:
            raise ValueError(f"BenchConfig.scenes = {self.scenes}: must be >= 1")
        if self.batch < 1:
            raise ValueError(f"BenchConfig.batch = {self.batch}: must be >= 1")
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(dict.fromkeys(self.methods))  # unique, in order
        if not self.methods:
            raise ValueError("BenchConfig.methods: name at least one method")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"BenchConfig.threads = {self.threads}: must be >= 1")
        for name, n in self.limits.items():
            if int(n) < 1:
                raise ValueError(f"BenchConfig.limits[{name!r}] = {n}: must be >= 1")

    @classmethod
    def quick_preset(cls, **changes) -> "BenchConfig":
        """The ``--quick`` configuration: :data:`QUICK_SCENES` scenes, batch :data:`QUICK_BATCH`,
        every method with its default options (no cheaper settings), same scenes for all; on
        the CPU one torch thread (:data:`QUICK_CPU_THREADS`) unless ``threads`` is given."""
        base: dict[str, Any] = dict(scenes=QUICK_SCENES, batch=QUICK_BATCH, quick=True)
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
        return d

    def checkpoint_for(self, name: str) -> str | os.PathLike | None:
        """The checkpoint given for method ``name`` (``checkpoint`` serves the learned pipeline's methods)."""
        if name in self.method_checkpoints:
            return self.method_checkpoints[name]
        return self.checkpoint if name in LEARNED_PIPELINE else None


@dataclass
class Timing:
    """Wall time of the timed batches (warm-up excluded)."""

    seconds: float = 0.0
    scenes: int = 0
    warmup_scenes: int = 0
    warmup_seconds: float = 0.0
    batches: int = 0

    @property
    def scenes_per_s(self) -> float:
        return self.scenes / self.seconds if self.seconds > 0 and self.scenes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "scenes_per_s": self.scenes_per_s}


@dataclass
class MethodResult:
    """One method's outcome: ``status`` is 'ok', 'not run' or 'failed' (with ``reason``)."""

    name: str
    status: str
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    n_scenes: int = 0
    timing: Timing | None = None
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

    # -- views ---------------------------------------------------------------------------
    def views(self) -> list[tuple[str, str, Callable[[metrics.Score], metrics.Metrics | None], np.ndarray]]:
        """(key, title, metrics of a method's score, scene mask) for every reported view."""
        snr = _np(self.scenes.snr_db) if self.scenes.snr_db is not None else np.full(len(self.scenes), np.nan)
        K = _np(self.scenes.truth.K).astype(np.int64)
        out = [("overall", "Overall", lambda s: s.overall, np.ones(len(K), bool))]
        for lo, hi in SNR_RANGES:
            with np.errstate(invalid="ignore"):
                mask = (snr >= lo) & (snr <= hi)
            out.append((f"snr_{lo:g}_{hi:g}", f"SNR {lo:g}…{hi:g} dB (both ends included)",
                        (lambda s, lo=lo, hi=hi: _subset(s, lo, hi)), mask))
        bins = sorted({b for r in self.methods.values() if r.ok for b in r.score.by_snr})
        for lo, hi in bins:
            with np.errstate(invalid="ignore"):
                mask = (snr >= lo) & (snr < hi)
            out.append((f"snr_bin_{lo:g}_{hi:g}", f"SNR bin [{lo:g}, {hi:g}) dB",
                        (lambda s, b=(lo, hi): s.by_snr.get(b)), mask))
        for k in sorted({int(k) for k in np.unique(K)}):
            out.append((f"K_{k}", f"K = {k}", (lambda s, k=k: s.by_k.get(k)), K == k))
        return out

    def crb_reference(self, mask: np.ndarray) -> dict[str, float] | None:
        """RMS of sqrt(CRB) over the true sources of the masked scenes (finite bounds only) and
        the CRB-efficient success; None without a CRB."""
        if self.crb is None:
            return None
        return crb_reference(self.scenes.truth, self.crb, mask)

    def table(self, key: str = "overall", *, timing: bool | None = None) -> str:
        """The Markdown table of one view (rows: methods, plus the bound)."""
        for k, title, get, mask in self.views():
            if k == key:
                return _view_table(self, get, mask, timing=(key == "overall") if timing is None else timing)
        raise ValueError(f"unknown view {key!r}; known: {[v[0] for v in self.views()]}")

    def summary(self) -> str:
        """What ``risloc bench`` prints: status lines, overall and SNR-range tables, timing."""
        parts = [f"risloc bench: {len(self.scenes)} scenes (seed {self.config.seed}), device {self.device.get('name', '?')}", ""]
        for k, title, get, mask in self.views()[: 1 + len(SNR_RANGES)]:
            parts += [f"## {title}", "", _view_table(self, get, mask, timing=k == "overall"), ""]
        bad = [r for r in self.methods.values() if not r.ok]
        for r in bad:
            parts.append(f"WARNING: {r.name}: {r.status_text}")
        if self.crb_status != OK:
            parts.append(f"WARNING: CRB: {self.crb_status}")
        if self.files:
            parts.append(f"report: {Path(self.files[0]).parent}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Everything of results.json (strict-JSON-able after :func:`_clean`)."""
        cfg = self.config
        views = self.views()
        meth = {}
        for name, r in self.methods.items():
            d: dict[str, Any] = {
                "status": r.status, "reason": r.reason, "label": r.label, "options": r.options,
                "defaults": r.defaults, "n_scenes": r.n_scenes,
                "timing": r.timing.to_dict() if r.timing else None,
            }
            if r.error:
                d["traceback"] = r.error
            if r.ok:
                d["score"] = r.score.to_dict()
                d["snr_ranges"] = [
                    {"snr_lo": lo, "snr_hi": hi, **(_subset(r.score, lo, hi) or _empty_metrics()).to_dict()}
                    for lo, hi in SNR_RANGES
                ]
                d["k_confusion"] = metrics.k_confusion(_truth_n(self.scenes, r.n_scenes), r.estimates, k_max=self.scenes.scenario.k_max).tolist()
            meth[name] = d
        crb = {"status": self.crb_status, "signal": self.scenes.scenario.signal,
               "timing": self.crb_timing.to_dict() if self.crb_timing else None}
        if self.crb is not None:
            crb["n_regular"] = int(_np(self.crb.regular).sum())
            crb["reference"] = {k: self.crb_reference(mask) for k, _, _, mask in views}
        return {
            "format": "risloc-bench",
            "version": 1,
            "started": self.started,
            "finished": self.finished,
            "wall_s": self.wall_s,
            "simulate_s": self.simulate_s,
            "quick": cfg.quick,
            "seeds": {"scenes": cfg.seed, "stream": f"risloc.simulate(scenario, {len(self.scenes)}, seed={cfg.seed}, start=0, device='cpu')",
                      "torch_manual_seed_per_method": cfg.seed},
            "n_scenes": len(self.scenes),
            "scenario": self.scenes.scenario.to_dict(),
            "config": cfg.to_dict(),
            "device": self.device,
            "versions": self.versions,
            "git": self.git,
            "timing_rules": "per-batch wall time (perf_counter, CUDA synchronised), first batch = warm-up excluded, "
                            "simulation / device->host copies / scoring / file I/O excluded",
            "methods": meth,
            "crb": crb,
            "spectrum": self.spectrum,
            "views": [{"key": k, "title": t, "n_scenes": int(m.sum())} for k, t, _, m in views],
            "files": [os.path.basename(f) for f in self.files],
        }


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _np(t) -> np.ndarray:
    if torch.is_tensor(t):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _subset(score: metrics.Score, lo: float, hi: float) -> metrics.Metrics | None:
    try:
        return score.subset(lo, hi).overall
    except ValueError:  # no SNR known
        return None


def _empty_metrics() -> metrics.Metrics:
    nan = float("nan")
    return metrics.Metrics(0, nan, nan, nan, nan, nan, nan, nan, 0, 0, 0, nan, nan, nan, nan, 0, 0)


def _truth_n(scenes: Scenes, n: int):
    return scenes.truth if n >= len(scenes) else scenes.truth[:n]


def sync_device(device) -> None:
    """Wait for the work queued on ``device`` (``torch.cuda.synchronize`` on CUDA; nothing on
    the CPU): call it on both sides of a timed region."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def device_info(device: torch.device) -> dict[str, Any]:
    """Name of the device that ran the estimators (GPU name, or CPU model and torch threads)."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.lower().startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu_model"] = model
        info["cpu_count"] = os.cpu_count()
        info["name"] = f"{model} ({torch.get_num_threads()} torch threads)"
    return info


def versions() -> dict[str, str]:
    from . import __version__

    return {"risloc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def git_info() -> dict[str, Any]:
    """``git rev-parse HEAD`` of the source tree (``"unknown"`` outside a checkout) and whether it is dirty.
    ``RISLOC_GIT_COMMIT`` in the environment wins (a copy of a known commit without ``.git``)."""
    if os.environ.get("RISLOC_GIT_COMMIT"):
        return {"commit": os.environ["RISLOC_GIT_COMMIT"], "dirty": None, "source": "RISLOC_GIT_COMMIT"}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": "unknown"}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown"}


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return str(v)
    if torch.is_tensor(v) and v.numel() <= 16:
        return v.tolist()
    return repr(v)


# ----------------------------------------------------------------------------------------------
# running the methods
# ----------------------------------------------------------------------------------------------
def _signature(fn) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _defaults(fn) -> dict[str, Any]:
    """The keyword defaults of an estimator (and its module's ``DEFAULTS`` dict, if any)."""
    out = {n: _jsonable(p.default) for n, p in _signature(fn).items()
           if p.default is not inspect.Parameter.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    mod = sys.modules.get(getattr(fn, "__module__", ""), None)
    extra = getattr(mod, "DEFAULTS", None)
    if isinstance(extra, dict):
        out.update({k: _jsonable(v) for k, v in extra.items()})
    return out


def _default_weights(fn) -> Path | None:
    mod = sys.modules.get(getattr(fn, "__module__", ""), None)
    w = getattr(mod, "DEFAULT_WEIGHTS", None)
    return Path(w) if w is not None else None


def resolve_method(name: str, checkpoint) -> tuple[Callable | None, dict[str, Any], str]:
    """``(estimator, options, reason)``: the estimator is None (and ``reason`` says why) when the
    method is not registered or needs a checkpoint that is not there."""
    try:
        fn = estimators.get(name)
    except ValueError:
        module = getattr(estimators, "_MODULES", {}).get(name)
        if module is not None:
            return None, {}, f"not registered in this installation (module {module} is missing or does not register {name!r})"
        return None, {}, f"unknown method {name!r} (known names: {', '.join(estimators.available()) or 'none'})"
    except ImportError as exc:
        return None, {}, f"its module could not be imported ({type(exc).__name__}: {exc})"
    params = _signature(fn)
    options: dict[str, Any] = {}
    if "checkpoint" in params:
        if checkpoint is not None:
            options["checkpoint"] = str(checkpoint)
        else:
            default = _default_weights(fn)
            flag = "--checkpoint CKPT" if name in LEARNED_PIPELINE else f"--method-checkpoint {name}=CKPT"
            if default is None:
                return None, {}, f"no checkpoint (pass {flag}; no packaged weights for this method)"
            if not default.is_file():
                return None, {}, f"no checkpoint (pass {flag}; there is no packaged default at {default})"
    return fn, options, ""


def timed_batches(fn: Callable, scenes: Scenes, batch: int, device: torch.device, *, desc: str = "",
                  progress: bool = True, cat: Callable | None = None):
    """Run ``fn`` on consecutive batches of ``scenes`` (already on ``device``); returns
    ``(results concatenated on the CPU, Timing)``. The first batch is the warm-up (not timed);
    a single batch is run twice, the second run timed."""
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
        res = fn(part)
        sync_device(device)
        dt = time.perf_counter() - t0
        if i == 0:
            timing.warmup_scenes, timing.warmup_seconds = len(part), dt
            if len(starts) == 1:
                sync_device(device)
                t0 = time.perf_counter()
                res = fn(part)
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
    out = (cat or type(parts[0]).cat)(parts)
    return out, timing


def _run_method(name: str, cfg: BenchConfig, scenes_dev: Scenes, truth_cpu, snr_cpu, crb_cpu, device) -> MethodResult:
    fn, options, reason = resolve_method(name, cfg.checkpoint_for(name))
    options.update(cfg.method_options.get(name, {}))
    if fn is None:
        return MethodResult(name, NOT_RUN, reason, options=_jsonable(options))
    n = min(len(scenes_dev), int(cfg.limits.get(name, len(scenes_dev))))
    res = MethodResult(name, OK, options=_jsonable(options), defaults=_defaults(fn), n_scenes=n)
    try:
        torch.manual_seed(cfg.seed)
        sub = scenes_dev if n == len(scenes_dev) else scenes_dev[:n]
        est, timing = timed_batches(lambda s: fn(s, **options), sub, cfg.batch, device, desc=name, progress=cfg.progress)
        t = truth_cpu if n == len(truth_cpu) else truth_cpu[:n]
        snr = None if snr_cpu is None else snr_cpu[:n]
        crb = None if crb_cpu is None else (crb_cpu if n == len(crb_cpu) else crb_cpu[:n])
        res.score = metrics.score(t, est, snr_db=snr, crb=crb)
        res.estimates, res.timing, res.label = est, timing, getattr(est, "method", "") or name
    except Exception as exc:  # noqa: BLE001 - reported, or re-raised with --strict
        if cfg.strict:
            raise
        msg = f"{type(exc).__name__}: {exc}".strip()
        return MethodResult(name, FAILED, msg.splitlines()[0][:500], options=res.options, defaults=res.defaults,
                            n_scenes=n, error=traceback.format_exc())
    return res


def run_benchmark(config: BenchConfig | None = None, **changes) -> BenchResult:
    """Simulate the held-out scenes, run the CRB and every method on them, score, write the report.

    ``config`` (or keyword changes to the default :class:`BenchConfig`). Returns a
    :class:`BenchResult`; with ``config.out`` set, ``report.md``, ``results.json`` and the
    PNG plots are written there (each file atomically).
    """
    cfg = dataclasses.replace(config, **changes) if config is not None else BenchConfig(**changes)
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file")
    for name, path in cfg.method_checkpoints.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--method-checkpoint {name}={path}: no such file")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: BenchConfig) -> BenchResult:
    from .crb import CRBResult, crb_for_scenes
    from .simulate import simulate

    device = cfg.resolved_device()
    started, t_start = _now(), time.perf_counter()

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
    bar = tqdm(steps, desc="bench", unit="method", disable=not cfg.progress)
    for step in bar:
        bar.set_postfix_str(step)
        if step == "CRB" and cfg.crb:
            try:
                result.crb, result.crb_timing = timed_batches(
                    lambda s: crb_for_scenes(s), scenes_dev, cfg.batch, device, desc="CRB", progress=cfg.progress, cat=CRBResult.cat)
            except Exception as exc:  # noqa: BLE001
                if cfg.strict:
                    raise
                result.crb_status = f"{FAILED}: {type(exc).__name__}: {exc}"
                warnings.warn(f"risloc bench: the CRB failed ({result.crb_status}); scores without CRB ratios", stacklevel=2)
            continue
        r = _run_method(step, cfg, inputs_dev, scenes.truth, scenes.snr_db, result.crb, device)
        result.methods[step] = r
        if not r.ok:
            warnings.warn(f"risloc bench: {step}: {r.status_text}", stacklevel=2)
    bar.close()
    if not cfg.crb:
        result.crb_status = f"{NOT_RUN}: disabled"

    if cfg.out is not None:
        write_report(result, cfg.out)
    result.finished = _now()
    result.wall_s = time.perf_counter() - t_start
    if cfg.out is not None:  # results.json again with the final wall time
        _write_json(result, Path(cfg.out))
    return result


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
_COLS = [
    ("success", "success"), ("success / CRB-eff.", None), ("K acc", "K_acc"), ("K under", "K_under"),
    ("K over", "K_over"), ("RMSE φ (°)", "rmse_phi_deg"), ("RMSE θ (°)", "rmse_theta_deg"), ("RMSE r (m)", "rmse_r_m"),
    ("φ RMSE/√CRB", "crb_ratio_phi"), ("θ RMSE/√CRB", "crb_ratio_theta"), ("r RMSE/√CRB", "crb_ratio_r"),
    ("pairs", "n_pairs"), ("scenes", "n_scenes"),
]


def _ratio(m: metrics.Metrics) -> float | None:
    if m.success_crb is None:
        return None
    if not m.success_crb:
        return float("nan")
    return m.success / m.success_crb


def _view_table(res: BenchResult, get, mask: np.ndarray, *, timing: bool) -> str:
    f = metrics.format_number
    head = ["method"] + [c[0] for c in _COLS] + (["scenes/s"] if timing else [])
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    ref = res.crb_reference(mask)
    if ref is not None:
        row = ["CRB bound ¹", f(ref["success_crb"]), "–", "–", "–", "–",
               f(ref["rms_sqrt_crb_phi"]), f(ref["rms_sqrt_crb_theta"]), f(ref["rms_sqrt_crb_r"]),
               "1", "1", "1", f(ref["n_sources"]), f(ref["n_scenes"])]
        if timing:
            row.append(f(res.crb_timing.scenes_per_s) if res.crb_timing else "–")
        lines.append("| " + " | ".join(row) + " |")
    for name, r in res.methods.items():
        label = name if not r.ok or r.n_scenes == len(res.scenes) else f"{name} ²"
        if not r.ok:
            if timing:
                lines.append("| " + " | ".join([name, f"{r.status} (see above)"] + ["–"] * (len(head) - 2)) + " |")
            continue
        m = get(r.score)
        if m is None:
            continue
        row = [label] + [f(_ratio(m)) if a is None else f(getattr(m, a)) for _, a in _COLS]
        if timing:
            row.append(f(r.timing.scenes_per_s))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _notes(res: BenchResult) -> list[str]:
    notes = []
    if res.crb is not None:
        notes.append("¹ CRB bound: *success* = CRB-efficient success (an unbiased estimator at the bound that knows K); "
                     "RMSE columns = RMS of √CRB over the true sources of the view (finite bounds only); *pairs* = true sources.")
    lim = [r for r in res.methods.values() if r.ok and r.n_scenes < len(res.scenes)]
    if lim:
        notes.append("² scored on the first " + ", ".join(f"{r.n_scenes} scenes ({r.name})" for r in lim)
                     + f" of the {len(res.scenes)} only (a per-method scene limit): not the same scenes as the other rows.")
    return notes


def _fmt_options(d: dict) -> str:
    if not d:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in d.items()).replace("|", "/")


def render_report(res: BenchResult, plots: list[str]) -> str:
    cfg = res.config
    sc = res.scenes.scenario
    changed = {k: v for k, v in sc.to_dict().items() if Scenario().to_dict()[k] != v}
    L = ["# risloc bench report", ""]
    L += [
        f"- **Scenes**: {len(res.scenes)} held-out scenes, `risloc.simulate(scenario, {len(res.scenes)}, seed={cfg.seed})` "
        f"(drawn on the CPU; training uses seed 0, validation 1000003).",
        f"- **Scenario**: {'default (docs/model.md)' if not changed else 'default except ' + ', '.join(f'{k}={v}' for k, v in changed.items())}; "
        f"signal model `{sc.signal}`; K ∈ 1..{sc.k_max}, SNR ∈ [{sc.snr_db_min:g}, {sc.snr_db_max:g}] dB.",
        f"- **Device**: {res.device.get('name')} (`{res.device.get('device')}`); batch {cfg.batch} scenes.",
        f"- **Versions**: risloc {res.versions.get('risloc')}, torch {res.versions.get('torch')}, numpy {res.versions.get('numpy')}, "
        f"python {res.versions.get('python')}; git `{res.git.get('commit')}`" + (" (uncommitted changes)" if res.git.get("dirty") else "") + ".",
        f"- **Started** {res.started}; simulation {res.simulate_s:.1f} s.",
    ]
    if cfg.quick:
        L.append(f"- **Quick run** (`--quick`): {len(res.scenes)} scenes, every method with its default options, "
                 "all on the same scenes. Small-sample numbers: a ±1 scene change moves success by "
                 f"{100 / len(res.scenes):.1f} points.")
    L += ["", "## Methods", "", "| method | status | estimator label | options | scenes | scenes/s | timed scenes | time (s) |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    f = metrics.format_number
    if cfg.crb:
        t = res.crb_timing
        L.append(f"| CRB ({sc.signal}) | {res.crb_status} | risloc.crb.crb_for_scenes | – | {len(res.scenes)} | "
                 f"{f(t.scenes_per_s) if t else '–'} | {t.scenes if t else '–'} | {f(t.seconds) if t else '–'} |")
    for name, r in res.methods.items():
        t = r.timing
        L.append(f"| {name} | {r.status_text.replace('|', '/')} | {r.label or '–'} | {_fmt_options(r.options)} | {r.n_scenes or '–'} | "
                 f"{f(t.scenes_per_s) if t else '–'} | {t.scenes if t else '–'} | {f(t.seconds) if t else '–'} |")
    L += ["", "Timing: wall time per batch on the device (CUDA synchronised), the first batch of each method excluded "
          "as warm-up; simulation, copies back to the CPU, scoring and file I/O excluded (docs/bench.md)."]
    bad = [r for r in res.methods.values() if not r.ok]
    if bad:
        L += [""] + [f"> **{r.name}** {r.status_text}" for r in bad]
    section = None
    for key, title, get, mask in res.views():
        group = "snr_bin" if key.startswith("snr_bin") else "K" if key.startswith("K_") else None
        if group is not None and group != section:
            L += ["", "## Per SNR bin (5 dB)" if group == "snr_bin" else "## Per true K"]
        section = group
        level = "##" if group is None else "###"
        L += ["", f"{level} {title}", "", _view_table(res, get, mask, timing=key == "overall")]
    notes = _notes(res)
    if notes:
        L += [""] + [n + "  " for n in notes]
    if plots:
        L += ["", "## Plots", ""]
        captions = {
            "rmse_vs_snr.png": "RMSE of φ, θ, r vs SNR (5 dB bins, scenes with K̂ = K) and the RMS √CRB of the same scenes' sources",
            "success_vs_snr.png": "Success rate vs SNR and the CRB-efficient success",
            "k_confusion.png": "Source-count confusion (rows true K, columns K̂), one panel per method",
            "spectrum.png": "MUSIC spectrum of one scene (max over range): " + res.spectrum.get("caption", ""),
        }
        for p in plots:
            L += [f"**{captions.get(p, p)}**", "", f"![{p}]({p})", ""]
    L += ["", "How to read this report: docs/bench.md. All numbers are in results.json.", ""]
    return "\n".join(L)


def _write_json(res: BenchResult, out: Path) -> Path:
    path = out / "results.json"
    text = json.dumps(nan_to_none(_jsonable(res.to_dict())), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def write_report(res: BenchResult, out) -> list[str]:
    """Write the PNG plots, ``report.md`` and ``results.json`` into ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = _make_plots(res, out) if res.config.plots else []
    files = []
    rp = out / "report.md"
    atomic_write_text(rp, render_report(res, plots))
    files.append(str(rp))
    res.files = files + [str(out / p) for p in plots] + [str(out / "results.json")]
    _write_json(res, out)
    return res.files


# ----------------------------------------------------------------------------------------------
# plot data
# ----------------------------------------------------------------------------------------------
def _snr_curves(res: BenchResult) -> tuple[dict[str, dict[str, list]], dict[str, list] | None]:
    curves = {}
    for name, r in res.methods.items():
        if not r.ok or not r.score.by_snr:
            continue
        bins = sorted(r.score.by_snr)
        c = {"snr": [(lo + hi) / 2 for lo, hi in bins]}
        for a in ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "success", "n_pairs"):
            c[a] = [getattr(r.score.by_snr[b], a) for b in bins]
        curves[name] = c
    ref = None
    if res.crb is not None and res.scenes.snr_db is not None:
        snr = _np(res.scenes.snr_db)
        lo_all = np.floor(snr / 5.0) * 5.0
        ref = {"snr": [], "phi": [], "theta": [], "r": [], "success_crb": []}
        for lo in sorted(set(lo_all.tolist())):
            d = crb_reference(res.scenes.truth, res.crb, lo_all == lo)
            ref["snr"].append(lo + 2.5)
            ref["phi"].append(d["rms_sqrt_crb_phi"])
            ref["theta"].append(d["rms_sqrt_crb_theta"])
            ref["r"].append(d["rms_sqrt_crb_r"])
            ref["success_crb"].append(d["success_crb"])
    return curves, ref


def pick_spectrum_scene(scenes: Scenes) -> int:
    """The first scene with K >= 2 and 10 <= SNR <= 20 dB (else K >= 2, else scene 0)."""
    K = _np(scenes.truth.K)
    snr = _np(scenes.snr_db) if scenes.snr_db is not None else np.full(len(K), np.nan)
    for cond in ((K >= 2) & (snr >= 10) & (snr <= 20), K >= 2):
        idx = np.nonzero(cond)[0]
        if idx.size:
            return int(idx[0])
    return 0


def _music_spectrum_db(Es: torch.Tensor, sc: Scenario, phi: np.ndarray, theta: np.ndarray, r: np.ndarray) -> np.ndarray:
    """10 log10 of MUSIC pseudo-spectra, each maximised over the ranges ``r`` and normalised to its
    maximum, ``[B, n_phi, n_theta]`` for signal subspaces ``Es`` ``[B, N, k]`` (one steering
    matrix per range, shared by the B subspaces).

    Uses :func:`risloc.estimators.search.music_spectrum` when present (else the same formula
    ``P = |a|^2 / (|a|^2 - |E_s^H a|^2)`` here)."""
    try:
        from .estimators.search import music_spectrum
    except ImportError:  # pragma: no cover - search.py is part of the package
        music_spectrum = None
    from . import physics

    P_, T_ = np.meshgrid(phi, theta, indexing="ij")
    Pt, Tt = torch.from_numpy(P_), torch.from_numpy(T_)
    best = None
    Es = Es.to(torch.complex128)
    for rr in r:
        if music_spectrum is not None:
            p = music_spectrum(Es, Pt, Tt, torch.tensor(float(rr), dtype=torch.float64), sc)
        else:
            a = physics.steering(Pt.reshape(-1), Tt.reshape(-1), torch.full((P_.size,), float(rr), dtype=torch.float64), sc,
                                 dtype=torch.complex128)
            a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
            proj = (a.conj().unsqueeze(0) @ Es).abs().square().sum(-1)  # [B, P]
            p = (1.0 / (1.0 - proj).clamp(min=1e-300)).reshape(Es.shape[0], *P_.shape)
        p = p.cpu().numpy()
        best = p if best is None else np.maximum(best, p)
    return 10 * np.log10(best / best.max(axis=(1, 2), keepdims=True))


def spectrum_data(res: BenchResult, index: int | None = None, n_phi: int = 97, n_theta: int = 49, n_r: int = 16) -> dict[str, Any]:
    """Panels for the spectrum plot of one scene: learned effective covariance vs sample covariance,
    or (without a usable learned model) true effective covariance vs sample covariance."""
    from . import covariance as cv
    from .simulate import source_factor

    scenes = res.scenes
    sc = scenes.scenario
    i = pick_spectrum_scene(scenes) if index is None else int(index)
    if not 0 <= i < len(scenes):
        raise ValueError(f"spectrum_scene = {i}: the benchmark has {len(scenes)} scenes")
    s = scenes[i]
    K = int(s.truth.K[0])
    phi = np.radians(np.linspace(math.degrees(sc.phi_min), math.degrees(sc.phi_max), n_phi))
    theta = np.radians(np.linspace(math.degrees(sc.theta_min), math.degrees(sc.theta_max), n_theta))
    r = 1.0 / np.linspace(1.0 / sc.r_max, 1.0 / sc.r_min, n_r)
    opts = cv.CovarianceOptions()
    learned_note = ""
    ref = None
    lr = res.methods.get("learned")
    if lr is not None and lr.ok:
        try:
            ref = _learned_covariance(s, lr.options.get("checkpoint"))
            ref_title = f"learned effective covariance ({lr.label})"
        except Exception as exc:  # noqa: BLE001 - plotted honestly instead
            learned_note = f"learned covariance unavailable ({type(exc).__name__}: {exc}); "
    if ref is None:
        F = source_factor(s.truth, sc, dtype=torch.complex128)
        ref = cv.effective_covariance(F, snr_db=s.snr_db, options=opts)
        ref_title = "TRUE covariance R = Σ p_k a_k a_kᴴ (effective, with SNR shrinkage) — not an estimator"
        if lr is None or not lr.ok:
            learned_note += "no learned model in this run; "
    samp = cv.scene_covariance(s, options=opts, K=s.truth.K)  # the default (ML) estimate at the true rank
    titles = (ref_title, "ML covariance of the measurements at the true rank (what music/mvdr use)")
    Es = torch.cat([ref.signal_subspace(K).to(torch.complex128), samp.signal_subspace(K).to(torch.complex128)])
    values = _music_spectrum_db(Es, sc, phi, theta, r)
    panels = [{"title": t, "values_db": v} for t, v in zip(titles, values)]
    truth_pts = [(math.degrees(float(s.truth.phi[0, k])), math.degrees(float(s.truth.theta[0, k])), float(s.truth.r[0, k])) for k in range(K)]
    snr = float(s.snr_db[0]) if s.snr_db is not None else float("nan")
    caption = (f"scene {i} (K = {K}, SNR = {snr:.1f} dB), signal subspace of the true dimension K, "
               f"pseudo-spectrum maximised over {n_r} ranges in [{sc.r_min:g}, {sc.r_max:g}] m; {learned_note}"
               "× = true sources").strip()
    return {"scene": i, "K": K, "snr_db": snr, "phi_deg": np.degrees(phi), "theta_deg": np.degrees(theta),
            "panels": panels, "truth": truth_pts, "caption": caption}


def _learned_covariance(s: Scenes, checkpoint):
    """The learned pipeline's effective covariance of one scene (model + the checkpoint's options)."""
    from .nn.inference import DEFAULT_WEIGHTS, load_model
    from .nn.model import prepare_inputs

    ckpt = checkpoint or DEFAULT_WEIGHTS
    loaded = load_model(ckpt, device="cpu")
    with torch.no_grad():
        inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=loaded.options.regularisation)
        pred = loaded.model(inputs, loaded.options)
    from .covariance import LowRankCovariance

    return LowRankCovariance(pred.covariance.factor.detach().to(torch.complex128), pred.covariance.diag.detach().double())


def _make_plots(res: BenchResult, out: Path) -> list[str]:
    from . import plots

    made = []
    curves, ref = _snr_curves(res)
    if curves or ref:
        plots.rmse_vs_snr(curves, ref, out / "rmse_vs_snr.png")
        plots.success_vs_snr(curves, ref, out / "success_vs_snr.png")
        made += ["rmse_vs_snr.png", "success_vs_snr.png"]
    conf = {name: metrics.k_confusion(_truth_n(res.scenes, r.n_scenes), r.estimates, k_max=res.scenes.scenario.k_max)
            for name, r in res.methods.items() if r.ok}
    if conf:
        plots.k_confusion(conf, out / "k_confusion.png")
        made.append("k_confusion.png")
    try:
        data = spectrum_data(res, res.config.spectrum_scene, *res.config.spectrum_grid)
        plots.spectra(data, out / "spectrum.png")
        res.spectrum = {k: v for k, v in data.items() if k in ("scene", "K", "snr_db", "caption")}
        res.spectrum["panels"] = [p["title"] for p in data["panels"]]
        made.append("spectrum.png")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the benchmark
        if res.config.strict:
            raise
        res.spectrum = {"error": f"{type(exc).__name__}: {exc}"}
        warnings.warn(f"risloc bench: spectrum plot failed: {res.spectrum['error']}", stacklevel=2)
    return made


__all__ = [
    "BenchConfig", "BenchResult", "MethodResult", "Timing", "run_benchmark", "write_report", "render_report",
    "crb_reference", "device_info", "sync_device", "git_info", "versions", "resolve_method", "timed_batches", "spectrum_data",
    "HELD_OUT_SEED", "DEFAULT_METHODS", "QUICK_SCENES", "QUICK_BATCH", "SNR_RANGES",
]
