"""Sweeps: the benchmark at every level of one scenario field (``risloc bench --sweep FIELD=V1,V2,...``).

For a :class:`~risloc.bench.run.Sweep` ``(field, values)`` and a base configuration::

    for value in values:
        scenario_i = config.scenario.replace(field=value)
        result_i   = run_benchmark(config with scenario_i)     same seed, scenes [0, S), same methods
    sweep.json, sweep.md, sweep_success.png                     success of every method vs the level

Same scenes. Every level draws scenes ``[0, S)`` of the same seed, and
:func:`risloc.simulate` makes scene i of a seed from the random numbers of index i, drawn in
a fixed order. What stays equal between levels therefore depends on the field: a field that
only changes what is done with the draws (an impairment level, the SNR range, the signal
model) keeps the draws themselves; a field that changes how many numbers a scene takes
(``snapshots``, ``code_bits``, the array sizes) keeps those drawn before it and changes those
after it (``k_max`` changes them all). Rather than rely on a rule, every level records which parts of its
scenes are bit-identical to those of the first level (``same_as_first``: K, positions, powers,
SNR, true channel, receiver's channel, commanded and realised codes, snapshots), and sweep.md
prints it.

CRB-efficient reference. The bound of each level is :func:`risloc.crb.crb_for_scenes` on the
level's scenes: the measurement model of the receiver, i.e. the receiver's known channel
``Scenes.H`` and codes ``Scenes.codes`` taken as exact (the *ideal model*); it does not model
an impairment. Its success is labelled "CRB-efficient (ideal model)" in the table, the JSON and
the plot: with an impairment it is not a bound on what the impaired system allows.

Not done per level: the one-scene latency (it is the normal benchmark's; a sweep is about
accuracy) and the report's figures (a few seconds each level). Each level's report.md and
results.json are written to a subfolder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from .._files import atomic_write_text, nan_to_none
from .._provenance import device_info, git_info, now, versions
from ..seeds import role as seed_role
from .run import OK, SNR_RANGES, BenchConfig, BenchResult, Sweep, run_benchmark

__all__ = ["CRB_LABEL", "SweepResult", "run_sweeps", "run_sweep", "level_summary", "same_as_first", "sweep_table", "write_sweep"]

CRB_LABEL = "CRB-efficient (ideal model)"
"""Name of the bound's success in sweep tables, JSON and plots: the receiver's H and codes taken as exact."""

_SUMMARY_METRICS = ("success", "K_acc", "K_under", "K_over", "rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "n_pairs", "n_scenes")


@dataclass
class SweepResult:
    """One sweep: the summary of every level (``levels``) and, with ``keep``, each level's
    :class:`~risloc.bench.run.BenchResult` (``results``)."""

    config: BenchConfig
    sweep: Sweep
    levels: list[dict[str, Any]] = field(default_factory=list)
    results: list[BenchResult] = field(default_factory=list, repr=False)
    out: Path | None = None
    started: str = ""
    finished: str = ""
    wall_s: float = 0.0
    device: dict[str, Any] = field(default_factory=dict)
    """The machine of the levels (that of the first level's run)."""
    files: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.levels) == len(self.sweep.values)

    def table(self, metric: str = "success") -> str:
        return sweep_table(self, metric)

    def to_dict(self) -> dict[str, Any]:
        return sweep_dict(self)


def run_sweeps(config: BenchConfig | None = None, *, keep: bool = True, **changes) -> list[SweepResult]:
    """Every sweep of ``config.sweeps``, one after the other. With ``config.out`` set, one sweep
    writes into ``out``, several each into ``out/<field>/``."""
    cfg = dataclasses.replace(config, **changes) if config is not None else BenchConfig(**changes)
    if not cfg.sweeps:
        raise ValueError("BenchConfig.sweeps: name at least one sweep (FIELD=V1,V2,...)")
    outs: list[Path | None]
    if cfg.out is None:
        outs = [None] * len(cfg.sweeps)
    elif len(cfg.sweeps) == 1:
        outs = [Path(cfg.out)]
    else:
        outs = [Path(cfg.out) / s.field for s in cfg.sweeps]
    return [run_sweep(cfg, s, out, keep=keep) for s, out in zip(cfg.sweeps, outs)]


def level_folder(index: int, sweep: Sweep, value) -> str:
    """Subfolder of one level's report, e.g. ``level-02-ris_phase_noise_deg-10``."""
    text = re.sub(r"[^A-Za-z0-9._+-]", "_", Sweep.text(value))
    return f"level-{index + 1:02d}-{sweep.field}-{text}"


def run_sweep(config: BenchConfig, sweep: Sweep, out: str | Path | None = None, *, keep: bool = True) -> SweepResult:
    """The benchmark of ``config`` (its methods, options, scenes, seed) at every level of
    ``sweep``; sweep.json, sweep.md and sweep_success.png are written to ``out`` (if given)
    after every level, so an interrupted sweep keeps the levels it finished."""
    from tqdm.auto import tqdm

    sweep.check(config.scenario)
    out = None if out is None else Path(out)
    res = SweepResult(config, sweep, out=out, started=now())
    t0 = time.perf_counter()
    first = None
    bar = tqdm(list(zip(sweep.values, sweep.scenarios(config.scenario))), desc=f"sweep {sweep.field}", unit="level",
               disable=not config.progress)
    for i, (value, scenario) in enumerate(bar):
        bar.set_postfix_str(f"{sweep.field}={Sweep.text(value)}")
        sub = None if out is None else out / level_folder(i, sweep, value)
        level_cfg = dataclasses.replace(config, scenario=scenario, out=sub, sweeps=(), latency_calls=0, plots=False)
        r = run_benchmark(level_cfg)
        if first is None:
            first, res.device = r.scenes, r.device
        summary = level_summary(r, value, same_as_first(first, r.scenes))
        if sub is not None:
            summary["report"] = sub.name
        res.levels.append(summary)
        if keep:
            res.results.append(r)
        res.wall_s = time.perf_counter() - t0
        if out is not None:
            write_sweep(res, out)
    bar.close()
    res.finished = now()
    res.wall_s = time.perf_counter() - t0
    if out is not None:
        write_sweep(res, out)
    return res


# ----------------------------------------------------------------------------------------------
# per-level numbers
# ----------------------------------------------------------------------------------------------
def _equal(a, b) -> bool:
    """Bit-identical tensors (NaN equal to NaN; different shapes are different)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        a, b = torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool(torch.equal(a, b))


def same_as_first(first, scenes) -> dict[str, bool]:
    """Which parts of ``scenes`` are bit-identical to those of ``first`` (the first level):
    K, positions (phi, theta, r), powers, SNR, the true channel (``truth.H``, else ``H``), the
    receiver's channel ``H``, the commanded codes, the realised codes (``truth.codes``, else
    ``codes``) and the snapshots y."""
    a, b = first.truth, scenes.truth

    def true(s, name):
        t = getattr(s.truth, name, None)
        return getattr(s, name) if t is None else t

    return {
        "K": _equal(a.K, b.K),
        "positions": _equal(a.phi, b.phi) and _equal(a.theta, b.theta) and _equal(a.r, b.r),
        "power": _equal(a.power, b.power),
        "snr_db": _equal(first.snr_db, scenes.snr_db),
        "true_H": _equal(true(first, "H"), true(scenes, "H")),
        "receiver_H": _equal(first.H, scenes.H),
        "codes": _equal(first.codes, scenes.codes),
        "realised_codes": _equal(true(first, "codes"), true(scenes, "codes")),
        "y": _equal(first.y, scenes.y),
    }


def _range_key(lo: float, hi: float) -> str:
    return f"snr_{lo:g}_{hi:g}"


def level_summary(res: BenchResult, value, same: dict[str, bool]) -> dict[str, Any]:
    """One level's numbers: per method its overall metrics, success per SNR range, success over
    the CRB-efficient success, timing; the bound's CRB-efficient success (ideal model)."""
    out: dict[str, Any] = {"value": value, "label": Sweep.text(value), "n_scenes": len(res.scenes), "wall_s": res.wall_s,
                           "simulate_s": res.simulate_s, "same_as_first": same}
    methods = {}
    for name, r in res.methods.items():
        d: dict[str, Any] = {"status": r.status, "reason": r.reason, "n_scenes": r.n_scenes}
        if r.ok:
            o = r.score.overall
            d.update({k: getattr(o, k) for k in _SUMMARY_METRICS})
            d["success_over_crb"] = (o.success / o.success_crb) if o.success_crb else None
            for lo, hi in SNR_RANGES:
                try:
                    d[f"success_{_range_key(lo, hi)}"] = r.score.subset(lo, hi).overall.success
                except ValueError:  # no SNR known
                    d[f"success_{_range_key(lo, hi)}"] = None
            t = r.timing
            d.update({"seconds": t.seconds, "timed_scenes": t.scenes, "scenes_per_s": t.scenes_per_s})
        methods[name] = d
    out["methods"] = methods
    crb: dict[str, Any] = {"label": CRB_LABEL, "status": res.crb_status,
                           "model": "ideal: the receiver's known H and codes (Scenes.H, Scenes.codes) taken as exact"}
    if res.crb is not None:
        crb["success"] = res.crb_reference(np.ones(len(res.scenes), bool))["success_crb"]
        snr = res.scenes.snr_db.cpu().numpy() if res.scenes.snr_db is not None else np.full(len(res.scenes), np.nan)
        for lo, hi in SNR_RANGES:
            with np.errstate(invalid="ignore"):
                mask = (snr >= lo) & (snr <= hi)
            crb[f"success_{_range_key(lo, hi)}"] = res.crb_reference(mask)["success_crb"] if mask.any() else None
    out["crb"] = crb
    return out


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
_METRICS = {
    "success": "Success",
    **{f"success_{_range_key(lo, hi)}": f"Success, SNR {lo:g}…{hi:g} dB" for lo, hi in SNR_RANGES},
    "K_acc": "K accuracy",
    "scenes_per_s": "Scenes per second",
}
"""The tables of sweep.md (metric key -> heading); the CRB column appears where the bound has the metric."""


def _methods(res: SweepResult) -> list[str]:
    names: dict[str, None] = {}
    for lv in res.levels:
        names.update(dict.fromkeys(lv["methods"]))
    return list(names)


def sweep_table(res: SweepResult, metric: str = "success") -> str:
    """Markdown table of one metric: rows the levels, columns the methods (and the bound's
    CRB-efficient success, ideal model, for a success metric)."""
    f = metrics.format_number
    names = _methods(res)
    crb = metric.startswith("success") and any(metric in lv["crb"] for lv in res.levels)
    head = [res.sweep.field] + names + ([CRB_LABEL] if crb else [])
    L = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for lv in res.levels:
        cells = [lv["label"]]
        for n in names:
            m = lv["methods"].get(n, {})
            cells.append(f(m.get(metric)) if m.get("status") == OK else (m.get("status") or "–"))
        if crb:
            cells.append(f(lv["crb"].get(metric)))
        L.append("| " + " | ".join(cells) + " |")
    return "\n".join(L)


def _same_table(res: SweepResult) -> str:
    parts = list(res.levels[0]["same_as_first"]) if res.levels else []
    L = ["| " + " | ".join([res.sweep.field] + parts) + " |", "| --- | " + " | ".join([":---:"] * len(parts)) + " |"]
    for lv in res.levels:
        L.append("| " + " | ".join([lv["label"]] + ["same" if lv["same_as_first"][p] else "differs" for p in parts]) + " |")
    return "\n".join(L)


def render_sweep(res: SweepResult, plots: list[str]) -> str:
    cfg = res.config
    sc = cfg.scenario
    L = [f"# risloc bench sweep: {res.sweep.field}", ""]
    L += [
        f"- **Levels**: {res.sweep.field} = {', '.join(Sweep.text(v) for v in res.sweep.values)}"
        + ("" if res.complete else f" ({len(res.levels)} of {len(res.sweep.values)} done so far)") + ".",
        f"- **Scenes**: at every level scenes [0, {cfg.scenes}) of seed {cfg.seed} ({seed_role(cfg.seed)} seed), drawn on the CPU; "
        f"the base scenario: signal `{sc.signal}`, K ∈ 1..{sc.k_max}, SNR ∈ [{sc.snr_db_min:g}, {sc.snr_db_max:g}] dB"
        + ("" if res.sweep.field not in ("snr_db_min", "snr_db_max") else " (before the sweep's field)") + ".",
        f"- **Methods**: {', '.join(cfg.methods)}" + (" and their K-known rows" if cfg.oracle_k else "")
        + ("" if not cfg.method_options else "; options " + json.dumps(cfg.method_options)) + ".",
        f"- **Device**: {res.device.get('name')} (`{res.device.get('device')}`); batch {cfg.batch}.",
        f"- **Commit**: `{git_info().get('commit')}`; started {res.started}"
        + (f", finished {res.finished}" if res.finished else "") + f"; {res.wall_s:.0f} s.",
        "",
        f"**{CRB_LABEL}**: the success an unbiased estimator at the Cramér–Rao bound with the right K would have, "
        "the bound computed for the receiver's known channel and codes taken as exact (no impairment in the model). "
        "With an impairment it is a reference, not a bound on the impaired system.",
    ]
    for key, title in _METRICS.items():
        L += ["", f"## {title}", "", sweep_table(res, key)]
    L += ["", "## Scenes compared with the first level", "",
          "Which parts of each level's scenes are bit-identical to the first level's (same seed and scene indices; "
          "`true_H` and `realised_codes` are what made the snapshots, `receiver_H` and `codes` what the receiver is given).",
          "", _same_table(res)]
    if plots:
        L += ["", "## Plot", ""] + [f"![{p}]({p})" for p in plots]
    if any("report" in lv for lv in res.levels):
        L += ["", "## Reports of the levels", ""]
        L += [f"- {res.sweep.field} = {lv['label']}: [{lv['report']}/report.md]({lv['report']}/report.md)" for lv in res.levels
              if "report" in lv]
    L += ["", "All numbers are in sweep.json; how to read them: docs/bench.md.", ""]
    return "\n".join(L)


def _snr_range(res: SweepResult) -> str:
    sc = res.config.scenario
    if res.sweep.field in ("snr_db_min", "snr_db_max"):
        return "range swept"
    return f"{sc.snr_db_min:g}…{sc.snr_db_max:g}"


def sweep_dict(res: SweepResult) -> dict[str, Any]:
    """Everything of sweep.json."""
    from .report import jsonable

    cfg = res.config
    return jsonable({
        "format": "risloc-bench-sweep",
        "version": 1,
        "field": res.sweep.field,
        "values": list(res.sweep.values),
        "complete": res.complete,
        "started": res.started,
        "finished": res.finished,
        "wall_s": res.wall_s,
        "seed": cfg.seed,
        "seeds": {"scenes": cfg.seed, "role": seed_role(cfg.seed), "held_out": seed_role(cfg.seed) == "held-out",
                  "stream": f"risloc.simulate(scenario_i, {cfg.scenes}, seed={cfg.seed}, start=0, device='cpu') at every level i"},
        "n_scenes": cfg.scenes,
        "crb_label": CRB_LABEL,
        "crb_model": "risloc.crb.crb_for_scenes on each level's scenes: the receiver's known H and codes taken as exact",
        "scenario": cfg.scenario.to_dict(),
        "config": cfg.to_dict(),
        "device": res.device or device_info(cfg.resolved_device()),
        "latency": "not measured per level (the one-scene latency is the normal benchmark's)",
        "versions": versions(),
        "git": git_info(),
        "levels": res.levels,
    })


def write_sweep(res: SweepResult, out) -> list[str]:
    """Write sweep.json, sweep.md and sweep_success.png into ``out`` (atomically)."""
    from .figures import sweep_success

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if res.config.plots and res.levels:
        sweep_success(res.sweep.field, [lv["value"] for lv in res.levels],
                      {n: [lv["methods"].get(n, {}).get("success") for lv in res.levels] for n in _methods(res)},
                      [lv["crb"].get("success") for lv in res.levels] if any("success" in lv["crb"] for lv in res.levels) else None,
                      out / "sweep_success.png", crb_label=CRB_LABEL,
                      note=f"{res.config.scenes} scenes of seed {res.config.seed}, SNR {_snr_range(res)} dB")
        plots.append("sweep_success.png")
    atomic_write_text(out / "sweep.md", render_sweep(res, plots))
    atomic_write_text(out / "sweep.json", json.dumps(nan_to_none(sweep_dict(res)), indent=2, allow_nan=False) + "\n")
    res.files = [str(out / "sweep.md"), str(out / "sweep.json")] + [str(out / p) for p in plots]
    return res.files
