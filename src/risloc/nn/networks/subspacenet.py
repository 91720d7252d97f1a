"""The ``subspacenet`` network kind, a learned PEER of the ``learned`` estimator: a SubspaceNet-style
surrogate covariance trained end-to-end through MUSIC (estimator ``"subspacenet"``,
:mod:`risloc.nn.subspacenet`; docs/learned-peer.md).

SubspaceNet (D. H. Shmuel, J. P. Merkofer, G. Revach, R. J. G. van Sloun, N. Shlezinger,
"SubspaceNet: Deep learning-aided subspace methods for DoA estimation", IEEE Trans. Veh.
Technol. 74(3), 4962-4976, 2025; arXiv:2306.02271) learns a *surrogate* covariance R~ with a
convolutional autoencoder and trains it only through a differentiable subspace method at the
true source parameters (no ground-truth covariance); the near-field extension (Gast,
Le Magoarou & Shlezinger, 2025) does the same with the 2-D (angle, range) MUSIC spectrum.
Adapted to the RIS measurement model:

* input: SubspaceNet feeds temporal auto-correlation lags of the raw snapshots; here every
  snapshot has its own RIS code, so lags of y mean nothing. The input is the same
  physics-informed one as risloc's network: the trace-normalised sample covariance R_s of the
  back-projected snapshots (:func:`risloc.covariance.sample_covariance`) and the SNR features.
  Element n = j N_H + i becomes pixel (j, i) of a 12 x 12 image whose channels are row n of R_s
  (real, imaginary, magnitude: 3N channels), row n of F0 (below) and the SNR features;
* backbone: a small U-Net-like convolutional encoder-decoder over that element grid
  (1x1 embedding to ``width`` channels, two stride-2 3x3 convolutions down, two transposed
  convolutions up with skip connections, GELU), i.e. SubspaceNet's conv autoencoder run on the
  element grid's row features instead of on the full 144 x 144 matrix (cheap on CPU);
* output: a factor Z ``[B, N, r]`` (r = K_max + ``rank_extra``) per pixel, R~ = Z Z^H.
  With ``residual`` (default) Z = F0 + dZ, F0 the r dominant eigenpairs of R_s and the head
  initialised at 0, so the untrained network is MUSIC on R_s (a deviation from SubspaceNet,
  which starts from scratch: at CPU scale a start from scratch is far worse than MUSIC);
* E(Z) = :func:`risloc.nn.inputs.effective` = :func:`risloc.covariance.effective_covariance`
  (THE builder; the same options as the learned pipeline) is what the loss, the validation and
  MUSIC at inference see;
* loss: ``LossConfig.main = "music"``: :func:`risloc.nn.loss.music_null_loss`, the normalised
  MUSIC null spectrum of E(Z) at the true positions with the true K (SubspaceNet also trains with
  the true K), plus the existing peak-contrast term (:func:`risloc.nn.loss.peak_contrast_loss`);
* K: SubspaceNet assumes K known. Here a small K head (MLP on the pooled bottleneck, the SNR
  features and the log-eigenvalues of E(Z) and of the sample-only effective covariance, as in
  risloc's network) trained with cross-entropy (the ``k`` term) gives K-hat; ``k_rule="mdl"``
  (or 'aic', 'eigengap') uses the model-based order rule on E(Z)'s eigenvalues instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import covariance as cv
from ...scenario import Scenario
from ..config import ModelConfig
from ..inputs import ModelInputs, Prediction, effective, principal_factor, real_parts, spectrum_features
from . import NetworkKind, register_network


class SubspaceNet(nn.Module):
    """Convolutional encoder-decoder over the RIS element grid -> surrogate factor Z, K logits."""

    capturable = False
    """Not replayed as a CUDA graph (:func:`risloc.cuda_graphs.graphable`): the forward pass takes
    eigenvectors (``torch.linalg.eigh``), which wait for the device on CUDA."""

    def __init__(self, scenario: Scenario, cfg: ModelConfig):
        super().__init__()
        self.scenario, self.cfg = scenario, cfg
        N, K = scenario.n_elements, scenario.k_max
        self.n, self.k_max, self.rank = N, K, K + cfg.rank_extra
        self.n_h, self.n_v = scenario.n_h, scenario.n_v
        c = cfg.width
        r = self.rank
        n_in = 3 * N + 2 * r + 2
        act = nn.GELU
        self.embed = nn.Sequential(nn.Conv2d(n_in, c, 1), act(), nn.Conv2d(c, c, 3, padding=1), act())
        self.down1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), act())
        self.down2 = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), act())
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1)
        self.act = act()
        self.head = nn.Conv2d(c, 2 * r, 1)
        if cfg.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.n_spec = r + scenario.snapshots
        self.n_spec_sample = min(scenario.snapshots, N)
        n_k_in = 4 * c + 2 + self.n_spec + self.n_spec_sample
        self.k_head = nn.Sequential(nn.LayerNorm(n_k_in), nn.Linear(n_k_in, cfg.k_hidden), nn.GELU(), nn.Linear(cfg.k_hidden, K))

    def _grid(self, x: Tensor) -> Tensor:
        """``[B, N, f]`` (n = j N_H + i) -> image ``[B, f, N_V, N_H]``."""
        B, _, f = x.shape
        return x.view(B, self.n_v, self.n_h, f).permute(0, 3, 1, 2)

    def forward(self, inputs: ModelInputs, options: cv.CovarianceOptions) -> Prediction:
        B, N, r = len(inputs), self.n, self.rank
        S = cv.normalise_trace(inputs.sample)
        with torch.no_grad():
            F0 = principal_factor(inputs.sample, r)  # [B, N, r]
        snr_feat = torch.stack([inputs.snr_db / 10.0, inputs.snr_known], -1).to(F0.real.dtype)  # [B, 2]
        Rs = S.factor @ S.factor.mH  # [B, N, N] trace N (sample part has no identity term)
        feat = torch.cat([Rs.real, Rs.imag, Rs.abs(), real_parts(F0), snr_feat.unsqueeze(1).expand(B, N, 2)], -1)
        x0 = self.embed(self._grid(feat))  # [B, c, N_V, N_H]
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        u1 = self.act(self.up2(x2, output_size=x1.shape[-2:])) + x1
        u0 = self.act(self.up1(u1, output_size=x0.shape[-2:])) + x0
        out = self.head(u0).float()  # [B, 2r, N_V, N_H]
        out = out.permute(0, 2, 3, 1).reshape(B, N, 2 * r)
        dZ = torch.complex(out[..., :r], out[..., r:])
        Z = F0 + dZ if self.cfg.residual else dZ

        R = effective(Z, inputs, options)
        k_in = torch.cat([x2.mean((-2, -1)).float(), snr_feat, spectrum_features(R, inputs, options, self.n_spec, self.n_spec_sample)], -1)
        return Prediction(Z, R, self.k_head(k_in).float(), kind="subspacenet")


class SubspaceNetKind(NetworkKind):
    """``subspacenet``: the convolutional peer above; main term 'music' (or 'cov'), located by MUSIC on E(Z)."""

    name = "subspacenet"
    mains = ("music", "cov")

    def build(self, scenario: Scenario, cfg: ModelConfig) -> nn.Module:
        return SubspaceNet(scenario, cfg)


register_network(SubspaceNetKind())
