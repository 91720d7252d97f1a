"""The ``covariance`` network kind (the first design): scene -> covariance factor F and K logits.

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

The effective covariance is built by :func:`risloc.nn.inputs.effective` = :func:`risloc.covariance.effective_covariance`
with the scene's sample covariance and SNR; the loss, validation and inference all call it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import covariance as cv
from ...scenario import Scenario
from ..config import ModelConfig
from ..inputs import ModelInputs, Prediction, effective, principal_factor, real_parts, spectrum_features
from . import NetworkKind, register_network


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


class RisCovarianceNet(nn.Module):
    """Transformer over the RIS elements; see the module docstring."""

    capturable = False
    """Not replayed as a CUDA graph (:func:`risloc.cuda_graphs.graphable`): the forward pass takes
    eigenvectors (``torch.linalg.eigh``), which wait for the device on CUDA."""

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

    def forward(self, inputs: ModelInputs, options: cv.CovarianceOptions) -> Prediction:
        sample = cv.normalise_trace(inputs.sample)
        B, N, K = len(inputs), self.n, self.k_max
        p, th, tv = self.p, self.t_h, self.t_v
        with torch.no_grad():
            F0 = principal_factor(inputs.sample, K)  # [B, N, K]
            snr_feat = torch.stack([inputs.snr_db / 10.0, inputs.snr_known], -1).to(F0.real.dtype)  # [B, 2]
            elem = torch.cat([real_parts(F0), snr_feat.unsqueeze(1).expand(B, N, 2)], -1)  # [B, N, 2K+2]
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
        k_in = torch.cat([h.mean(1).float(), snr_feat, spectrum_features(R, inputs, options, self.n_spec, self.n_spec_sample)], -1)
        logits = self.k_head(k_in).float()
        return Prediction(F, R, logits, kind="covariance")


def _complex_to_real_hook(state_dict, prefix, *args) -> None:
    """Accept checkpoints that stored ``embed_rows`` as a complex tensor."""
    key = prefix + "embed_rows"
    if key in state_dict and state_dict[key].is_complex():
        state_dict[key] = torch.view_as_real(state_dict[key])


class CovarianceKind(NetworkKind):
    """``covariance``: the transformer above; main term 'cov' (or 'music'), located by MUSIC on E(F)."""

    name = "covariance"
    mains = ("cov", "music")
    no_decay_prefixes = ("pos_", "embed_rows")

    def build(self, scenario: Scenario, cfg: ModelConfig) -> nn.Module:
        return RisCovarianceNet(scenario, cfg)


register_network(CovarianceKind())
