"""The report of a benchmark: its views (groups of scenes), Markdown tables, report.md and
results.json.

Views. Every method is scored on the same scenes, then regrouped by:

* SNR: the ranges of :data:`~risloc.bench.run.SNR_RANGES` and 5 dB bins;
* the true K;
* the range of the scene's farthest source (:data:`RANGE_BUCKETS_M`; this aperture resolves
  range only up to about 4 m: the 3 dB beam depth is about 0.5 m at 1 m and 8 m at 3 m);
* the separation of the scene's two closest sources in beamwidths
  (:data:`SEPARATION_BUCKETS`, :func:`beamwidth`; single-source scenes form their own view);
* SNR bin x true K (success and K accuracy), and "missed sources vs wrong positions":
  K_under, K_over and, among the scenes with K-hat = K, the fraction with every source a hit.

Per true source, the hit rate by the source's own range is in results.json
(``source_hits_by_range``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import metrics, physics
from .._files import atomic_write_text, nan_to_none
from ..scenario import Scenario
from ..seeds import role as seed_role
from .figures import make_figures
from .run import FAILED, OK, SNR_RANGES, BenchResult, _np, _truth_n

RANGE_BUCKETS_M = ((0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 10.0))
"""Range buckets [lo, hi) in metres (the last one closed), for the farthest source of a scene
and for single sources. Beyond about 4 m this aperture no longer resolves range."""

SEPARATION_BUCKETS = ((0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, math.inf))
"""Buckets [lo, hi) of the closest pair's angular separation, in beamwidths (:func:`beamwidth`)."""


def beamwidth(scenario: Scenario) -> float:
    """The RIS's 3 dB beamwidth at broadside [rad]: ``0.886 lambda / D`` with D the larger
    aperture side (``n_h d_H`` or ``n_v d_V``); 8.46 deg for the default 12 x 12 half-wavelength
    surface (Van Trees, *Optimum Array Processing*, 2002, sec. 2.4)."""
    D = max(scenario.n_h * scenario.spacing_h, scenario.n_v * scenario.spacing_v)
    return 0.886 * scenario.wavelength / D


def farthest_range(truth) -> np.ndarray:
    """Per scene: the range of its farthest true source [m] ``[S]``."""
    K = _np(truth.K).astype(np.int64)
    r = _np(truth.r).astype(np.float64)
    active = np.arange(r.shape[1])[None, :] < K[:, None]
    return np.where(active, r, -np.inf).max(1)


def closest_pair_separation(truth) -> np.ndarray:
    """Per scene: the angle between the directions of its two closest true sources [rad] ``[S]``
    (:func:`risloc.physics.angle_between`; NaN for a single source)."""
    K = torch.as_tensor(_np(truth.K).astype(np.int64))
    phi = torch.as_tensor(_np(truth.phi).astype(np.float64))
    theta = torch.as_tensor(_np(truth.theta).astype(np.float64))
    ang = physics.angle_between(phi.unsqueeze(2), theta.unsqueeze(2), phi.unsqueeze(1), theta.unsqueeze(1))  # [S, k, k]
    idx = torch.arange(phi.shape[1])
    pair = (idx.view(1, -1, 1) < K.view(-1, 1, 1)) & (idx.view(1, 1, -1) < K.view(-1, 1, 1)) & (idx.view(-1, 1) < idx.view(1, -1))
    ang = torch.where(pair, ang, torch.full_like(ang, math.inf)).flatten(1).amin(1)
    return torch.where(torch.isinf(ang), torch.full_like(ang, math.nan), ang).numpy()


def _in(x: np.ndarray, lo: float, hi: float, last: bool) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (x >= lo) & ((x <= hi) if last else (x < hi))


def bucket_views(res: BenchResult) -> list[tuple[str, str, Callable, np.ndarray]]:
    """The range and separation views: (key, title, metrics of a score, scene mask)."""
    truth = res.scenes.truth
    out = []
    far = farthest_range(truth)
    for i, (lo, hi) in enumerate(RANGE_BUCKETS_M):
        last = i == len(RANGE_BUCKETS_M) - 1
        out.append((f"range_{lo:g}_{hi:g}", f"farthest source at r in [{lo:g}, {hi:g}{']' if last else ')'} m",
                    _far_subset(res, _in(far, lo, hi, last)), _in(far, lo, hi, last)))
    bw = beamwidth(res.scenes.scenario)
    sep = closest_pair_separation(truth) / bw
    single = _np(truth.K) == 1
    out.append(("sep_single", "single source", _far_subset(res, single), single))
    for lo, hi in SEPARATION_BUCKETS:
        title = f"closest pair {lo:g}–{hi:g} beamwidths" if math.isfinite(hi) else f"closest pair >= {lo:g} beamwidths"
        m = _in(sep, lo, hi, False)
        out.append((f"sep_{lo:g}_{hi:g}", title, _far_subset(res, m), m))
    return out


def _far_subset(res: BenchResult, mask: np.ndarray) -> Callable:
    """Metrics of the masked scenes (of the scenes a method was scored on)."""

    def get(score: metrics.Score) -> metrics.Metrics | None:
        n = score.per_scene["K"].shape[0]
        m = mask[:n]
        return score.select(m).overall if m.any() else None

    return get


def views(res: BenchResult) -> list[tuple[str, str, Callable, np.ndarray]]:
    """Every reported view: overall, SNR ranges and bins, true K, range and separation buckets."""
    return _base_views(res) + bucket_views(res)


def source_hits_by_range(truth, est) -> list[dict[str, Any]]:
    """Per :data:`RANGE_BUCKETS_M` bucket: true sources whose own range lies in it, and the
    fraction of them that an estimate hits (:func:`risloc.metrics.match`)."""
    m = metrics.match(truth, est)
    K = _np(truth.K).astype(np.int64)
    r = _np(truth.r).astype(np.float64)
    active = np.arange(r.shape[1])[None, :] < K[:, None]
    r_true = r[active]
    out = []
    for i, (lo, hi) in enumerate(RANGE_BUCKETS_M):
        last = i == len(RANGE_BUCKETS_M) - 1
        n = int(_in(r_true, lo, hi, last).sum())
        hits = int((m.hit.astype(bool) & _in(m.r_true, lo, hi, last)).sum())
        out.append({"r_lo": lo, "r_hi": hi, "n_sources": n, "hits": hits, "hit_rate": hits / n if n else float("nan")})
    return out


def miss_breakdown(score: metrics.Score) -> dict[str, float]:
    """Missed sources vs wrong positions: K_under, K_over, K_acc, and among the scenes with
    K-hat = K the fraction with every source a hit (``success_given_k``)."""
    d = score.per_scene
    K, Kh, ok = d["K"], d["K_hat"], d["success"].astype(bool)
    n = K.shape[0]
    right = K == Kh
    return {"n_scenes": int(n), "K_acc": float(right.mean()) if n else float("nan"),
            "K_under": float((Kh < K).mean()) if n else float("nan"), "K_over": float((Kh > K).mean()) if n else float("nan"),
            "success_given_k": float(ok[right].mean()) if right.any() else float("nan"),
            "success": float(ok.mean()) if n else float("nan")}


def by_snr_k(score: metrics.Score) -> list[dict[str, Any]]:
    """Success and K accuracy per (5 dB SNR bin, true K)."""
    d = score.per_scene
    snr, K = d["snr"], d["K"]
    out = []
    for lo, hi in sorted(score.by_snr):
        with np.errstate(invalid="ignore"):
            in_bin = (snr >= lo) & (snr < hi)
        for k in sorted(int(x) for x in np.unique(K)):
            m = in_bin & (K == k)
            if m.any():
                sub = score.select(m).overall
                out.append({"snr_lo": lo, "snr_hi": hi, "K": k, "n_scenes": sub.n_scenes, "success": sub.success, "K_acc": sub.K_acc})
    return out


def seed_statement(seed: int) -> str:
    """One line on what the benchmark's seed is (:mod:`risloc.seeds`)."""
    role = seed_role(seed)
    if role == "held-out":
        return f"seed {seed}, the held-out seed (nothing was tuned on it)"
    if role == "validation":
        return f"seed {seed}, a validation seed (defaults are chosen on it): NOT held-out figures"
    if role in ("training", "training validation"):
        return f"seed {seed}, the {role} stream of the learned models: NOT held-out figures"
    return f"seed {seed}, not the held-out seed (risloc.seeds.HELD_OUT_SEED)"


def _base_views(res) -> list[tuple[str, str, Callable[[metrics.Score], metrics.Metrics | None], np.ndarray]]:
    """(key, title, metrics of a method's score, scene mask): overall, SNR ranges and bins, true K."""
    snr = _np(res.scenes.snr_db) if res.scenes.snr_db is not None else np.full(len(res.scenes), np.nan)
    K = _np(res.scenes.truth.K).astype(np.int64)
    out = [("overall", "Overall", lambda s: s.overall, np.ones(len(K), bool))]
    for lo, hi in SNR_RANGES:
        with np.errstate(invalid="ignore"):
            mask = (snr >= lo) & (snr <= hi)
        out.append((f"snr_{lo:g}_{hi:g}", f"SNR {lo:g}…{hi:g} dB (both ends included)",
                    (lambda s, lo=lo, hi=hi: _subset(s, lo, hi)), mask))
    bins = sorted({b for r in res.methods.values() if r.ok for b in r.score.by_snr})
    for lo, hi in bins:
        with np.errstate(invalid="ignore"):
            mask = (snr >= lo) & (snr < hi)
        out.append((f"snr_bin_{lo:g}_{hi:g}", f"SNR bin [{lo:g}, {hi:g}) dB",
                    (lambda s, b=(lo, hi): s.by_snr.get(b)), mask))
    for k in sorted({int(k) for k in np.unique(K)}):
        out.append((f"K_{k}", f"K = {k}", (lambda s, k=k: s.by_k.get(k)), K == k))
    return out

def table(res, key: str = "overall", *, timing: bool | None = None) -> str:
    """The Markdown table of one view (rows: methods, plus the bound)."""
    for k, title, get, mask in views(res):
        if k == key:
            return _view_table(res, get, mask, timing=(key == "overall") if timing is None else timing)
    raise ValueError(f"unknown view {key!r}; known: {[v[0] for v in views(res)]}")

def summary(res) -> str:
    """What ``risloc bench`` prints: status lines, overall and SNR-range tables, timing."""
    parts = [f"risloc bench: {len(res.scenes)} scenes (seed {res.config.seed}), device {res.device.get('name', '?')}", ""]
    for k, title, get, mask in views(res)[: 1 + len(SNR_RANGES)]:
        parts += [f"## {title}", "", _view_table(res, get, mask, timing=k == "overall"), ""]
    bad = [r for r in res.methods.values() if not r.ok]
    for r in bad:
        parts.append(f"WARNING: {r.name}: {r.status_text}")
    if res.crb_status != OK:
        parts.append(f"WARNING: CRB: {res.crb_status}")
    if res.order_status.startswith(FAILED):
        parts.append(f"WARNING: order rules: {res.order_status}")
    if "error" in res.spectrum:
        parts.append(f"WARNING: spectrum plot failed: {res.spectrum['error']}")
    if res.files:
        parts.append(f"report: {Path(res.files[0]).parent}")
    return "\n".join(parts)

def results_dict(res) -> dict[str, Any]:
    """Everything of results.json (strict-JSON-able after :func:`_clean`)."""
    cfg = res.config
    views_ = views(res)
    meth = {}
    for name, r in res.methods.items():
        d: dict[str, Any] = {
            "status": r.status, "reason": r.reason, "method": r.method or name, "known_k": r.known_k,
            "label": r.label, "options": r.options,
            "defaults": r.defaults, "n_scenes": r.n_scenes,
            "timing": r.timing.to_dict() if r.timing else None,
            "latency_ms": r.latency.to_dict() if r.latency else None,
        }
        if r.error:
            d["traceback"] = r.error
        if r.ok:
            d["score"] = r.score.to_dict()
            d["snr_ranges"] = [
                {"snr_lo": lo, "snr_hi": hi, **(_subset(r.score, lo, hi) or _empty_metrics()).to_dict()}
                for lo, hi in SNR_RANGES
            ]
            truth = _truth_n(res.scenes, r.n_scenes)
            d["k_confusion"] = metrics.k_confusion(truth, r.estimates, k_max=res.scenes.scenario.k_max).tolist()
            d["buckets"] = [{"key": k, "title": t, **(get(r.score) or _empty_metrics()).to_dict()} for k, t, get, _ in bucket_views(res)]
            d["source_hits_by_range"] = source_hits_by_range(truth, r.estimates)
            d["misses"] = miss_breakdown(r.score)
            d["by_snr_k"] = by_snr_k(r.score)
        meth[name] = d
    crb = {"status": res.crb_status, "signal": res.scenes.scenario.signal,
           "timing": res.crb_timing.to_dict() if res.crb_timing else None}
    if res.crb is not None:
        crb["n_regular"] = int(_np(res.crb.regular).sum())
        crb["reference"] = {k: res.crb_reference(mask) for k, _, _, mask in views_}
    return {
        "format": "risloc-bench",
        "version": 1,
        "started": res.started,
        "finished": res.finished,
        "wall_s": res.wall_s,
        "simulate_s": res.simulate_s,
        "quick": cfg.quick,
        "seeds": {"scenes": cfg.seed, "role": seed_role(cfg.seed), "held_out": seed_role(cfg.seed) == "held-out",
                  "stream": f"risloc.simulate(scenario, {len(res.scenes)}, seed={cfg.seed}, start=0, device='cpu')",
                  "torch_manual_seed_per_method": cfg.seed},
        "n_scenes": len(res.scenes),
        "scenario": res.scenes.scenario.to_dict(),
        "config": cfg.to_dict(),
        "device": res.device,
        "versions": res.versions,
        "git": res.git,
        "timing_rules": "per-batch wall time (perf_counter, CUDA synchronised), first batch = warm-up excluded, "
                        f"median of {cfg.timing_repeats} pass(es) over the timed batches, "
                        "simulation / device->host copies / scoring / file I/O excluded",
        "latency_rules": (f"{cfg.latency_calls} calls per method on a batch of one scene (scenes 0, 1, ... cycling) after one "
                          "untimed warm-up call, each timed alone (perf_counter, CUDA synchronised); median and 90th percentile "
                          "(numpy.percentile) in ms; not for the K-known rows") if cfg.latency_calls else "not measured",
        "methods": meth,
        "crb": crb,
        "order_rules": {"status": res.order_status, "timing": res.order_timing.to_dict() if res.order_timing else None,
                        "accuracy": order_rule_accuracy(res)},
        "spectrum": res.spectrum,
        "views": [{"key": k, "title": t, "n_scenes": int(m.sum())} for k, t, _, m in views_],
        "buckets": {"range_m": [list(b) for b in RANGE_BUCKETS_M], "separation_beamwidths": [list(b) for b in SEPARATION_BUCKETS],
                    "beamwidth_deg": math.degrees(beamwidth(res.scenes.scenario)),
                    "range_of": "the scene's farthest source", "separation_of": "the scene's two closest sources"},
        "files": [os.path.basename(f) for f in res.files],
    }


def _subset(score: metrics.Score, lo: float, hi: float) -> metrics.Metrics | None:
    try:
        return score.subset(lo, hi).overall
    except ValueError:  # no SNR known
        return None


def _empty_metrics() -> metrics.Metrics:
    nan = float("nan")
    return metrics.Metrics(0, nan, nan, nan, nan, nan, nan, nan, 0, 0, 0, nan, nan, nan, nan, 0, 0)


def jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return str(v)
    if torch.is_tensor(v) and v.numel() <= 16:
        return v.tolist()
    return repr(v)


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


def _latency_text(lat) -> str:
    """``median / p90`` of a one-scene latency in ms, or '–' when not measured."""
    f = metrics.format_number
    return f"{f(lat.median_ms)} / {f(lat.p90_ms)}" if lat is not None and lat.n else "–"


def _view_table(res: BenchResult, get, mask: np.ndarray, *, timing: bool) -> str:
    f = metrics.format_number
    head = ["method"] + [c[0] for c in _COLS] + (["scenes/s", "latency (ms) median / p90"] if timing else [])
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    ref = res.crb_reference(mask)
    if ref is not None:
        row = ["CRB bound ¹", f(ref["success_crb"]), "–", "–", "–", "–",
               f(ref["rms_sqrt_crb_phi"]), f(ref["rms_sqrt_crb_theta"]), f(ref["rms_sqrt_crb_r"]),
               "1", "1", "1", f(ref["n_sources"]), f(ref["n_scenes"])]
        if timing:
            row += [f(res.crb_timing.scenes_per_s) if res.crb_timing else "–", "–"]
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
            row += [f(r.timing.scenes_per_s), _latency_text(r.latency)]
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


_GROUPS = {
    "snr_bin": "## Per SNR bin (5 dB)",
    "K_": "## Per true K",
    "range_": "## Per range of the farthest source (this aperture resolves range only up to about 4 m)",
    "sep_": "## Per closest-pair separation (in beamwidths, see results.json for the beamwidth)",
}


def _miss_table(res: BenchResult) -> str:
    f = metrics.format_number
    L = ["| method | K acc | K under (missed) | K over | success given K̂ = K | success | scenes |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res.methods.items():
        if r.ok:
            d = miss_breakdown(r.score)
            L.append(f"| {name} | {f(d['K_acc'])} | {f(d['K_under'])} | {f(d['K_over'])} | {f(d['success_given_k'])} | "
                     f"{f(d['success'])} | {d['n_scenes']} |")
    return "\n".join(L + ["", "*success given K̂ = K*: among the scenes whose count is right, the fraction with every source "
                            "a hit (wrong positions); *K under*: scenes with missed sources."])


def _source_range_table(res: BenchResult) -> str:
    f = metrics.format_number
    heads = [f"[{lo:g}, {hi:g}{']' if i == len(RANGE_BUCKETS_M) - 1 else ')'} m" for i, (lo, hi) in enumerate(RANGE_BUCKETS_M)]
    L = ["| method | " + " | ".join(heads) + " |", "| --- | " + " | ".join(["---:"] * len(heads)) + " |"]
    for name, r in res.methods.items():
        if r.ok:
            rows = source_hits_by_range(_truth_n(res.scenes, r.n_scenes), r.estimates)
            L.append(f"| {name} | " + " | ".join(f"{f(d['hit_rate'])} ({d['n_sources']})" for d in rows) + " |")
    return "\n".join(L + ["", "Fraction of the true sources in each range bucket that an estimate hits (true sources in brackets)."])


def _snr_k_tables(res: BenchResult) -> list[str]:
    f = metrics.format_number
    out = []
    Ks = sorted({int(k) for k in _np(res.scenes.truth.K)})
    for name, r in res.methods.items():
        if not r.ok:
            continue
        rows = by_snr_k(r.score)
        if not rows:
            continue
        cell = {(d["snr_lo"], d["K"]): d for d in rows}
        out += [f"**{name}** (success / K acc)", "", "| SNR bin (dB) | " + " | ".join(f"K = {k}" for k in Ks) + " |",
                "| --- | " + " | ".join(["---:"] * len(Ks)) + " |"]
        for lo, hi in sorted({(d["snr_lo"], d["snr_hi"]) for d in rows}):
            vals = [(f"{f(cell[(lo, k)]['success'])} / {f(cell[(lo, k)]['K_acc'])}" if (lo, k) in cell else "–") for k in Ks]
            out.append(f"| [{lo:g}, {hi:g}) | " + " | ".join(vals) + " |")
        out.append("")
    return out


def order_rule_accuracy(res: BenchResult) -> list[dict[str, Any]]:
    """K accuracy of every order rule: overall, per 5 dB SNR bin and per true K (rows of dicts)."""
    K = _np(res.scenes.truth.K).astype(np.int64)
    snr = _np(res.scenes.snr_db)
    bins = sorted({int(np.floor(x / 5.0)) * 5 for x in snr})
    rows = []
    for rule, khat in res.order.items():
        ok = khat == K
        row = {"rule": rule, "K_acc": float(ok.mean()), "K_under": float((khat < K).mean()), "K_over": float((khat > K).mean()),
               "by_snr": {f"[{lo}, {lo + 5})": float(ok[(snr >= lo) & (snr < lo + 5)].mean()) for lo in bins},
               "by_K": {str(k): float(ok[K == k].mean()) for k in sorted(set(K.tolist()))}}
        rows.append(row)
    return rows


def _order_table(res: BenchResult) -> str:
    f = metrics.format_number
    rows = order_rule_accuracy(res)
    if not rows:
        return f"Not run ({res.order_status})."
    snrs, Ks = list(rows[0]["by_snr"]), list(rows[0]["by_K"])
    L = ["| rule | K acc | K under | K over | " + " | ".join(f"SNR {b} dB" for b in snrs) + " | " + " | ".join(f"K = {k}" for k in Ks) + " |",
         "| --- | ---: | ---: | ---: | " + " | ".join(["---:"] * (len(snrs) + len(Ks))) + " |"]
    for d in rows:
        L.append(f"| {d['rule']} | {f(d['K_acc'])} | {f(d['K_under'])} | {f(d['K_over'])} | "
                 + " | ".join(f(d["by_snr"][b]) for b in snrs) + " | " + " | ".join(f(d["by_K"][k]) for k in Ks) + " |")
    t = res.order_timing
    return "\n".join(L + ["", "K accuracy of each order rule alone (`risloc.estimators.order.order_estimates`): `ml-*` on the rank-k "
                            "maximum-likelihood covariance fits, `bp-*` on the back-projected sample covariance (docs/estimators.md)."
                            + (f" All rules together: {f(t.scenes_per_s)} scenes/s." if t else "")])


def render_report(res: BenchResult, plots: list[str]) -> str:
    cfg = res.config
    sc = res.scenes.scenario
    changed = {k: v for k, v in sc.to_dict().items() if Scenario().to_dict()[k] != v}
    L = ["# risloc bench report", ""]
    L += [
        f"- **Scenes**: {len(res.scenes)} scenes, `risloc.simulate(scenario, {len(res.scenes)}, seed={cfg.seed})` "
        f"(drawn on the CPU); {seed_statement(cfg.seed)}.",
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
    L += ["", "## Methods", "", "| method | status | estimator label | options | scenes | scenes/s | timed scenes | time (s) "
          "| latency (ms) median / p90 |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    f = metrics.format_number
    if cfg.crb:
        t = res.crb_timing
        L.append(f"| CRB ({sc.signal}) | {res.crb_status} | risloc.crb.crb_for_scenes | – | {len(res.scenes)} | "
                 f"{f(t.scenes_per_s) if t else '–'} | {t.scenes if t else '–'} | {f(t.seconds) if t else '–'} | – |")
    for name, r in res.methods.items():
        t = r.timing
        L.append(f"| {name} | {r.status_text.replace('|', '/')} | {r.label or '–'} | {_fmt_options(r.options)} | {r.n_scenes or '–'} | "
                 f"{f(t.scenes_per_s) if t else '–'} | {t.scenes if t else '–'} | {f(t.seconds) if t else '–'} | "
                 f"{_latency_text(r.latency)} |")
    passes = ("" if cfg.timing_repeats == 1 else
              f"; the timed batches of each method run {cfg.timing_repeats} times, the median pass reported")
    L += ["", "Timing: wall time per batch on the device (CUDA synchronised), the first batch of each method excluded "
          f"as warm-up{passes}; simulation, copies back to the CPU, scoring and file I/O excluded (docs/bench.md)."]
    if cfg.latency_calls:
        L[-1] += (f" Latency: {cfg.latency_calls} calls of each method on a batch of one scene after one warm-up call, "
                  "each timed alone; median / 90th percentile in ms (not for the K-known rows).")
    bad = [r for r in res.methods.values() if not r.ok]
    if bad:
        L += [""] + [f"> **{r.name}** {r.status_text}" for r in bad]
    section = None
    for key, title, get, mask in views(res):
        group = next((g for g in _GROUPS if key.startswith(g)), None)
        if group is not None and group != section:
            L += ["", _GROUPS[group]]
        section = group
        level = "##" if group is None else "###"
        L += ["", f"{level} {title}", "", _view_table(res, get, mask, timing=key == "overall")]
    L += ["", "## Missed sources vs wrong positions", "", _miss_table(res)]
    L += ["", "## Source hit rate by the source's own range", "", _source_range_table(res)]
    L += ["", "## Success / K accuracy per SNR bin and true K", ""] + _snr_k_tables(res)
    if res.config.order_rules:
        L += ["", "## Source counting: each order rule alone", "", _order_table(res)]
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


def write_json(res: BenchResult, out: Path) -> Path:
    path = out / "results.json"
    text = json.dumps(nan_to_none(jsonable(res.to_dict())), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def write_report(res: BenchResult, out) -> list[str]:
    """Write the PNG plots, ``report.md`` and ``results.json`` into ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_figures(res, out) if res.config.plots else []
    files = []
    rp = out / "report.md"
    atomic_write_text(rp, render_report(res, plots))
    files.append(str(rp))
    res.files = files + [str(out / p) for p in plots] + [str(out / "results.json")]
    write_json(res, out)
    return res.files
