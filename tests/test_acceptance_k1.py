"""Acceptance: single static sources at 30 dB are located to 0.2 deg by an INDEPENDENT locator.

The locator below is written from docs/model.md alone, in numpy, sharing no code
with risloc (no risloc.physics): with one static source, the L snapshot equations

    y_l = H diag(c_l) a(phi, theta, r) g + n_l

stack into y = G a g + n with G = [H diag(c_1); ...; H diag(c_L)] (LM x N). Maximising the
likelihood over the unknown complex g leaves the concentrated objective

    J(phi, theta, r) = |(G a)^H y|^2 / |G a|^2,

searched on a coarse (phi, theta, 1/r) grid (numerator only, z = G^H y) and refined from the
best few grid points with Nelder-Mead on the full J.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from risloc import io
from risloc.cli import main

DEG = math.pi / 180
TOLERANCE = 0.2 * DEG
REF_K1 = Path(__file__).resolve().parent / "data" / "reference-scenes-k1-static-30db.h5"  # tests/data/README.md

# --- docs/model.md, written out independently ---------------------------------------------------------
LAMBDA, NH, NV, D = 0.3, 12, 12, 0.15
_i, _j = np.meshgrid(np.arange(NH), np.arange(NV), indexing="xy")  # _i[j, i] = i, flat n = j * NH + i
ELEMENTS = np.stack([((_i - (NH - 1) / 2) * D).ravel(), ((_j - (NV - 1) / 2) * D).ravel(), np.zeros(NH * NV)], axis=1)


def steer(phi, theta, r):
    """Exact a_n = (r / d_n) exp(-j 2 pi (d_n - r) / lambda) for arrays of points: [..., N]."""
    phi, theta, r = (np.asarray(v, dtype=np.float64)[..., None] for v in (phi, theta, r))
    p = np.stack([r * np.cos(theta) * np.sin(phi), r * np.sin(theta), r * np.cos(theta) * np.cos(phi)], axis=-1)  # [..., 1, 3]
    d = np.linalg.norm(p - ELEMENTS, axis=-1)  # [..., N]
    return (r[..., 0:1] / d) * np.exp(-2j * np.pi * (d - r[..., 0:1]) / LAMBDA)


PHI = np.arange(-62, 62.1, 2.0) * DEG
THETA = np.arange(-32, 32.1, 2.0) * DEG
INV_R = np.linspace(0.08, 2.1, 16)
_P, _T, _R = np.meshgrid(PHI, THETA, INV_R, indexing="ij")
GRID = np.stack([_P.ravel(), _T.ravel(), _R.ravel()], axis=1)  # (phi, theta, 1/r)
GRID_A_CONJ = steer(GRID[:, 0], GRID[:, 1], 1 / GRID[:, 2]).conj().astype(np.complex64)  # [P, N]
GRID_NORM2 = (np.abs(GRID_A_CONJ) ** 2).sum(1)


def locate_single_static(y: np.ndarray, H: np.ndarray, codes: np.ndarray) -> tuple[float, float, float]:
    """ML position (phi, theta, r) of one static source from y [L, M], H [M, N], codes [L, N]."""
    G = (H[None, :, :] * codes[:, None, :]).reshape(-1, H.shape[1]).astype(np.complex128)  # [L M, N]
    yv = y.reshape(-1).astype(np.complex128)
    z = (G.conj() * yv[:, None]).sum(0)  # G^H y, [N]
    y_norm2 = (yv.real**2 + yv.imag**2).sum()

    def neg_j(x):  # elementwise numpy only (no threaded BLAS, which stalls on a busy 2-core machine)
        phi, theta, inv_r = x
        if not 1e-3 < inv_r < 5:
            return 0.0
        Ga = (G * steer(phi, theta, 1 / inv_r)).sum(1)
        return -abs((Ga.conj() * yv).sum()) ** 2 / (Ga.real**2 + Ga.imag**2).sum() / y_norm2  # in [-1, 0]

    coarse = np.abs(np.einsum("pn,n->p", GRID_A_CONJ, z.astype(np.complex64))) ** 2 / GRID_NORM2  # numerator of J on the grid
    best = None
    for k in np.argsort(coarse)[::-1][:4]:
        simplex = GRID[k] + np.vstack([np.zeros(3), np.diag([1.0 * DEG, 1.0 * DEG, 0.05])])
        res = minimize(neg_j, GRID[k], method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 3000, "initial_simplex": simplex})
        if best is None or res.fun < best.fun:
            best = res
    phi, theta, inv_r = best.x
    return phi, theta, 1 / inv_r


def angle_errors(scenes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    est = np.array([locate_single_static(scenes.y[i].numpy(), scenes.H[i].numpy(), scenes.codes[i].numpy()) for i in range(len(scenes))])
    t = scenes.truth
    dphi = np.abs(np.angle(np.exp(1j * (est[:, 0] - t.phi[:, 0].double().numpy()))))
    dtheta = np.abs(est[:, 1] - t.theta[:, 0].double().numpy())
    dr_rel = np.abs(est[:, 2] - t.r[:, 0].double().numpy()) / t.r[:, 0].double().numpy()
    return dphi, dtheta, dr_rel


def test_independent_locator_on_risloc_simulate(tmp_path):
    out = tmp_path / "k1.h5"
    assert main(["simulate", "--out", str(out), "--scenes", "24", "--seed", "7", "--k", "1", "--snr-db", "30", "--signal", "static", "--quiet"]) == 0
    scenes = io.load_scenes(out)
    assert (scenes.truth.K == 1).all()
    dphi, dtheta, dr_rel = angle_errors(scenes)
    assert dphi.max() < TOLERANCE and dtheta.max() < TOLERANCE, (np.degrees(dphi), np.degrees(dtheta))
    assert np.median(dphi) < 0.05 * DEG and np.median(dtheta) < 0.05 * DEG  # "a few hundredths of a degree"
    assert np.median(dr_rel) < 0.05


def test_independent_locator_on_reference_file():
    scenes = io.load_scenes(REF_K1)
    dphi, dtheta, dr_rel = angle_errors(scenes)
    assert dphi.max() < TOLERANCE and dtheta.max() < TOLERANCE, (np.degrees(dphi), np.degrees(dtheta))
    assert np.median(dphi) < 0.05 * DEG and np.median(dtheta) < 0.05 * DEG  # "a few hundredths of a degree"
    assert np.median(dr_rel) < 0.05
