"""The default network kind of the learned pipeline (``ModelConfig.kind = "spectrum"``): per-snapshot
matched-filter spectra on a near-field grid -> a 3-D detector -> source positions -> the
covariance factor through the steering model.

Why this input. Every snapshot is seen through its own 16 x 144 map G_l = H diag(c_l), so the
back-projected sample covariance R_s (the input of the ``covariance`` network and of MUSIC)
throws away most of what the measurements say (docs/learned.md, "Diagnosis"). ``ml`` reaches
the bound by testing near-field atoms d_q = a(phi_q, theta_q, r_q) against each snapshot
through its own map. The network sees the same first step of the likelihood: with
phi_lq = G_l d_q (:func:`risloc.grids.measure_dictionary`),

    c_lq = |phi_lq^H y_l|^2 / (|phi_lq|^2 |y_l|^2)       in [0, 1] (per snapshot),
    S_q  = sum_l |phi_lq^H y_l|^2 / |phi_lq|^2 / sum_l |y_l|^2,

i.e. the normalised matched filter of each snapshot and their power-weighted mean (for one
source and no noise S_q = 1 at the source; for noise alone E S_q = 1/M). Both are invariant to
a global gain on y. The grid ("dictionary") is uniform in (sin phi, sin theta, 1/r) like
``ml``'s. Input channels, on a ``[n_phi, n_theta, n_rho]`` volume: M S, log(M S), the L values
M c_l (the per-snapshot profile, which tells a source from a sidelobe of another source), the
SNR features (SNR/10 dB, "label known") and the three grid coordinates; with
``ModelConfig.coherent`` also L M C_j and log(L M C_j) of the coherent spectra C_j (one amplitude
held over the snapshots, the static signal model's statistic: :func:`matched_filter_spectra`). With
``ModelConfig.snapshot_quantiles`` = n > 0 the L per-snapshot channels are replaced by n quantiles
over the snapshots of M c_l at every cell (the sorted values, linearly interpolated to the
levels 0, 1/(n-1), ..., 1): the snapshots are exchangeable, so the sorted values keep what the
per-snapshot profile says at a cell, and no input then depends on N, M or L; such a network
reads scenes of any geometry (it builds its dictionary, decoding and factor from the scenes'
scenario, :attr:`risloc.nn.inputs.ModelInputs.scenario`).

Network: a 3-D U-Net (pre-activation residual blocks, GroupNorm, GELU; two stride-2 levels, a
global-context bottleneck) with a per-cell head (CenterNet-style detection, Zhou et al. 2019):

* ``heat``: logit that a source's nearest grid cell is this cell;
* ``offset``: the source's position relative to the cell, in cell units of (sin phi, sin theta, 1/r);
* ``log_power``: log of the source power relative to the scene's total;

and a K head (MLP on the pooled bottleneck, the sorted heat logits of the strongest local
maxima and the SNR features). Decoding: local maxima of ``heat`` (3 x 3 x 3), the ``K_max``
strongest in order, each moved by its offset. The factor is built through the steering model,

    F = [sqrt(p_1 s_1) a(phi_1, theta_1, r_1), ..., sqrt(p_K s_K) a(phi_K, theta_K, r_K)],

(s_k the detection confidence) and goes through THE builder
(:func:`risloc.nn.inputs.effective`) like every other prediction. At inference
(:meth:`SpectrumKind.to_estimates`) the K head's K-hat (or a known K) keeps the K strongest
detections, and MUSIC on their effective covariance is refined locally from the detections
(``search = "local"``).

Loss (``LossConfig.main = "detect"``, :func:`detection_loss`): the CenterNet focal loss on the
heat map against Gaussian bumps (std ``detect_sigma`` cells) at the true positions, plus a
Huber loss on the position errors in *hit units* of docs/metrics.md (delta phi / 2 deg,
delta theta / 2 deg, delta r / (0.1 r)) of the cells around each source, plus an L1 loss on
the log powers; the K head's cross-entropy is the objective's ``k`` term.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as Fn

from ... import covariance as cv
from ... import physics
from ...cuda_graphs import cache_entry, register_cache
from ...grids import MeasuredDictionary, abs2, atom_norms, back_project, dictionary, dictionary_product
from ...metrics import ANGLE_TOL as HIT_PHI, ANGLE_TOL as HIT_THETA, RANGE_TOL_REL as HIT_RANGE
from ...scenario import Scenario
from ...scenes import Estimates, Truth
from ..config import ModelConfig
from ..inputs import ModelInputs, Prediction, effective
from . import NetworkKind, register_network


# ----------------------------------------------------------------------------------------------
# the near-field grid and the matched-filter front end (no learned parameters)
# ----------------------------------------------------------------------------------------------
@dataclass
class SpectrumGrid:
    """Grid uniform in (u, v, rho) = (sin phi, sin theta, 1/r): ``lo``/``step`` per axis,
    ``shape`` (n_phi, n_theta, n_rho) and the dictionary ``D`` ``[N, Q]`` (phi slowest, rho fastest)."""

    shape: tuple[int, int, int]
    lo: Tensor
    step: Tensor
    D: Tensor
    coords: Tensor
    """``[3, n_phi, n_theta, n_rho]`` grid coordinates scaled to [-1, 1] (network input)."""

    def positions(self, index: Tensor) -> Tensor:
        """Cell centres ``[..., 3]`` (u, v, rho) of flat cell indices."""
        n_t, n_r = self.shape[1], self.shape[2]
        ijk = torch.stack([index // (n_t * n_r), (index // n_r) % n_t, index % n_r], -1)
        return ijk.to(self.lo.dtype)


_GRID_CACHE: dict = register_cache({})  # graphs keep what they read from it (risloc.cuda_graphs)


def spectrum_grid(scenario: Scenario, shape: tuple[int, int, int], *, device=None) -> SpectrumGrid:
    """The (cached) grid of ``scenario`` with ``shape`` = (n_phi, n_theta, n_rho) >= 2 each."""
    shape = tuple(int(s) for s in shape)
    if min(shape) < 2:
        raise ValueError(f"spectrum grid shape {shape}: every axis needs >= 2 points")

    def build() -> SpectrumGrid:
        sc = scenario
        D = dictionary(sc, shape, device=device, dtype=torch.complex64).D  # [N, Q], the one ml's searches use too
        lo = torch.tensor([math.sin(sc.phi_min), math.sin(sc.theta_min), 1.0 / sc.r_max], dtype=torch.float32, device=device)
        hi = torch.tensor([math.sin(sc.phi_max), math.sin(sc.theta_max), 1.0 / sc.r_min], dtype=torch.float32, device=device)
        n = torch.tensor(shape, dtype=torch.float32, device=device)
        step = (hi - lo) / (n - 1)
        axes = [torch.linspace(-1.0, 1.0, s, device=device) for s in shape]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return SpectrumGrid(shape, lo, step, D, coords)

    return cache_entry(_GRID_CACHE, (scenario.to_json(), shape, str(device)), build, limit=8)


FRONT_END_CHUNK = 256
"""Scenes per chunk of the front end (peak memory ~ 10 MB per scene for the default grid: the
float32 product behind |phi_lq|^2 with split operands, float32 elsewhere)."""


@dataclass
class Spectra:
    """The front end's output for a batch (module docstring)."""

    S: Tensor
    """``[B, 1 + J, Q]``: S_0 (the matched filter) and S_j after cancelling j greedy picks."""
    c: Tensor
    """``[B, L, Q]``: the per-snapshot normalised matched filter of S_0."""
    residual: Tensor
    """``[B, 1 + J']``: fraction of the total power left after j = 0..J' cancellations (J' = picks)."""
    C: Tensor | None = None
    """``[B, 1 + J, Q]`` (``coherent=True``): the coherent spectra C_0 .. C_J."""
    dictionary: MeasuredDictionary | None = None
    """(``keep_dictionary=True``) |phi_lq|^2 and y_l^H phi_lq ``[B, L, Q]``, the products every spectrum starts from."""


@torch.no_grad()
def matched_filter_spectra(y: Tensor, H: Tensor, codes: Tensor, grid: SpectrumGrid, *, picks: int = 0, chunk: int | None = None,
                           tensor_cores: bool | None = None, cancel: Tensor | None = None, coherent: bool = False,
                           keep_dictionary: bool = False) -> Spectra:
    """The matched-filter spectra of the module docstring, and ``picks`` steps of orthogonal
    matching pursuit on them (Pati, Rezaiifar & Krishnaprasad 1993), all per snapshot:

    step j picks the atom q_j = argmax_q S_{j-1}(q), appends its measured vectors
    b_l = G_l d_{q_j} (Gram-Schmidt, per snapshot) to an orthonormal basis E_l, and cancels it:

        S_j(q) = sum_l |phi_lq^H P_l y_l|^2 / |P_l phi_lq|^2 / sum_l |y_l|^2,   P_l = I - E_l E_l^H,

    i.e. the spectrum of what the picks do not explain (weak sources hidden by the sidelobes of
    strong ones appear). ``residual[:, j]`` = sum_l |P_l y_l|^2 / sum_l |y_l|^2 after j picks.
    Atoms already (nearly) explained (|P phi|^2 < 1e-3 |phi|^2) score 0.

    Every inner product with an atom goes through the dictionary instead of through
    Phi_l = G_l D: phi_lq^H v = d_q^H (G_l^H v) for v = y_l and for each basis vector e_l
    (:func:`risloc.grids.back_project`, then one [L, N] x [N, Q] product per scene), so that

        t_lq = phi_lq^H P_l y_l = t_lq - (phi_lq^H e_l)(e_l^H y_l),   n_lq = |P_l phi_lq|^2 = n_lq - |e_l^H phi_lq|^2

    cost O(L N Q) per pick. Only the norms |phi_lq|^2 need Phi itself (:func:`risloc.grids.atom_norms`, the
    dominant cost). With ``tensor_cores`` (default on CUDA) both kinds of product are split-TF32
    products on the tensor cores, as accurate as float32 (:func:`risloc.grids.dictionary_product`).

    ``cancel`` ``[B, J, N]`` (the network's second look, :func:`risloc.nn.inference.second_look`):
    steering vectors a_j of sources already found (e.g. refined on the likelihood), cancelled as
    picks 1..J in that order instead of the grid atoms q_j (b_l = G_l a_j); a zero row, and every
    pick beyond J, takes the argmax pick. Cancelling a source at its own position removes it
    from every S_j (a grid atom next to it leaves a residue where a weaker neighbour hides).

    ``coherent``: also the coherent spectra (:attr:`Spectra.C`), from the same products,

        C_j(q) = |sum_l phi_lq^H P_l y_l|^2 / sum_l |P_l phi_lq|^2 / sum_l |y_l|^2,

    the fraction of the power that one source at q explains with ONE amplitude held over the
    snapshots (the static signal model's one-source statistic; S_j lets the amplitude change
    from snapshot to snapshot). With random codes another source's leakage into C adds with a
    random phase per snapshot, so C's sidelobes are about L times weaker than S's; for noise
    alone E C_0 = 1/(L M).

    ``keep_dictionary``: also return the first two products, |phi_lq|^2 and y_l^H phi_lq
    (:attr:`Spectra.dictionary`, a :class:`risloc.grids.MeasuredDictionary`), for ``learned``'s
    likelihood stage (which then searches this grid without measuring it again).
    """
    B, L, M = y.shape
    Q = grid.D.shape[1]
    tensor_cores = (y.device.type == "cuda") if tensor_cores is None else tensor_cores
    chunk = chunk or FRONT_END_CHUNK
    n_s = picks if picks > 0 else 1
    D = grid.D.to(y.device)
    S_out = torch.zeros(B, n_s, Q, dtype=torch.float32, device=y.device)
    c_out = torch.empty(B, L, Q, dtype=torch.float32, device=y.device)
    res_out = torch.ones(B, picks + 1, dtype=torch.float32, device=y.device)
    C_out = torch.zeros(B, n_s, Q, dtype=torch.float32, device=y.device) if coherent else None
    kept = (MeasuredDictionary(tuple(grid.shape), torch.empty(B, L, Q, dtype=torch.float32, device=y.device),
                               torch.empty(B, L, Q, dtype=torch.complex64, device=y.device)) if keep_dictionary else None)

    def coherent_spectrum(tc: Tensor, n: Tensor, floor_sum: Tensor, total: Tensor) -> Tensor:  # C_j of the docstring, [b, Q]
        n_sum = n.sum(1)  # sum_l |P_l phi_lq|^2; atoms (nearly) explained in every snapshot score 0, as in S
        return torch.where(n_sum > floor_sum, tc.sum(1).abs().square() / n_sum.clamp(min=1e-30), 0.0) / total
    for a in range(0, B, chunk):
        yb = y[a : a + chunk].to(torch.complex64)
        Hb, cb = H[a : a + chunk].to(torch.complex64), codes[a : a + chunk].to(torch.complex64)
        b = yb.shape[0]
        n0 = atom_norms(Hb, cb, D, tensor_cores=tensor_cores)  # |phi|^2, [b, L, Q]
        tc = dictionary_product(back_project(yb, Hb, cb).conj(), D, tensor_cores=tensor_cores)  # y^H phi = conj(t), [b, L, Q]
        if kept is not None:
            kept.norms[a : a + chunk] = n0
            kept.y_products[a : a + chunk] = tc
        n = n0  # |P phi|^2: replaced (never modified in place) at every pick
        floor = 1e-3 * n0  # atoms whose |P phi|^2 falls to this are explained: score 0
        ynorm = yb.abs().square().sum(-1)  # [b, L]
        total = ynorm.sum(1, keepdim=True).clamp(min=1e-30)  # [b, 1]
        mf = abs2(tc) / n0.clamp(min=1e-30)
        c_out[a : a + chunk] = mf / ynorm.unsqueeze(-1).clamp(min=1e-30)
        S = mf.sum(1) / total
        S_out[a : a + chunk, 0] = S
        if coherent:
            floor_sum = floor.sum(1)  # [b, Q], the same for every pick
            C_out[a : a + chunk, 0] = coherent_spectrum(tc, n0, floor_sum, total)
        basis: list[Tensor] = []
        left = ynorm
        for j in range(picks):
            q = S.argmax(1)  # [b]
            d = D.T[q]  # [b, N]
            if cancel is not None and j < cancel.shape[1]:  # a given source where its row is not zero
                a_j = cancel[a : a + chunk, j].to(d.dtype)
                d = torch.where((a_j.abs().sum(-1) > 0).unsqueeze(-1), a_j, d)
            bvec = torch.einsum("bmn,bln->blm", Hb, cb * d.unsqueeze(1))  # G_l d, [b, L, M]
            for e in basis:  # Gram-Schmidt against the earlier picks
                bvec = bvec - e * (e.conj() * bvec).sum(-1, keepdim=True)
            e = bvec / torch.linalg.vector_norm(bvec, dim=-1, keepdim=True).clamp(min=1e-30)
            basis.append(e)
            ey = (e.conj() * yb).sum(-1)  # e^H y, [b, L]
            left = (left - ey.abs().square()).clamp(min=0)
            res_out[a : a + chunk, j + 1] = left.sum(1) / total.squeeze(1)
            if j + 1 >= n_s:  # the last pick's spectrum is not returned: its residual power is all it adds
                break
            z = dictionary_product(back_project(e, Hb, cb).conj(), D, tensor_cores=tensor_cores)  # e^H phi, [b, L, Q]
            # the updates of the docstring, in few passes over [b, L, Q]: conj(t) -= (e^H phi) conj(e^H y), n -= |e^H phi|^2
            tc = torch.addcmul(tc, z, ey.conj().unsqueeze(-1), value=-1)
            n = (n - abs2(z)).clamp_(min=0)
            S = (abs2(tc) / torch.where(n > floor, n, torch.inf)).sum(1) / total
            S_out[a : a + chunk, j + 1] = S
            if coherent:
                C_out[a : a + chunk, j + 1] = coherent_spectrum(tc, n, floor_sum, total)
    return Spectra(S_out, c_out, res_out, C_out, kept)


# ----------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------
def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


CPU_CONV_PRECISIONS = ("auto", "bf16", "fp32")

_cpu_conv_precision: ContextVar[str] = ContextVar("risloc_cpu_conv_precision", default="fp32")


def onednn_bf16() -> bool:
    """Whether oneDNN has a bfloat16 convolution on this CPU (it needs AVX-512; ``ONEDNN_MAX_CPU_ISA``
    below it forbids it): where ``"bf16"`` of :func:`set_cpu_conv_precision` can run."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and oneDNN may use it
    (:func:`onednn_bf16`): where the setting ``"auto"`` of :func:`set_cpu_conv_precision` takes
    bfloat16 convolutions."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() and onednn_bf16())


def cpu_conv_precision() -> str:
    """The precision that the spectrum network's 3-D convolutions take in CPU inference now:
    ``"bf16"`` or ``"fp32"`` (the setting of :func:`set_cpu_conv_precision`, ``"auto"`` resolved)."""
    setting = _cpu_conv_precision.get()
    if setting == "auto":
        return "bf16" if native_bf16() else "fp32"
    return setting


@contextmanager
def set_cpu_conv_precision(precision: str):
    """Within the block, the spectrum network's 3-D convolutions in CPU inference (no gradients)
    run in ``precision``:

    * ``"fp32"`` (the default): float32 throughout, as on CUDA;
    * ``"bf16"``: oneDNN's bfloat16 convolution, inputs and weights rounded to bfloat16
      (8 significant bits), products accumulated in float32, the output rounded to bfloat16 and
      returned as float32 (the network is trained under bfloat16 autocast on CUDA);
    * ``"auto"``: ``"bf16"`` where :func:`native_bf16`, else ``"fp32"``.

    The front end's spectra, the normalisations, the heads and the likelihood stage stay float32
    either way; training (gradients) and CUDA are not affected. ``learned`` and ``learned+ml``
    take the setting as their option ``conv_precision``. Measured with ``learned`` on 400 + 400
    scenes of each validation seed (1000, 2026) for default scenes, static signals and ``dft``
    codes at 10...20 and -5...20 dB on a 2-core Xeon with AMX (docs/learned.md, "Roofline of one
    scene on a 2-core CPU"), bfloat16 gave the same success in all but 4 of the 4 800 scenes (2
    fewer in all) but 4 fewer right counts of the 800 static-signal scenes at 10...20 dB, so
    float32 stays the default."""
    if precision not in CPU_CONV_PRECISIONS:
        raise ValueError(f"conv_precision = {precision!r}: must be one of {', '.join(CPU_CONV_PRECISIONS)}")
    if precision == "bf16" and not onednn_bf16():
        raise ValueError("conv_precision = 'bf16': oneDNN has no bfloat16 convolution on this CPU (it needs AVX-512 and no "
                         "ONEDNN_MAX_CPU_ISA below it): use 'fp32' or 'auto'")
    token = _cpu_conv_precision.set(precision)
    try:
        yield
    finally:
        _cpu_conv_precision.reset(token)


class _Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same weights, same state dict) whose CPU inference runs through oneDNN
    (``torch.mkldnn_convolution``) in the channels-last 3-D layout: in bfloat16 at every batch size
    where :func:`cpu_conv_precision` says so, else in float32 on one to three scenes.

    For fewer than 4 scenes PyTorch's CPU dispatcher takes its reference im2col kernel
    (``slow_conv3d``); on the 24 x 12 x 12 grid that kernel is about 5x slower than oneDNN's on one
    scene. oneDNN's kernels are faster again in its native channels-last layout (activations
    [B, D, H, W, C]; the weight kept in that layout too, converted once per weight version): on one
    scene of the default network on a 2-core AMD EPYC VM the 17 convolutions take 4.7 ms against
    5.9 ms for oneDNN on contiguous tensors, 6.6 ms with the coarsest 6 x 3 x 3 grid left to the
    reference kernel (the route before) and 24 ms on the reference kernel alone
    (``benchmarks/results/cpu/one-scene-channels-last-d30e017/conv_routes.py``). The output stays
    channels-last, so the following normalisations and
    convolutions read it without a copy. In float32, from 4 scenes on, and with gradients,
    PyTorch's own choice is kept; the float32 kernels agree to float32 rounding. In bfloat16
    (every batch size, so that a scene alone gets the products it gets in a batch) the network
    stage of one scene took 18.4-20.3 instead of 24.5-25.6 ms on a 2-core Xeon with AMX
    (``benchmarks/results/cpu/one-scene-bf16-558e1aa/``)."""

    MIN_CELLS = 0
    """Output cells from which oneDNN is used for one to three scenes in float32 (0: every grid of
    the network; ``benchmarks/bench_one_scene_cpu.py`` sets it out of reach to time PyTorch's own
    choice)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == torch.float32
                and self.padding_mode == "zeros" and torch.backends.mkldnn.is_available()):
            cl = torch.channels_last_3d
            if cpu_conv_precision() == "bf16":
                w, b = self._weight_cl(torch.bfloat16)
                return torch.mkldnn_convolution(x.contiguous(memory_format=cl).to(torch.bfloat16), w, b, self.padding,
                                                self.stride, self.dilation, self.groups).float()
            if x.shape[0] < 4 and x.shape[2] * x.shape[3] * x.shape[4] // math.prod(self.stride) >= self.MIN_CELLS:
                return torch.mkldnn_convolution(x.contiguous(memory_format=cl), self._weight_cl(torch.float32)[0], self.bias,
                                                self.padding, self.stride, self.dilation, self.groups)
        return super().forward(x)

    def _weight_cl(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The weight in the channels-last 3-D layout and the bias, in ``dtype``, cached until the
        weights change: another tensor (the cache holds the ones it converted, so their storage is
        not reused), or the same one changed in place (its version; a weight made under
        ``torch.inference_mode`` has none and cannot change in place)."""
        w, b = self.weight, self.bias
        version = lambda t: 0 if t is None or t.is_inference() else t._version  # noqa: E731
        caches = self.__dict__.setdefault("_cl_cache", {})
        cached = caches.get(dtype)
        if cached is None or cached[0] is not w or cached[1] is not b or cached[2] != (version(w), version(b)):
            wc = w.detach().to(dtype).contiguous(memory_format=torch.channels_last_3d)
            cached = (w, b, (version(w), version(b)), wc, None if b is None else b.detach().to(dtype))
            caches[dtype] = cached
        return cached[3], cached[4]


class _ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(gelu(norm(conv(gelu(norm(x))))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.n1, self.c1 = _norm(ch), _Conv3d(ch, ch, 3, padding=1)
        self.n2, self.c2 = _norm(ch), _Conv3d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(Fn.gelu(self.n1(x)))
        return x + self.c2(Fn.gelu(self.n2(h)))


@dataclass
class Detections:
    """Decoded detections, strongest first: ``phi, theta, r`` ``[B, n]`` (rad, m), ``score``
    (heat logit), ``log_power`` ``[B, n]``; and the dense head outputs for the loss."""

    phi: Tensor
    theta: Tensor
    r: Tensor
    score: Tensor
    log_power: Tensor
    heat: Tensor
    """``[B, Q]`` heat logits (flat cell order, phi slowest)."""
    offset: Tensor
    """``[B, Q, 3]`` offsets in cell units of (u, v, rho)."""
    cell_log_power: Tensor
    """``[B, Q]``."""
    grid_shape: tuple[int, int, int]
    """(n_phi, n_theta, n_rho) of the grid the cells index."""
    scenario: Scenario | None = None
    """The scenario whose grid and prior box the cells index (for decoding more of them)."""


class SpectrumNet(nn.Module):
    """3-D U-Net detector on matched-filter spectra; see the module docstring."""

    def __init__(self, scenario: Scenario, cfg: ModelConfig):
        super().__init__()
        self.scenario, self.cfg = scenario, cfg
        self.k_max, self.n = scenario.k_max, scenario.n_elements
        self.shape = (cfg.grid_phi, cfg.grid_theta, cfg.grid_rho)
        for name, s in zip(("grid_phi", "grid_theta", "grid_rho"), self.shape):
            if s % 4:
                raise ValueError(f"ModelConfig.{name} = {s}: the spectrum network needs a multiple of 4 (two stride-2 levels)")
        w = cfg.width
        L = scenario.snapshots
        self.n_spectra = max(1, cfg.pursuit)  # S_0 .. S_{pursuit - 1}
        self.n_snapshot = cfg.snapshot_quantiles if cfg.snapshot_quantiles > 0 else (L if cfg.snapshot_channels else 0)
        self.c_in = 2 * self.n_spectra + self.n_snapshot + 2 + 3 + (2 * self.n_spectra if cfg.coherent else 0)
        n_scene = 2 + cfg.pursuit  # SNR features + log residual fractions after 1..pursuit picks
        self.stem = _Conv3d(self.c_in, w, 3, padding=1)
        self.enc0 = _ResBlock(w)
        self.down1 = _Conv3d(w, 2 * w, 3, stride=2, padding=1)
        self.enc1 = _ResBlock(2 * w)
        self.down2 = _Conv3d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([_ResBlock(4 * w) for _ in range(max(1, cfg.depth))])
        self.context = nn.Sequential(nn.Linear(4 * w + n_scene, 4 * w), nn.GELU(), nn.Linear(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.merge1 = _Conv3d(4 * w, 2 * w, 3, padding=1)
        self.dec1 = _ResBlock(2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.merge0 = _Conv3d(2 * w, w, 3, padding=1)
        self.dec0 = _ResBlock(w)
        self.out_norm = _norm(w)
        self.head = nn.Conv3d(w, 5, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[0] = -6.0  # heat prior ~ K / Q
        self.channels_last = cfg.channels_last
        self.n_top = 2 * self.k_max
        n_k = 8 * w + self.n_top + n_scene
        self.k_head = nn.Sequential(nn.LayerNorm(n_k), nn.Linear(n_k, cfg.k_hidden), nn.GELU(), nn.Linear(cfg.k_hidden, cfg.k_hidden), nn.GELU(),
                                    nn.Linear(cfg.k_hidden, self.k_max))

    def grid(self, device, scenario: Scenario | None = None) -> SpectrumGrid:
        return spectrum_grid(scenario or self.scenario, self.shape, device=device)

    def scenario_of(self, inputs) -> Scenario:
        """The scenario the network reads ``inputs`` with: ``inputs.scenario`` where given, else its
        own. A network tied to its geometry (``ModelConfig.geometry_free`` false) refuses scenes
        of another N or L."""
        sc = getattr(inputs, "scenario", None)
        if sc is None or sc is self.scenario:
            return self.scenario
        if not self.cfg.geometry_free and (sc.n_elements, sc.snapshots) != (self.scenario.n_elements, self.scenario.snapshots):
            raise ValueError(f"spectrum network: built for N = {self.scenario.n_elements}, L = {self.scenario.snapshots}; "
                             f"the scenes have N = {sc.n_elements}, L = {sc.snapshots} (a network for every geometry: "
                             f"ModelConfig.snapshot_quantiles > 0)")
        return sc

    def features(self, inputs, grid: SpectrumGrid) -> tuple[Tensor, Tensor, MeasuredDictionary | None]:
        """Network input ``[B, C, n_phi, n_theta, n_rho]``, the scene features ``[B, 2 + pursuit]``
        (SNR/10 dB, label known, log residual power fractions after 1..pursuit picks) and, where
        ``inputs.keep_dictionary``, the front end's measured dictionary (else None)."""
        if inputs.y is None:
            raise ValueError("SpectrumNet: ModelInputs.y/H/codes are missing (build the inputs with risloc.nn.inputs.prepare_inputs)")
        B, M = len(inputs), inputs.y.shape[-1]
        with torch.autocast(inputs.y.device.type, enabled=False):
            sp = matched_filter_spectra(inputs.y, inputs.H, inputs.codes, grid, picks=self.cfg.pursuit, cancel=inputs.cancel,
                                        coherent=self.cfg.coherent, keep_dictionary=getattr(inputs, "keep_dictionary", False))
        snr = torch.stack([inputs.snr_db.float() / 10.0, inputs.snr_known.float()], -1)  # [B, 2]
        MS = M * sp.S[:, : self.n_spectra]
        parts = [MS, torch.log(MS.clamp(min=1e-6))]
        if self.cfg.snapshot_quantiles > 0:
            parts.append(snapshot_quantiles(M * sp.c, self.cfg.snapshot_quantiles))
        elif self.cfg.snapshot_channels:
            parts.append(M * sp.c)
        x = torch.cat(parts, 1).view(B, -1, *self.shape)
        x = torch.cat([x, snr.view(B, 2, 1, 1, 1).expand(B, 2, *self.shape), grid.coords.unsqueeze(0).expand(B, -1, -1, -1, -1)], 1)
        if self.cfg.coherent:  # last, so that a network without them widens its stem by zero weights (fine-tuning)
            LMC = inputs.y.shape[1] * M * sp.C[:, : self.n_spectra]  # L M C: 1 for noise alone
            x = torch.cat([x, torch.cat([LMC, torch.log(LMC.clamp(min=1e-6))], 1).view(B, -1, *self.shape)], 1)
        scene = torch.cat([snr, torch.log(sp.residual[:, 1:].clamp(min=1e-6))], -1)
        return x, scene, sp.dictionary

    def forward(self, inputs, options):
        scenario = self.scenario_of(inputs)
        grid = self.grid(inputs.y.device if inputs.y is not None else None, scenario)
        x, scene, measured = self.features(inputs, grid)
        if self.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        B = x.shape[0]
        h0 = self.enc0(self.stem(x))
        h1 = self.enc1(self.down1(Fn.gelu(h0)))
        h2 = self.down2(Fn.gelu(h1))
        for blk in self.mid:
            h2 = blk(h2)
        g = torch.cat([h2.mean((2, 3, 4)), scene.to(h2.dtype)], -1)
        h2 = h2 + self.context(g).view(B, -1, 1, 1, 1)
        u1 = self.dec1(self.merge1(torch.cat([self.up2(h2), h1], 1)))
        u0 = self.dec0(self.merge0(torch.cat([self.up1(u1), h0], 1)))
        out = self.head(Fn.gelu(self.out_norm(u0))).float().flatten(2)  # [B, 5, Q]
        heat, offset, cell_logp = out[:, 0], out[:, 1:4].transpose(1, 2), out[:, 4]

        peaks = _local_max_scores(heat.detach(), self.shape)  # once, for the decoder and the K head
        det = decode(heat, offset, cell_logp, grid, scenario, self.k_max, peaks=peaks)
        top = torch.topk(peaks, self.n_top, dim=1).values
        top = torch.where(torch.isfinite(top), top, torch.full_like(top, -20.0))  # fewer maxima: pad
        pooled = torch.cat([h2.float().mean((2, 3, 4)), h2.float().amax((2, 3, 4))], -1)
        logits = self.k_head(torch.cat([pooled, top, scene], -1)).float()

        F = detection_factor(det, scenario)
        R = effective(F, inputs, options)
        return Prediction(F, R, logits, detections=det, kind="spectrum", dictionary=measured)


# ----------------------------------------------------------------------------------------------
# decoding and the factor
# ----------------------------------------------------------------------------------------------
def snapshot_quantiles(c: Tensor, n: int) -> Tensor:
    """``n`` quantiles over the snapshots of ``c`` ``[B, L, Q]`` -> ``[B, n, Q]``: the values of every
    cell sorted over l and linearly interpolated at the positions (L - 1) j / (n - 1), j = 0..n-1
    (the sorted values themselves when n = L; the median for n = 1)."""
    L = c.shape[1]
    s = c.sort(dim=1).values
    if n == 1:
        pos = torch.full((1,), 0.5 * (L - 1), device=c.device)
    else:
        pos = torch.linspace(0.0, float(L - 1), n, device=c.device)
    lo = pos.floor().long().clamp(max=L - 1)
    hi = (lo + 1).clamp(max=L - 1)
    w = (pos - lo.to(pos.dtype)).to(c.dtype).view(1, n, 1)
    return torch.lerp(s[:, lo], s[:, hi], w)


def _local_max_scores(heat: Tensor, shape) -> Tensor:
    """``heat`` ``[B, Q]`` where the cell is a 3x3x3 local maximum, -inf elsewhere."""
    B = heat.shape[0]
    v = heat.view(B, 1, *shape)
    pooled = Fn.max_pool3d(v, 3, stride=1, padding=1)
    return torch.where(v >= pooled, v, torch.full_like(v, -math.inf)).view(B, -1)


def cell_positions(offset: Tensor, index: Tensor, grid: SpectrumGrid, scenario: Scenario) -> tuple[Tensor, Tensor, Tensor]:
    """``phi, theta, r`` of cells ``index`` moved by ``offset`` ``[..., 3]`` (cell units), clamped into the prior box."""
    x = grid.positions(index) + offset.float()
    uvr = grid.lo + x * grid.step
    sc = scenario
    u = uvr[..., 0].clamp(math.sin(sc.phi_min), math.sin(sc.phi_max))
    v = uvr[..., 1].clamp(math.sin(sc.theta_min), math.sin(sc.theta_max))
    rho = uvr[..., 2].clamp(1.0 / sc.r_max, 1.0 / sc.r_min)
    return torch.asin(u), torch.asin(v), 1.0 / rho


def decode(heat: Tensor, offset: Tensor, cell_logp: Tensor, grid: SpectrumGrid, scenario: Scenario, n: int,
           *, peaks: Tensor | None = None) -> Detections:
    """The ``n`` strongest local maxima of ``heat``, strongest first (fewer maxima than ``n``:
    the remaining slots take the strongest other cells). ``peaks``: ``_local_max_scores(heat)``
    when the caller already has it."""
    shape = grid.shape
    with torch.no_grad():
        s = _local_max_scores(heat.detach(), shape) if peaks is None else peaks
        s = torch.where(torch.isfinite(s), s + 1e4, heat.detach().float())  # local maxima first
        idx = torch.topk(s, n, dim=1).indices  # [B, n]
    off = torch.gather(offset, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    phi, theta, r = cell_positions(off, idx, grid, scenario)
    score = torch.gather(heat, 1, idx)
    logp = torch.gather(cell_logp, 1, idx)
    return Detections(phi, theta, r, score, logp, heat, offset, cell_logp, tuple(shape), scenario)


def detection_factor(det: Detections, scenario: Scenario, K: Tensor | None = None) -> Tensor:
    """F ``[B, N, n]``: column k = sqrt(p_k s_k) a(phi_k, theta_k, r_k) with s_k = sigmoid(score_k);
    with ``K`` ``[B]`` the columns k >= K[b] are zero and s_k = 1 (a hard decision)."""
    a = physics.steering(det.phi.float(), det.theta.float(), det.r.float(), scenario, dtype=torch.complex64)  # [B, n, N]
    p = torch.exp(det.log_power.float().clamp(-20, 5))
    if K is None:
        w = p * torch.sigmoid(det.score.float())
    else:
        keep = torch.arange(det.phi.shape[1], device=p.device).view(1, -1) < K.view(-1, 1).to(p.device)
        w = p * keep
    return (a * w.sqrt().unsqueeze(-1).to(a.dtype)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
def _true_cells(truth: Truth, grid: SpectrumGrid, device) -> tuple[Tensor, Tensor]:
    """Continuous cell coordinates ``[B, K, 3]`` of the true sources and their mask ``[B, K]``."""
    K = truth.phi.shape[1]
    active = torch.arange(K, device=device).view(1, -1) < truth.K.to(device).view(-1, 1)
    phi = torch.nan_to_num(truth.phi.to(device).float())
    theta = torch.nan_to_num(truth.theta.to(device).float())
    r = torch.nan_to_num(truth.r.to(device).float(), nan=1.0)
    uvr = torch.stack([torch.sin(phi), torch.sin(theta), 1.0 / r.clamp(min=1e-3)], -1)
    return (uvr - grid.lo) / grid.step, active


def detection_loss(det: Detections, truth: Truth, scenario: Scenario, grid: SpectrumGrid, *, sigma: float = 1.0,
                   offset_weight: float = 1.0, power_weight: float = 0.1, radius: float = 1.5) -> Tensor:
    """Per-scene detection loss ``[B]`` (module docstring).

    * heat: focal loss (alpha = 2, beta = 4) against t_c = max_k exp(-|c - x_k|^2 / (2 sigma^2)),
      positives the nearest cells of the sources, normalised by K;
    * position: Huber (delta = 1) of the hit-unit errors of every cell within ``radius`` cells of a
      source (assigned to its nearest source), weighted by t_c;
    * power: |log p_hat - log(p_k / sum p)| on the same cells.
    """
    device = det.heat.device
    B, Q = det.heat.shape
    x, active = _true_cells(truth, grid, device)  # [B, K, 3]
    cells = grid.positions(torch.arange(Q, device=device))  # [Q, 3]
    d2 = (cells.view(1, Q, 1, 3) - x.view(B, 1, -1, 3)).square().sum(-1)  # [B, Q, K]
    d2 = torch.where(active.unsqueeze(1), d2, torch.full_like(d2, math.inf))
    d2min, nearest = d2.min(-1)  # [B, Q]
    target = torch.exp(-d2min / (2 * sigma * sigma))
    n_src = active.sum(1).clamp(min=1).float()
    # positives: the nearest cell of each source
    shape = torch.tensor(grid.shape, device=device)
    ijk = torch.round(x).clamp(min=torch.zeros_like(shape), max=shape - 1).long()
    pos_idx = (ijk[..., 0] * grid.shape[1] + ijk[..., 1]) * grid.shape[2] + ijk[..., 2]  # [B, K]
    pos = torch.zeros(B, Q, device=device)
    pos.scatter_(1, torch.where(active, pos_idx, torch.zeros_like(pos_idx)), active.float())
    logit = det.heat.float()
    p = torch.sigmoid(logit)
    log_p, log_1mp = Fn.logsigmoid(logit), Fn.logsigmoid(-logit)
    pos_loss = -((1 - p) ** 2) * log_p * pos
    neg_loss = -((1 - target) ** 4) * p.square() * log_1mp * (1 - pos)
    heat_loss = (pos_loss + neg_loss).sum(1) / n_src

    # positions of every cell near a source
    w = torch.where(d2min <= radius * radius, target, torch.zeros_like(target))  # [B, Q]
    phi, theta, r = cell_positions(det.offset, torch.arange(Q, device=device).expand(B, Q), grid, scenario)
    t_phi = torch.gather(torch.nan_to_num(truth.phi.to(device).float()), 1, nearest)
    t_theta = torch.gather(torch.nan_to_num(truth.theta.to(device).float()), 1, nearest)
    t_r = torch.gather(torch.nan_to_num(truth.r.to(device).float(), nan=1.0), 1, nearest)
    err = torch.stack([(phi - t_phi) / HIT_PHI, (theta - t_theta) / HIT_THETA, (r - t_r) / (HIT_RANGE * t_r)], -1)
    pos_err = Fn.huber_loss(err, torch.zeros_like(err), reduction="none", delta=1.0).sum(-1)
    wsum = w.sum(1).clamp(min=1e-6)
    loc_loss = (pos_err * w).sum(1) / wsum

    powers = torch.nan_to_num(truth.power.to(device).float()) * active
    rel = torch.log((powers / powers.sum(1, keepdim=True).clamp(min=1e-30)).clamp(min=1e-12))
    t_logp = torch.gather(rel, 1, nearest)
    pow_loss = ((det.cell_log_power.float() - t_logp).abs() * w).sum(1) / wsum
    return heat_loss + offset_weight * loc_loss + power_weight * pow_loss


# ----------------------------------------------------------------------------------------------
# the kind
# ----------------------------------------------------------------------------------------------
class SpectrumKind(NetworkKind):
    """``spectrum``: the detector above; main term 'detect' (:func:`detection_loss`; the
    covariance terms 'cov' and 'music' also apply to its factor); located by local MUSIC from
    its K strongest detections."""

    name = "spectrum"
    mains = ("detect", "cov", "music")

    def build(self, scenario: Scenario, cfg: ModelConfig) -> nn.Module:
        return SpectrumNet(scenario, cfg)

    def main_loss(self, main, pred, inputs, options, truth, true_factor, loss_cfg, scenario):
        if main != "detect":
            return super().main_loss(main, pred, inputs, options, truth, true_factor, loss_cfg, scenario)
        det = pred.detections
        grid = spectrum_grid(scenario, det.grid_shape, device=pred.factor.device)
        return detection_loss(det, truth, scenario, grid, sigma=loss_cfg.detect_sigma,
                              offset_weight=loss_cfg.detect_offset_weight, power_weight=loss_cfg.detect_power_weight)

    def to_estimates(self, pred: Prediction, inputs: ModelInputs, options: cv.CovarianceOptions, scenario: Scenario,
                     K: Tensor, music_options: dict | None = None) -> Estimates:
        """The K strongest detections' effective covariance (hard decision, :func:`detection_factor`)
        -> MUSIC refined locally from the detections (``search = "local"`` unless ``music_options`` says otherwise)."""
        from ...estimators.music import music_from_covariance

        det = pred.detections
        opts = dict(music_options or {})
        R = effective(detection_factor(det, scenario, K).detach(), inputs, options)
        if opts.setdefault("search", "local") == "local":
            opts["init"] = (det.phi.detach(), det.theta.detach(), det.r.detach())
        return music_from_covariance(R, scenario, K=K, **opts)

    def candidates(self, pred: Prediction, n: int | None = None) -> Estimates:
        """The decoded detections (K = K_max of them, or the ``n`` strongest local maxima of the
        heat map, :func:`decode`), strongest heat first."""
        d = pred.detections
        if n is not None and n != d.phi.shape[1]:
            grid = spectrum_grid(d.scenario, d.grid_shape, device=d.heat.device)
            d = decode(d.heat.detach(), d.offset.detach(), d.cell_log_power.detach(), grid, d.scenario, int(n))
        full = torch.full((d.phi.shape[0],), d.phi.shape[1], dtype=torch.int64, device=d.phi.device)
        return Estimates(full, d.phi.float().detach(), d.theta.float().detach(), d.r.float().detach(), method="candidates")


register_network(SpectrumKind())
