"""Batched, reproducible simulation of RIS scenes (docs/model.md).

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
block b from its own generator seeded by ``SeedSequence([s, b])``; a request for scenes
[start, stop) draws and computes the whole blocks it touches and keeps its rows, so a
scene's numbers never depend on the request (bit for bit on CPU). Within a block the draws
come in a fixed order (see :func:`_draw_block`): uniforms, RIS-code words, then the
normals of W, of the signals and of the noise. On CPU the blocks run in parallel worker
threads, each single-threaded, so the result does not depend on the thread count either.
The generator streams of CPU and CUDA differ, so a scene depends on the device it is drawn on.

Impairments (``Scenario.csi_nmse_db``, ``ris_phase_noise_deg``, ``ris_amplitude``,
``ris_failed_fraction``; all off by default) draw from generators of their own, one per
block and impairment, seeded by ``SeedSequence([s, b, tag])`` (:data:`IMPAIRMENT_TAGS`):
with all of them off nothing else is drawn and the scenes are those of the ideal model bit
for bit; with some on, the ideal part of scene i (sources, H, codes, signals, noise draws) is
unchanged and each impairment's draws do not depend on the others, so a sweep over one
impairment compares the same scenes. The snapshots are made with the true H and the realised
codes (:func:`physics.realised_codes`), the SNR is defined on that realised clean signal, and
the scenes carry what the receiver knows: ``H`` is the estimate (:func:`physics.csi_estimate`)
and ``codes`` the commanded codes; the true ones go to ``truth.H`` / ``truth.codes``.

Speed notes (the hot path, per scene): 2 M N normals for W are drawn straight into the
buffer that becomes H; the random b-bit codes come from packed integer words
(:func:`packed_code_table`: one draw per ``g`` elements, one table look-up per word)
rather than one float per element; the line-of-sight part is added by a rank-one
``baddbmm_`` in place; no float64 anywhere unless complex128 is asked for.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from . import physics
from .cuda_graphs import cache_entry
from .scenario import Scenario
from .scenes import Scenes, Truth

RNG_BLOCK = 1024
"""Scenes per random-number block (part of the definition of 'scene i of seed s')."""

POSITION_ATTEMPTS = 8
"""Candidate source sets drawn per scene in one go for the separation rejection."""

CODE_WORD_BITS = 12
"""Random code levels are packed ``g = max(1, 12 // b)`` to a word of ``g * b`` random bits."""

IMPAIRMENT_TAGS = {"ris_phase_noise": 0x9A5E, "ris_failed": 0xFA11, "csi_error": 0xC51E}
"""Third key of the generator ``SeedSequence([seed, block, tag])`` of each impairment's draws."""


class _Layout:
    """How many random numbers of each kind a scene takes, and where its uniforms sit."""

    def __init__(self, sc: Scenario):
        self.scenario = sc
        K, L, M, N = sc.k_max, sc.snapshots, sc.m_bs, sc.n_elements
        self.k, self.snr, self.kappa, self.psi, self.phi_b, self.theta_b = range(6)
        u = 6
        self.power = slice(u, u + K)
        u += K
        self.positions = slice(u, u + POSITION_ATTEMPTS * K * 3)
        u += POSITION_ATTEMPTS * K * 3
        self.n_uniform = u
        # random codes: g levels of b bits per integer word
        self.code_group = max(1, CODE_WORD_BITS // sc.code_bits) if sc.codebook == "random" else 0
        self.n_words = -(-L * N // self.code_group) if self.code_group else 0
        self.scatter_shape = (M, N, 2)  # W, real and imaginary parts last
        self.signal_shape = (K, L, 2)
        self.noise_shape = (L, M, 2)


def _block_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, *keys]).generate_state(1, np.uint64)[0])


class _Draws:
    """The random numbers of a run of whole blocks: one row per scene in each buffer.

    ``scatter`` may be given: a float32 buffer ``[rows, M, N, 2]`` to draw W into (the
    real view of the output H, so that H is built in place).
    """

    def __init__(self, lay: _Layout, rows: int, device, scatter: Tensor | None = None):
        f32 = dict(device=device, dtype=torch.float32)
        self.uniform = torch.empty(rows, lay.n_uniform, **f32)
        self.words = torch.empty(rows, lay.n_words, device=device, dtype=torch.int32)
        self.scatter = torch.empty(rows, *lay.scatter_shape, **f32) if scatter is None else scatter
        self.signal = torch.empty(rows, *lay.signal_shape, **f32)
        self.noise = torch.empty(rows, *lay.noise_shape, **f32)
        # impairments (allocated only when on): delta / sigma [rows, L, N], uniforms that pick the
        # failed elements [rows, N], the CSI error's normals [rows, M, N, 2]
        sc = lay.scenario
        self.phase_noise = torch.empty(rows, sc.snapshots, sc.n_elements, **f32) if sc.ris_phase_noise_deg > 0 else None
        self.failed = torch.empty(rows, sc.n_elements, **f32) if sc.n_failed_elements > 0 else None
        self.csi = torch.empty(rows, *lay.scatter_shape, **f32) if sc.csi_error else None


def _draw_block(draws: _Draws, row: int, seed: int, block: int, word_range: int) -> None:
    """Fill rows ``[row, row + RNG_BLOCK)`` of ``draws`` with the random numbers of block ``block``.

    The block's generator draws, in this order: uniforms ``[RNG_BLOCK, n_uniform]``, code
    words ``[RNG_BLOCK, n_words]`` (each uniform on ``[0, 2^(g b))``), standard normals for W
    ``[RNG_BLOCK, M, N, 2]``, for the signals ``[RNG_BLOCK, K_max, L, 2]`` and for the
    noise ``[RNG_BLOCK, L, M, 2]``.
    """
    gen = torch.Generator(device=draws.uniform.device)
    gen.manual_seed(_block_seed(seed, block))
    rows = slice(row, row + RNG_BLOCK)
    draws.uniform[rows].uniform_(generator=gen)
    if draws.words.shape[1]:
        draws.words[rows].random_(0, word_range, generator=gen)
    for buf in (draws.scatter, draws.signal, draws.noise):
        buf[rows].normal_(generator=gen)


def _draw_impairments(draws: _Draws, row: int, seed: int, block: int) -> None:
    """Fill rows ``[row, row + RNG_BLOCK)`` of the impairment buffers of ``draws`` (those that are on).

    Each impairment has its own generator, seeded by ``SeedSequence([seed, block, tag])``
    (:data:`IMPAIRMENT_TAGS`): standard normals ``[RNG_BLOCK, L, N]`` for the phase noise,
    uniforms ``[RNG_BLOCK, N]`` for the choice of failed elements, standard normals
    ``[RNG_BLOCK, M, N, 2]`` for the CSI error.
    """
    rows = slice(row, row + RNG_BLOCK)
    for name, buf, fill in (
        ("ris_phase_noise", draws.phase_noise, "normal_"),
        ("ris_failed", draws.failed, "uniform_"),
        ("csi_error", draws.csi, "normal_"),
    ):
        if buf is not None:
            gen = torch.Generator(device=buf.device)
            gen.manual_seed(_block_seed(seed, block, IMPAIRMENT_TAGS[name]))
            getattr(buf[rows], fill)(generator=gen)


def _failed_mask(u: Tensor, n_failed: int) -> Tensor:
    """``[B, N]`` boolean: the ``n_failed`` elements with the smallest uniforms ``u`` ``[B, N]`` of each
    scene (a uniformly random subset of that size, drawn without replacement)."""
    pick = torch.topk(u, n_failed, dim=-1, largest=False).indices
    return torch.zeros(u.shape, dtype=torch.bool, device=u.device).scatter_(-1, pick, True)


_CODE_TABLES: dict = {}


def packed_code_table(bits: int, group: int, *, dtype: torch.dtype = torch.complex64, device=None) -> Tensor:
    """Look-up table ``[2^(g b), 2 g]`` from a packed word to the codes of its ``g`` elements.

    Word w holds the levels ``q_t = (w >> (t b)) & (2^b - 1)``, t = 0..g-1, of g consecutive
    elements; row w of the table is ``(Re c_0, Im c_0, ..., Re c_{g-1}, Im c_{g-1})`` with
    ``c_t = exp(j 2 pi q_t / 2^b)`` (physics.phase_codes). A word uniform on [0, 2^(g b))
    gives g independent uniform levels. Cached per bits, group, dtype and device.
    """

    def build() -> Tensor:
        words = torch.arange(2 ** (group * bits), device=device).unsqueeze(-1)
        q = (words >> (bits * torch.arange(group, device=device))) & (2**bits - 1)  # [2^(g b), g]
        return torch.view_as_real(physics.phase_codes(q, bits, dtype=dtype)).reshape(len(words), 2 * group)

    return cache_entry(_CODE_TABLES, (bits, group, dtype, str(device)), build)


def _random_codes(words: Tensor, lay: _Layout, sc: Scenario, out: Tensor) -> None:
    """Write the codes ``[B, L, N]`` of packed words ``[B, n_words]`` into ``out`` (one table look-up per word)."""
    table = packed_code_table(sc.code_bits, lay.code_group, dtype=out.dtype, device=words.device)  # cached
    B, LN = words.shape[0], sc.snapshots * sc.n_elements
    if lay.n_words * lay.code_group == LN and out.is_contiguous():
        torch.index_select(table, 0, words.view(-1), out=torch.view_as_real(out).view(-1, table.shape[1]))
    else:
        flat = torch.view_as_complex(table.index_select(0, words.view(-1)).view(B, -1, 2))
        out.copy_(flat[:, :LN].view_as(out))


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
    phi, theta, r = _sources_from(u_pos, sc)  # [B, T, K_max]
    # Most scenes accept their first candidate: test that one for all, the others only where needed.
    first = torch.zeros(phi.shape[0], dtype=torch.int64, device=phi.device)
    ok = _separated(phi[:, :1], theta[:, :1], K, sc.min_separation)[:, 0]  # [B]
    retry = torch.nonzero(~ok).flatten()
    if len(retry):
        ok_r = _separated(phi[retry, 1:], theta[retry, 1:], K[retry], sc.min_separation)  # [R, T-1]
        first[retry] = 1 + torch.argmax(ok_r.to(torch.int8), dim=1)  # first valid later attempt
        ok[retry] = ok_r.any(1)
    pick = lambda t: t.gather(1, first.view(-1, 1, 1).expand(-1, 1, t.shape[-1])).squeeze(1)  # noqa: E731
    phi, theta, r = pick(phi), pick(theta), pick(r)
    pending = torch.nonzero(~ok).flatten().tolist()
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
            raise ValueError(
                f"Scenario.min_separation = {sc.min_separation:g} rad ({math.degrees(sc.min_separation):.2f} deg): scene "
                f"{int(index[row])} found no set of {int(K[row])} sources that far apart in 80 000 candidates; the field "
                "of view is too small for that separation (the field is in radians: 5 deg is 0.0873)"
            )
    return phi, theta, r


def _channel_inplace(
    scatter: Tensor, psi: Tensor, phi_b: Tensor, theta_b: Tensor, kappa: Tensor, sc: Scenario, w_scale: float = 1.0
) -> Tensor:
    """:func:`physics.channel` built in the buffer of W: ``H = sqrt(1/(1+kappa)) W + sqrt(kappa/(1+kappa)) a_BS b^T``.

    ``scatter``: ``W / w_scale`` ``[B, M, N]`` complex (overwritten and returned as H): one pass
    over the buffer scales it, a rank-one ``baddbmm_`` adds the line-of-sight part.
    """
    rd = physics.real_dtype(scatter.dtype)
    kappa = kappa.to(rd)
    torch.view_as_real(scatter).mul_(torch.rsqrt(1 + kappa).view(-1, 1, 1, 1) * w_scale)
    a_bs = physics.bs_steering(psi, sc, dtype=scatter.dtype) * torch.sqrt(kappa / (1 + kappa)).unsqueeze(-1)
    b = physics.bs_ris_phase(phi_b, theta_b, sc, dtype=scatter.dtype)
    return scatter.baddbmm_(a_bs.unsqueeze(-1), b.unsqueeze(-2))


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
    ``dtype=torch.complex128`` computes in double precision from the same (float32) draws.

    Every scene is computed as a row of its whole block, so its numbers do not depend on
    the request (bit for bit on CPU). A request smaller than a block costs a whole block
    (about 1024 scenes); ask in chunks aligned to :data:`RNG_BLOCK` for the best speed.
    """
    sc = scenario if scenario is not None else Scenario()
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype must be torch.complex64 or torch.complex128, not {dtype}")
    device = torch.device(device)
    lay = _Layout(sc)
    stop = start + n_scenes
    H = torch.empty(n_scenes, sc.m_bs, sc.n_elements, dtype=dtype, device=device)
    codes = torch.empty(n_scenes, sc.snapshots, sc.n_elements, dtype=dtype, device=device)

    # Runs of whole blocks computed together: one block per run on CPU, all blocks in one run on GPU
    # (where kernel launches dominate). A scene is always computed as a row of its whole block.
    blocks = range(start // RNG_BLOCK, (stop - 1) // RNG_BLOCK + 1)
    runs = [blocks[i : i + 1] for i in range(len(blocks))] if device.type == "cpu" else [blocks]
    word_range = 2 ** (lay.code_group * sc.code_bits) if lay.code_group else 1

    def run(group: range) -> tuple[slice, Scenes]:
        """Draw and compute the blocks of ``group``; fill their rows of H and codes; return the rest."""
        g0, g1 = group.start * RNG_BLOCK, group.stop * RNG_BLOCK
        lo, hi = max(start, g0), min(stop, g1)
        whole = (lo, hi) == (g0, g1)
        out, rows = slice(lo - start, hi - start), slice(lo - g0, hi - g0)
        in_place = torch.view_as_real(H[out]) if whole and dtype == torch.complex64 else None
        draws = _Draws(lay, g1 - g0, device, scatter=in_place)
        for b in group:
            _draw_block(draws, (b - group.start) * RNG_BLOCK, seed, b, word_range)
            if sc.impaired:
                _draw_impairments(draws, (b - group.start) * RNG_BLOCK, seed, b)
        part = _simulate_rows(draws, lay, sc, seed, g0, dtype, with_covariance, codes[out] if whole else None)
        if part.H.data_ptr() != H[out].data_ptr():  # not built in place (partial block or complex128)
            H[out] = part.H[rows]
        if part.codes.data_ptr() != codes[out].data_ptr():
            codes[out] = part.codes[rows]
        return rows, part

    if device.type == "cpu":
        # One block per worker thread, each single-threaded inside: torch's CPU generators are
        # sequential anyway, the cores are used without intra-op synchronisation, and a block's
        # arithmetic never depends on the thread count or on the request.
        threads = torch.get_num_threads()
        single = lambda g: _single_threaded(run, g, restore=threads)  # noqa: E731
        if len(runs) > 1 and threads > 1:
            with ThreadPoolExecutor(min(len(runs), threads)) as pool:
                results = list(pool.map(single, runs))
        else:
            results = [single(g) for g in runs]
    else:
        results = [run(g) for g in runs]
    parts = [part[rows] for rows, part in results]
    return Scenes(
        y=torch.cat([p.y for p in parts]),
        H=H,
        codes=codes,
        scenario=sc,
        snr_db=torch.cat([p.snr_db for p in parts]),
        truth=Truth.cat([p.truth for p in parts]),
    )


def _single_threaded(fn, *args, restore: int):
    """Call ``fn(*args)`` with one intra-op thread in the calling thread, then set ``restore`` threads.

    (With OpenMP, torch's thread count is a per-thread setting; ``restore`` is the caller's count
    so that the process-wide default is left as the caller had it.)
    """
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(restore)


def _simulate_rows(
    draws: _Draws,
    lay: _Layout,
    sc: Scenario,
    seed: int,
    first: int,
    dtype: torch.dtype,
    with_covariance: bool,
    codes_out: Tensor | None,
) -> Scenes:
    """The scenes ``[first, first + rows)`` from their random numbers (H built in ``draws.scatter``)."""
    rd = physics.real_dtype(dtype)
    K_max, L, M, N = sc.k_max, sc.snapshots, sc.m_bs, sc.n_elements
    B = draws.uniform.shape[0]
    device = draws.uniform.device
    uni = draws.uniform.to(rd)

    # --- sources ------------------------------------------------------------------------------
    if sc.k_fixed:
        K = torch.full((B,), sc.k_fixed, dtype=torch.int64, device=device)
    else:
        K = torch.clamp((uni[:, lay.k] * K_max).to(torch.int64) + 1, 1, K_max)
    active = torch.arange(K_max, device=device).view(1, -1) < K.view(-1, 1)  # [B, K_max]
    index = torch.arange(first, first + B, device=device)
    phi, theta, r = _draw_sources(uni[:, lay.positions], K, sc, seed, index)
    power = 10 ** (-sc.power_spread_db * uni[:, lay.power] / 10)
    A = torch.zeros(B, K_max, N, dtype=dtype, device=device)  # zero for inactive sources
    A[active] = physics.steering(phi[active], theta[active], r[active], sc, dtype=dtype)

    # --- signals s [B, K_max, L] (zero for inactive sources) and x_l = sum_k a_k s_k(l) -------------
    g = draws.signal.to(rd)
    if sc.signal == "static":
        g = g[:, :, :1].expand(B, K_max, L, 2)
    amp = torch.sqrt(power / 2) * active
    s = torch.view_as_complex(g.contiguous()) * amp.unsqueeze(-1).to(dtype)
    z = s.mT @ A  # [B, L, N]: row l is x_l

    # --- codes, then z_l = diag(c_l) x_l ---------------------------------------------------------
    codes = torch.empty(B, L, N, dtype=dtype, device=device) if codes_out is None else codes_out
    if sc.codebook == "random":
        _random_codes(draws.words, lay, sc, codes)
    else:
        codes.copy_(physics.dft_codes(sc, dtype=dtype, device=device).expand(B, L, N))
    realised = None  # the realised codes, where they differ from the commanded ones
    if sc.code_impairments:
        realised = physics.realised_codes(
            codes,
            sc,
            phase_error=None if draws.phase_noise is None else draws.phase_noise.to(rd) * math.radians(sc.ris_phase_noise_deg),
            failed=None if draws.failed is None else _failed_mask(draws.failed, sc.n_failed_elements),
        )
    z.mul_(codes if realised is None else realised)

    # --- channel H (built in W's buffer) ----------------------------------------------------------
    scatter = draws.scatter if rd == torch.float32 else draws.scatter.to(rd)
    H = _channel_inplace(
        torch.view_as_complex(scatter),  # sqrt(2) W: real and imaginary parts standard normal
        _uniform(uni[:, lay.psi], -sc.bs_psi_max, sc.bs_psi_max),
        _uniform(uni[:, lay.phi_b], -sc.bs_phi_max, sc.bs_phi_max),
        _uniform(uni[:, lay.theta_b], -sc.bs_theta_max, sc.bs_theta_max),
        _uniform(uni[:, lay.kappa], sc.rician_min, sc.rician_max),
        sc,
        w_scale=1 / math.sqrt(2),
    )

    # --- snapshots y_l = H z_l + n_l -----------------------------------------------------------
    y = (H @ z.mT).mT.contiguous()  # [B, L, M], still noiseless
    snr_db = _uniform(uni[:, lay.snr], sc.snr_db_min, sc.snr_db_max)
    P = torch.linalg.vector_norm(torch.view_as_real(y).flatten(1), dim=1).square() / (L * M)
    noise_var = P / 10 ** (snr_db / 10)
    noise = torch.view_as_complex(draws.noise.to(rd))
    y.addcmul_(noise, torch.sqrt(noise_var / 2).view(B, 1, 1).to(dtype))

    # --- what the receiver knows of H: H-hat = H + E (in H's buffer; the true H goes to the truth) ---
    H_true = None
    if sc.csi_error:
        H_true = H.clone()
        unit = torch.view_as_complex(draws.csi.to(rd).mul_(1 / math.sqrt(2)))  # CN(0, 1) (the block's scratch draws, scaled in place)
        H.copy_(physics.csi_estimate(H_true, unit, sc.csi_nmse_db))

    nan = torch.tensor(float("nan"), dtype=rd, device=device)
    truth = Truth(
        K=K,
        phi=torch.where(active, phi, nan),
        theta=torch.where(active, theta, nan),
        r=torch.where(active, r, nan),
        power=torch.where(active, power, nan),
        noise_var=noise_var,
        H=H_true,
        codes=realised,
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
    """The learning target ``R = sum_k p_k a_k a_k^H`` ``[S, N, N]`` (the learning target of docs/model.md)."""
    F = source_factor(truth, scenario, dtype=dtype)
    return F @ F.mH
