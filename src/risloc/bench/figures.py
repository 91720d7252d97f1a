"""The figures of the benchmark report (matplotlib, Agg backend; no display needed).

The plotting functions (:func:`rmse_vs_snr`, :func:`success_vs_snr`, :func:`k_confusion`,
:func:`spectra`) take plain numbers (lists / numpy arrays, angles already in degrees) and
write one PNG atomically (temporary name in the same folder, then rename); the functions
below them prepare those numbers from a :class:`~risloc.bench.BenchResult`
(:func:`make_figures` writes all of them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from .. import metrics
from .._files import atomic_path
from ..scenario import Scenario
from ..scenes import Scenes
from .run import BenchResult, _np, _truth_n, crb_reference

__all__ = ["rmse_vs_snr", "success_vs_snr", "sweep_success", "k_confusion", "spectra", "save", "make_figures", "spectrum_data",
           "pick_spectrum_scene"]

_MARKERS = "osD^v<>ph*"


def _pyplot():
    """``matplotlib.pyplot`` with the Agg backend (files only, never a window), imported on the
    first plot: importing risloc (every ``risloc`` command builds the ``bench`` parser) does not
    pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """``fig.savefig`` to a temporary name in the destination folder, then rename; closes ``fig``."""
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _finite(x, y):
    x, y = np.asarray(x, float), np.asarray([np.nan if v is None else v for v in y], float)
    ok = np.isfinite(y) & (y > 0)
    return x[ok], y[ok]


def rmse_vs_snr(curves: Mapping[str, Mapping[str, list]], crb: Mapping[str, list] | None, path) -> Path:
    """Three panels (φ, θ in degrees, r in metres): each method's RMSE per SNR bin (log scale)
    and the RMS √CRB of the same bins' true sources (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    spec = (("rmse_phi_deg", "phi", "RMSE φ (°)"), ("rmse_theta_deg", "theta", "RMSE θ (°)"), ("rmse_r_m", "r", "RMSE r (m)"))
    for ax, (key, ckey, label) in zip(axes, spec):
        for i, (name, c) in enumerate(curves.items()):
            x, y = _finite(c["snr"], c[key])
            if x.size:
                ax.semilogy(x, y, marker=_MARKERS[i % len(_MARKERS)], label=name)
        if crb is not None:
            x, y = _finite(crb["snr"], crb[ckey])
            if x.size:
                ax.semilogy(x, y, "k--", lw=2, label="√CRB (RMS)")
        ax.set_xlabel("SNR (dB, bin centre)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("RMSE vs SNR (scenes with K̂ = K, matched sources)")
    return save(fig, path)


def success_vs_snr(curves: Mapping[str, Mapping[str, list]], crb: Mapping[str, list] | None, path) -> Path:
    """Success rate per SNR bin for each method, and the CRB-efficient success (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, c) in enumerate(curves.items()):
        x = np.asarray(c["snr"], float)
        y = np.asarray([np.nan if v is None else v for v in c["success"]], float)
        ax.plot(x, y, marker=_MARKERS[i % len(_MARKERS)], label=name)
    if crb is not None:
        ax.plot(crb["snr"], [np.nan if v is None else v for v in crb["success_crb"]], "k--", lw=2, label="CRB-efficient success")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("SNR (dB, bin centre)")
    ax.set_ylabel("success rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Success (K̂ = K and every source within 2°, 2°, 10 % r) vs SNR")
    return save(fig, path)


def sweep_success(field: str, levels: list, curves: Mapping[str, list], crb: list | None, path, *,
                  crb_label: str = "CRB-efficient success", note: str = "") -> Path:
    """Success rate of each method against the level of a swept scenario field, and the
    CRB-efficient success (dashed, labelled ``crb_label``); ``note``: a second title line. Numeric levels sit at their values
    (None, e.g. perfect CSI, at the right end), other levels at equal spacing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels if v is not None)
    labels = ["none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)) for v in levels]
    if numeric and any(v is not None for v in levels):
        vals = [float(v) for v in levels if v is not None]
        span = (max(vals) - min(vals)) or 1.0
        x = np.asarray([max(vals) + 0.15 * span if v is None else float(v) for v in levels])
    else:
        x = np.arange(len(levels), dtype=float)
    for i, (name, ys) in enumerate(curves.items()):
        ax.plot(x, [np.nan if v is None else v for v in ys], marker=_MARKERS[i % len(_MARKERS)], label=name)
    if crb is not None:
        ax.plot(x, [np.nan if v is None else v for v in crb], "k--", lw=2, label=crb_label)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(field)
    ax.set_ylabel("success rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Success (K̂ = K and every source within 2°, 2°, 10 % r) vs {field}" + (f"\n{note}" if note else ""), fontsize=10)
    return save(fig, path)


def k_confusion(confusions: Mapping[str, np.ndarray], path) -> Path:
    """One panel per method: counts ``C[K, K̂]`` (rows true K, columns K̂), coloured by row share."""
    plt = _pyplot()
    n = max(1, len(confusions))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, C) in zip(axes.flat, confusions.items()):
        C = np.asarray(C)
        share = C / np.maximum(C.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(C.shape[0]):
            for j in range(C.shape[1]):
                if C[i, j]:
                    ax.text(j, i, str(int(C[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(C.shape[1]))
        ax.set_yticks(range(C.shape[0]))
        ax.set_xlabel("K̂")
        ax.set_ylabel("true K")
        acc = np.trace(C) / max(C.sum(), 1)
        ax.set_title(f"{name} (K acc {acc:.2f})", fontsize=9)
    fig.suptitle("Source-count confusion")
    return save(fig, path)


def spectra(data: Mapping[str, Any], path) -> Path:
    """Side-by-side φ–θ maps of MUSIC pseudo-spectra (dB re. max) with the true sources marked."""
    plt = _pyplot()
    panels = data["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    phi, theta = np.asarray(data["phi_deg"]), np.asarray(data["theta_deg"])
    for ax, p in zip(axes[0], panels):
        v = np.asarray(p["values_db"])
        im = ax.pcolormesh(phi, theta, v.T, shading="auto", cmap="viridis", vmin=max(float(v.min()), -30.0), vmax=0.0)
        for k, (ph, th, r) in enumerate(data["truth"]):
            ax.plot(ph, th, "rx", ms=9, mew=2)
            ax.annotate(f"{r:.1f} m", (ph, th), textcoords="offset points", xytext=(5, 5), color="r", fontsize=8)
        ax.set_xlabel("φ (°)")
        ax.set_ylabel("θ (°)")
        ax.set_title(p["title"], fontsize=8, wrap=True)
        fig.colorbar(im, ax=ax, label="dB (max over r)")
    fig.suptitle(f"MUSIC pseudo-spectrum, scene {data['scene']} (K = {data['K']}, SNR = {data['snr_db']:.1f} dB)")
    return save(fig, path)


# ----------------------------------------------------------------------------------------------
# the data of the figures
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
        from ..estimators.search import music_spectrum
    except ImportError:  # pragma: no cover - search.py is part of the package
        music_spectrum = None
    from .. import physics

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
    from .. import covariance as cv
    from ..simulate import source_factor

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
    from .. import estimators
    from ..nn.inference import load_model
    from ..nn.inputs import prepare_inputs

    ckpt = checkpoint or estimators.info("learned").default_weights_path()
    loaded = load_model(ckpt, device="cpu")
    with torch.no_grad():
        inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=loaded.options.regularisation, scenario=s.scenario)
        pred = loaded.model(inputs, loaded.options)
    from ..covariance import LowRankCovariance

    return LowRankCovariance(pred.covariance.factor.detach().to(torch.complex128), pred.covariance.diag.detach().double())


def make_figures(res: BenchResult, out: Path) -> list[str]:
    """Write the report's PNG figures into ``out``; returns their file names."""
    made = []
    curves, ref = _snr_curves(res)
    if curves or ref:
        rmse_vs_snr(curves, ref, out / "rmse_vs_snr.png")
        success_vs_snr(curves, ref, out / "success_vs_snr.png")
        made += ["rmse_vs_snr.png", "success_vs_snr.png"]
    conf = {name: metrics.k_confusion(_truth_n(res.scenes, r.n_scenes), r.estimates, k_max=res.scenes.scenario.k_max)
            for name, r in res.methods.items() if r.ok}
    if conf:
        k_confusion(conf, out / "k_confusion.png")
        made.append("k_confusion.png")
    try:
        data = spectrum_data(res, res.config.spectrum_scene, *res.config.spectrum_grid)
        spectra(data, out / "spectrum.png")
        res.spectrum = {k: v for k, v in data.items() if k in ("scene", "K", "snr_db", "caption")}
        res.spectrum["panels"] = [p["title"] for p in data["panels"]]
        made.append("spectrum.png")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the benchmark
        if res.config.strict:
            raise
        res.spectrum = {"error": f"{type(exc).__name__}: {exc}"}
        warnings.warn(f"risloc bench: spectrum plot failed: {res.spectrum['error']}", stacklevel=2)
    return made
