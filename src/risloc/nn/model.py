"""The network of the learned pipeline: scene -> covariance factor F and K logits.

Physics-informed input (one network for every channel H and code set). Each snapshot is
back-projected to the RIS domain through G_l = H diag(c_l) (:func:`risloc.covariance.back_project`)
and the sample covariance R_s = (1/L) sum_l x_hat_l x_hat_l^H is formed as its rank-L factor
(:func:`risloc.covariance.sample_covariance`). Everything the network sees is a function of
R_s normalised to trace N (so a global gain on y does not matter) and of the scene's SNR:

* tokens: one per RIS element n = j N_H + i; its features are row n of the trace-normalised
  R_s (2N reals), row n of F0 = the K_max dominant eigenpairs of R_s (F0 = V_K Lambda_K^{1/2},
  from the cheap Gram eigenproblem, each column's phase fixed so its largest entry is real
  positive; 2 K_max reals) and the SNR features (SNR/10 dB and a "label known" flag);
  plus a learned positional embedding of (i, j);
* backbone: a pre-LayerNorm transformer encoder over the N tokens;
* factor head: per token K_max complex numbers dF[n, :]; F = F0 + dF (``residual``; dF starts
  at exactly 0, so an untrained network reproduces the sample covariance's principal
  subspace, i.e. MUSIC) or F = dF;
* K head: an MLP on the mean token, the SNR features and spectral features — the log
  eigenvalues (over their mean) of the SNR-shrunk effective covariance of the prediction and
  of the sample-only effective covariance, each scene with its own SNR, all from the Gram
  eigenproblems (:meth:`LowRankCovariance.eigenvalues`), detached.

The effective covariance is built by :func:`effective` = :func:`risloc.covariance.effective_covariance`
with the scene's sample covariance and SNR; the loss, validation and inference all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import covariance as cv
from ..scenario import Scenario
from .config import ModelConfig


@dataclass
class ModelInputs:
    """What the network and the effective-covariance builder need for a batch of scenes."""

    sample: cv.LowRankCovariance
    """The scenes' sample covariance (rank-L factor, not normalised)."""
    snr_db: Tensor
    """SNR [dB] ``[B]`` used for the network input and the shrinkage (label, or estimate when missing)."""
    snr_known: Tensor
    """``[B]`` float: 1 where ``snr_db`` is the scene's label, 0 where it was estimated from the data."""
    y: Tensor | None = None
    """The snapshots ``[B, L, M]`` (the ``spectrum`` network reads them; the others need only R_s)."""
    H: Tensor | None = None
    """The BS-RIS channels ``[B, M, N]``."""
    codes: Tensor | None = None
    """The RIS codes ``[B, L, N]``."""

    def __len__(self) -> int:
        return self.snr_db.shape[0]


def prepare_inputs(y: Tensor, H: Tensor, codes: Tensor, snr_db: Tensor | None, *, regularisation: float) -> ModelInputs:
    """Sample covariance and SNR of a batch. A missing label (``None`` or NaN entries) is
    replaced by :func:`risloc.covariance.estimate_snr_db` and flagged as unknown."""
    sample = cv.sample_covariance(y, H, codes, regularisation=regularisation)
    rd = sample.diag.dtype
    if snr_db is None:
        known = torch.zeros(y.shape[0], dtype=rd, device=y.device)
        snr = cv.estimate_snr_db(y, H, codes, regularisation=regularisation).to(rd)
    else:
        snr_db = snr_db.to(device=y.device, dtype=rd)
        known = torch.isfinite(snr_db).to(rd)
        snr = snr_db
        if not bool(known.all()):
            snr = torch.where(known > 0, snr_db, cv.estimate_snr_db(y, H, codes, regularisation=regularisation).to(rd))
    return ModelInputs(sample, snr, known, y, H, codes)


def effective(prediction, inputs: ModelInputs, options: cv.CovarianceOptions) -> cv.LowRankCovariance:
    """THE effective covariance of the learned pipeline (loss, validation, inference):
    ``effective_covariance(prediction, sample=R_s, snr_db=SNR, options=options)``."""
    return cv.effective_covariance(prediction, sample=inputs.sample, snr_db=inputs.snr_db, options=options)


def principal_factor(sample: cv.LowRankCovariance, k: int) -> Tensor:
    """``F0 = V_k Lambda_k^{1/2}`` ``[B, N, k]`` of the trace-normalised sample covariance
    (Gram eigenproblem), each column rotated so that its largest-magnitude entry is real positive."""
    S = cv.normalise_trace(sample)
    values, vectors = S.eigh()
    values = (values - S.diag.unsqueeze(-1)).clamp(min=0)
    r = values.shape[-1]
    if r < k:  # fewer snapshots than K_max: pad with zero columns
        vectors = torch.cat([vectors, vectors.new_zeros(*vectors.shape[:-1], k - r)], -1)
        values = torch.cat([values, values.new_zeros(*values.shape[:-1], k - r)], -1)
    V = vectors[..., :k]
    lam = values[..., :k]
    idx = V.abs().argmax(-2, keepdim=True)
    ref = torch.gather(V, -2, idx)
    phase = torch.where(ref.abs() > 0, ref.conj() / ref.abs().clamp(min=1e-30), torch.ones_like(ref))
    return V * phase * lam.sqrt().unsqueeze(-2).to(V.dtype)


def _to_tokens(x: Tensor, p: int, th: int, tv: int) -> Tensor:
    """``[B, N, f]`` in flat element order n = j N_H + i -> ``[B, T, p*p, f]``, token t = b th + a
    holding elements (i, j) = (a p + u, b p + v) at sub-position s = v p + u."""
    B, N, f = x.shape
    x = x.view(B, tv, p, th, p, f)  # j = b p + v, i = a p + u
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, tv * th, p * p, f)


def _from_tokens(x: Tensor, p: int, th: int, tv: int) -> Tensor:
    """Inverse of :func:`_to_tokens`."""
    B, T, _, f = x.shape
    x = x.view(B, tv, th, p, p, f).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, tv * p * th * p, f)


def _real(z: Tensor) -> Tensor:
    """Complex ``[..., m]`` -> real ``[..., 2m]`` (real parts, then imaginary parts)."""
    return torch.cat([z.real, z.imag], -1)


@dataclass
class Prediction:
    factor: Tensor
    """Predicted covariance factor F ``[B, N, K_max]`` (complex64), R_pred = F F^H."""
    covariance: cv.LowRankCovariance
    """Its effective covariance ``effective(F, inputs, options)`` (differentiable)."""
    k_logits: Tensor
    """``[B, K_max]`` logits of K = 1..K_max (untempered)."""
    detections: Any = None
    """``spectrum`` network only: its :class:`risloc.nn.spectrum.Detections` (positions, scores, head outputs)."""


class RisCovarianceNet(nn.Module):
    """Transformer over the RIS elements; see the module docstring."""

    def __init__(self, scenario: Scenario, cfg: ModelConfig):
        super().__init__()
        self.scenario, self.cfg = scenario, cfg
        N, K, d = scenario.n_elements, scenario.k_max, cfg.width
        self.n, self.k_max = N, K
        self.n_spec = K + scenario.snapshots  # eigenvalues of the prediction's effective covariance used
        self.n_spec_sample = min(scenario.snapshots, N)
        p = cfg.patch
        if scenario.n_h % p or scenario.n_v % p:
            raise ValueError(f"ModelConfig.patch = {p}: must divide n_h = {scenario.n_h} and n_v = {scenario.n_v}")
        self.p, self.t_h, self.t_v = p, scenario.n_h // p, scenario.n_v // p
        n_feat = p * p * (2 * K + 2)  # F0 rows and SNR features of the patch's elements
        # row n of R_s enters through a complex N x d map: Re(R_s[n, :] W) = Re(U[n, :] (U^H W))
        # stored as real [p*p, N, d, 2] (fused optimisers and GradScaler want real parameters)
        self.embed_rows = nn.Parameter(torch.view_as_real(torch.randn(p * p, N, d, dtype=torch.complex64) * (0.5 / N**0.5)))
        self._register_load_state_dict_pre_hook(_complex_to_real_hook)
        self.embed = nn.Linear(n_feat, d)
        self.pos_h = nn.Parameter(torch.zeros(self.t_h, d))
        self.pos_v = nn.Parameter(torch.zeros(self.t_v, d))
        nn.init.normal_(self.pos_h, std=0.02)
        nn.init.normal_(self.pos_v, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.mlp_ratio * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.factor_head = nn.Linear(d, p * p * 2 * K)
        if cfg.residual:
            nn.init.zeros_(self.factor_head.weight)
            nn.init.zeros_(self.factor_head.bias)
        n_k_in = d + 2 + self.n_spec + self.n_spec_sample
        self.k_head = nn.Sequential(
            nn.LayerNorm(n_k_in), nn.Linear(n_k_in, cfg.k_hidden), nn.GELU(), nn.Linear(cfg.k_hidden, cfg.k_hidden), nn.GELU(), nn.Linear(cfg.k_hidden, K)
        )

    def k_head_parameters(self):
        return list(self.k_head.parameters())

    def forward(self, inputs: ModelInputs, options: cv.CovarianceOptions) -> Prediction:
        sample = cv.normalise_trace(inputs.sample)
        B, N, K = len(inputs), self.n, self.k_max
        p, th, tv = self.p, self.t_h, self.t_v
        with torch.no_grad():
            F0 = principal_factor(inputs.sample, K)  # [B, N, K]
            snr_feat = torch.stack([inputs.snr_db / 10.0, inputs.snr_known], -1).to(F0.real.dtype)  # [B, 2]
            elem = torch.cat([_real(F0), snr_feat.unsqueeze(1).expand(B, N, 2)], -1)  # [B, N, 2K+2]
        U = sample.factor  # [B, N, L], R_s = U U^H (trace N)
        # token (a, b) holds elements (i, j) = (a p + u, b p + v); sub-position s = v p + u
        W = torch.view_as_complex(self.embed_rows)  # [p*p, N, d]
        UW = torch.einsum("bnl,snd->bsld", U.conj(), W)  # [B, p*p, L, d] = U^H W_s
        Ut = _to_tokens(U, p, th, tv)  # [B, T, p*p, L]
        h_rows = torch.einsum("btsl,bsld->btd", Ut, UW).real
        h = h_rows + self.embed(_to_tokens(elem, p, th, tv).flatten(-2))
        h = h + (self.pos_v.unsqueeze(1) + self.pos_h.unsqueeze(0)).reshape(th * tv, -1)
        h = self.norm(self.encoder(h))  # [B, T, d]
        out = self.factor_head(h).float().view(B, th * tv, p * p, 2 * K)
        out = _from_tokens(out, p, th, tv)  # [B, N, 2K]
        dF = torch.complex(out[..., :K], out[..., K:])
        F = F0 + dF if self.cfg.residual else dF

        R = effective(F, inputs, options)
        with torch.no_grad():
            spec = _log_spectrum(R, self.n_spec)
            spec_s = _log_spectrum(effective(None, inputs, options), self.n_spec_sample)
        k_in = torch.cat([h.mean(1).float(), snr_feat, spec, spec_s], -1)
        logits = self.k_head(k_in).float()
        return Prediction(F, R, logits)


def _complex_to_real_hook(state_dict, prefix, *args) -> None:
    """Accept checkpoints that stored ``embed_rows`` as a complex tensor."""
    key = prefix + "embed_rows"
    if key in state_dict and state_dict[key].is_complex():
        state_dict[key] = torch.view_as_real(state_dict[key])


def _log_spectrum(R: cv.LowRankCovariance, n_values: int) -> Tensor:
    """``log(lambda_i / mean lambda)`` of the ``n_values`` largest eigenvalues (Gram eigenproblem)."""
    lam = R.eigenvalues(n_values).to(torch.float32)
    mean = (R.trace() / R.n).to(torch.float32).unsqueeze(-1)
    return torch.log(lam.clamp(min=1e-9) / mean.clamp(min=1e-9))


def build_model(scenario: Scenario, cfg: ModelConfig) -> nn.Module:
    """The network of ``cfg.kind``: 'spectrum' (:class:`risloc.nn.spectrum.SpectrumNet`, the
    default), 'covariance' (:class:`RisCovarianceNet`) or 'subspacenet'
    (:class:`risloc.nn.subspacenet.SubspaceNet`, the SubspaceNet-style peer); all map
    ``(inputs, options) -> Prediction``."""
    if cfg.kind == "spectrum":
        from .spectrum import SpectrumNet

        return SpectrumNet(scenario, cfg)
    if cfg.kind == "subspacenet":
        from .subspacenet import SubspaceNet

        return SubspaceNet(scenario, cfg)
    return RisCovarianceNet(scenario, cfg)
