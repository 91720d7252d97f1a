"""Batched, reproducible simulation of RIS scenes (shared/spec/physics.md).

One call draws a whole batch of scenes in torch, on CPU or GPU, with no per-scene
Python loop. For each scene::

    K ~ U{1..K_max};  (phi_k, theta_k, r_k) uniform in the field of view, redrawn as a set
    until every pair is at least `min_separation` apart;  p_k = 10^(u_k/10), u_k ~ U[-6, 0] dB
    s_k(l) ~ CN(0, p_k) (stochastic) or s_k(l) = g_k ~ CN(0, p_k) (static)
    H = sqrt(kappa/(1+kappa)) a_BS(psi) b^T + sqrt(1/(1+kappa)) W;  codes c_l (random or dft)
    y_l = H diag(c_l) sum_k a_k s_k(l) + n_l,   n_l ~ CN(0, sigma^2 I_M)
    sigma^2 = P / 10^(SNR/10),  P = (1/(L M)) sum_l |y_l - n_l|^2   (the realised clean power)

Reproducibility: scene i of seed s is the same whatever the batch size, chunking or
number of workers. Randomness is drawn in fixed blocks of :data:`RNG_BLOCK` scenes,
block b from a generator seeded by ``SeedSequence([s, b])``; a request for scenes
[start, stop) draws the blocks it touches and keeps its rows. (The generator streams
of CPU and CUDA differ, so a scene depends on the device it is drawn on.)
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from . import physics
from .scenario import Scenario
from .scenes import Scenes, Truth

RNG_BLOCK = 256
"""Scenes per random-number block (part of the definition of 'scene i of seed s')."""

POSITION_ATTEMPTS = 8
"""Candidate source sets drawn per scene in one go for the separation rejection."""


class _Layout:
    """Where each random quantity of a scene sits in the block's uniform and normal rows."""

    def __init__(self, sc: Scenario):
        K, L, M, N = sc.k_max, sc.snapshots, sc.m_bs, sc.n_elements
        u = 0
        self.k, self.snr, self.kappa, self.psi, self.phi_b, self.theta_b = range(6)
        u = 6
        self.power = slice(u, u + K); u += K
        self.positions = slice(u, u + POSITION_ATTEMPTS * K * 3); u += POSITION_ATTEMPTS * K * 3
        self.codes = slice(u, u + (L * N if sc.codebook == "random" else 0)); u = self.codes.stop
        self.n_uniform = u
        n = 0
        self.scatter = slice(n, n + 2 * M * N); n += 2 * M * N
        self.signal = slice(n, n + 2 * K * L); n += 2 * K * L
        self.noise = slice(n, n + 2 * L * M); n += 2 * L * M
        self.n_normal = n


def _block_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, *keys]).generate_state(1, np.uint64)[0])


def _draw_blocks(layout: _Layout, seed: int, start: int, stop: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Uniform ``[stop-start, n_uniform]`` and standard normal ``[stop-start, n_normal]`` rows of scenes [start, stop)."""
    b0, b1 = start // RNG_BLOCK, (stop - 1) // RNG_BLOCK + 1
    n_blocks = b1 - b0
    uni = torch.empty(n_blocks, RNG_BLOCK, layout.n_uniform, device=device, dtype=dtype)
    nor = torch.empty(n_blocks, RNG_BLOCK, layout.n_normal, device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    for k, b in enumerate(range(b0, b1)):
        gen.manual_seed(_block_seed(seed, b))
        torch.rand(uni[k].shape, generator=gen, device=device, dtype=dtype, out=uni[k])
        torch.randn(nor[k].shape, generator=gen, device=device, dtype=dtype, out=nor[k])
    off = start - b0 * RNG_BLOCK
    uni = uni.view(-1, layout.n_uniform)[off : off + stop - start]
    nor = nor.view(-1, layout.n_normal)[off : off + stop - start]
    return uni, nor


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * u


def _sources_from(u: Tensor, sc: Scenario) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate (phi, theta, r) ``[B, T, K_max]`` from uniforms ``[B, T*K_max*3]``."""
    u = u.view(u.shape[0], -1, sc.k_max, 3)
    return (
        _uniform(u[..., 0], sc.phi_min, sc.phi_max),
        _uniform(u[..., 1], sc.theta_min, sc.theta_max),
        _uniform(u[..., 2], sc.r_min, sc.r_max),
    )


def _separated(phi: Tensor, theta: Tensor, K: Tensor, min_sep: float) -> Tensor:
    """``[B, T]``: True where the first K sources of attempt t are pairwise >= min_sep apart."""
    u = physics.direction(phi, theta)  # [B, T, K, 3]
    # chord length >= 2 sin(min_sep / 2)  <=>  angle >= min_sep
    chord = torch.linalg.vector_norm(u.unsqueeze(-2) - u.unsqueeze(-3), dim=-1)  # [B, T, K, K]
    kmax = phi.shape[-1]
    idx = torch.arange(kmax, device=phi.device)
    active = idx.view(1, -1) < K.view(-1, 1)  # [B, K]
    pair = active.unsqueeze(-1) & active.unsqueeze(-2) & (idx.view(-1, 1) < idx.view(1, -1))  # [B, K, K]
    too_close = (chord < 2 * math.sin(min_sep / 2)) & pair.unsqueeze(1)
    return ~too_close.flatten(-2).any(-1)


def _draw_sources(u_pos: Tensor, K: Tensor, sc: Scenario, seed: int, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Source sets ``[B, K_max]`` obeying the separation rule (whole-set rejection sampling).

    The first valid set among the scene's POSITION_ATTEMPTS pre-drawn candidates is kept.
    Scenes with none (probability ~1e-8 by default) draw further candidate rounds from a
    generator keyed by (seed, scene index, round), so the result still depends only on
    (seed, scene index).
    """
    phi, theta, r = _sources_from(u_pos, sc)
    ok = _separated(phi, theta, K, sc.min_separation)  # [B, T]
    first = torch.argmax(ok.to(torch.int8), dim=1)  # index of first valid attempt (0 if none)
    pick = lambda t: t.gather(1, first.view(-1, 1, 1).expand(-1, 1, t.shape[-1])).squeeze(1)
    phi, theta, r = pick(phi), pick(theta), pick(r)
    pending = torch.nonzero(~ok.any(1)).flatten().tolist()
    for row in pending:  # rare: only scenes whose eight candidate sets all failed
        gen = torch.Generator(device=u_pos.device)
        for rnd in range(1, 10_000):
            gen.manual_seed(_block_seed(seed, int(index[row]), rnd, 0x5E9))
            u = torch.rand(1, u_pos.shape[1], generator=gen, device=u_pos.device, dtype=u_pos.dtype)
            p, t, rr = _sources_from(u, sc)
            okr = _separated(p, t, K[row : row + 1], sc.min_separation)[0]
            if okr.any():
                j = int(torch.argmax(okr.to(torch.int8)))
                phi[row], theta[row], r[row] = p[0, j], t[0, j], rr[0, j]
                break
        else:
            raise RuntimeError(
                f"scene {int(index[row])}: no source set with separation {math.degrees(sc.min_separation):.2f} deg "
                "found after 80 000 candidates; the field of view is too small for k_max sources"
            )
    return phi, theta, r


def simulate(
    scenario: Scenario | None = None,
    n_scenes: int = 1,
    *,
    seed: int = 0,
    start: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.complex64,
    with_covariance: bool = False,
) -> Scenes:
    """Draw scenes ``[start, start + n_scenes)`` of the stream ``seed`` (see module docstring).

    Returns a :class:`~risloc.scenes.Scenes` with inputs (y, H, codes, snr_db) and truth.
    ``with_covariance=True`` also fills ``truth.covariance`` with R = sum_k p_k a_k a_k^H
    (``[S, N, N]``; 166 kB per scene in complex64, so ask for it only on modest batches).
    """
    sc = scenario if scenario is not None else Scenario()
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    device = torch.device(device)
    rd = physics.real_dtype(dtype)
    lay = _Layout(sc)
    K_max, L, M, N = sc.k_max, sc.snapshots, sc.m_bs, sc.n_elements
    uni, nor = _draw_blocks(lay, seed, start, start + n_scenes, device, torch.float32)
    uni, nor = uni.to(rd), nor.to(rd)
    B = n_scenes
    index = torch.arange(start, start + B, device=device)

    # --- sources ------------------------------------------------------------------------------
    if sc.k_fixed:
        K = torch.full((B,), sc.k_fixed, dtype=torch.int64, device=device)
    else:
        K = torch.clamp((uni[:, lay.k] * K_max).to(torch.int64) + 1, 1, K_max)
    active = torch.arange(K_max, device=device).view(1, -1) < K.view(-1, 1)  # [B, K_max]
    phi, theta, r = _draw_sources(uni[:, lay.positions], K, sc, seed, index)
    power = 10 ** (-sc.power_spread_db * uni[:, lay.power] / 10)
    A = physics.steering(phi, theta, r, sc, dtype=dtype)  # [B, K_max, N]

    # --- signals: s [B, K_max, L], zero for inactive sources ------------------------------------
    g = nor[:, lay.signal].view(B, K_max, L, 2)
    if sc.signal == "static":
        g = g[:, :, :1].expand(B, K_max, L, 2)
    amp = torch.sqrt(power / 2) * active
    s = torch.complex(g[..., 0], g[..., 1]) * amp.unsqueeze(-1).to(dtype)

    # --- channel and codes --------------------------------------------------------------------
    w = nor[:, lay.scatter].view(B, M, N, 2)
    W = torch.complex(w[..., 0], w[..., 1]) * (1 / math.sqrt(2))
    H = physics.channel(
        _uniform(uni[:, lay.psi], -sc.bs_psi_max, sc.bs_psi_max),
        _uniform(uni[:, lay.phi_b], -sc.bs_phi_max, sc.bs_phi_max),
        _uniform(uni[:, lay.theta_b], -sc.bs_theta_max, sc.bs_theta_max),
        _uniform(uni[:, lay.kappa], sc.rician_min, sc.rician_max),
        W,
        sc,
    )
    if sc.codebook == "random":
        q = torch.clamp((uni[:, lay.codes] * 2**sc.code_bits).to(torch.int64), max=2**sc.code_bits - 1)
        codes = physics.phase_codes(q.view(B, L, N), sc.code_bits, dtype=dtype)
    else:
        codes = physics.dft_codes(sc, dtype=dtype, device=device).expand(B, L, N).contiguous()

    # --- snapshots y_l = H diag(c_l) x_l + n_l, with x_l = sum_k a_k s_k(l) -----------------------
    x = A.transpose(1, 2) @ s  # [B, N, L]
    clean = (H @ (x * codes.transpose(1, 2))).transpose(1, 2)  # [B, L, M]
    snr_db = _uniform(uni[:, lay.snr], sc.snr_db_min, sc.snr_db_max)
    P = clean.abs().square().mean(dim=(1, 2))
    noise_var = P / 10 ** (snr_db / 10)
    n = nor[:, lay.noise].view(B, L, M, 2)
    y = clean + torch.complex(n[..., 0], n[..., 1]) * torch.sqrt(noise_var / 2).view(B, 1, 1).to(dtype)

    nan = torch.tensor(float("nan"), dtype=rd, device=device)
    truth = Truth(
        K=K,
        phi=torch.where(active, phi, nan),
        theta=torch.where(active, theta, nan),
        r=torch.where(active, r, nan),
        power=torch.where(active, power, nan),
        noise_var=noise_var,
    )
    if with_covariance:
        truth.covariance = source_covariance(truth, sc, dtype=dtype)
    return Scenes(y=y, H=H, codes=codes, scenario=sc, snr_db=snr_db, truth=truth)


def simulate_chunks(
    scenario: Scenario | None,
    n_scenes: int,
    *,
    seed: int = 0,
    start: int = 0,
    chunk: int = 8192,
    **kwargs,
) -> Iterator[Scenes]:
    """Yield scenes ``[start, start + n_scenes)`` in chunks of at most ``chunk`` (bounded memory)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    stop = start + n_scenes
    for a in range(start, stop, chunk):
        yield simulate(scenario, min(chunk, stop - a), seed=seed, start=a, **kwargs)


def source_factor(truth: Truth, scenario: Scenario, *, dtype: torch.dtype = torch.complex64) -> Tensor:
    """Factor ``F = [sqrt(p_1) a_1, ..., sqrt(p_K) a_K, 0, ...]`` ``[S, N, K_max]`` with R = F F^H.

    Columns after the first K are zero (the NaN padding of the truth is mapped to 0).
    """
    active = torch.isfinite(truth.phi)
    zero = torch.zeros((), dtype=truth.phi.dtype, device=truth.phi.device)
    phi, theta = torch.where(active, truth.phi, zero), torch.where(active, truth.theta, zero)
    r = torch.where(active, truth.r, torch.ones((), dtype=truth.r.dtype, device=truth.r.device))
    A = physics.steering(phi, theta, r, scenario, dtype=dtype)  # [S, K_max, N]
    amp = torch.where(active, truth.power, zero).clamp(min=0).sqrt()
    return (A * amp.unsqueeze(-1).to(A.dtype)).transpose(1, 2)


def source_covariance(truth: Truth, scenario: Scenario, *, dtype: torch.dtype = torch.complex64) -> Tensor:
    """The learning target ``R = sum_k p_k a_k a_k^H`` ``[S, N, N]`` (physics.md, 'The learning target')."""
    F = source_factor(truth, scenario, dtype=dtype)
    return F @ F.mH
