"""PNG plots of the benchmark report (matplotlib, Agg backend; no display needed).

Every function takes plain numbers (lists / numpy arrays, angles already in degrees) and
writes one PNG atomically (temporary name in the same folder, then rename). The data are
prepared by :mod:`risloc.bench`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ._files import atomic_path  # noqa: E402

__all__ = ["rmse_vs_snr", "success_vs_snr", "k_confusion", "spectra", "save"]

_MARKERS = "osD^v<>ph*"


def save(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """``fig.savefig`` to a temporary name in the destination folder, then rename; closes ``fig``."""
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


def k_confusion(confusions: Mapping[str, np.ndarray], path) -> Path:
    """One panel per method: counts ``C[K, K̂]`` (rows true K, columns K̂), coloured by row share."""
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
