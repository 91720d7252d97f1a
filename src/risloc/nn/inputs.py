"""What every network of the learned pipeline shares: its inputs, its output and THE effective covariance.

A network kind (:mod:`risloc.nn.networks`) maps ``(ModelInputs, CovarianceOptions) -> Prediction``;
the loss, validation and inference see a prediction only through :class:`Prediction` and
:func:`effective`. This module imports no network.

* :class:`ModelInputs` / :func:`prepare_inputs`: the scenes' sample covariance R_s (rank-L
  factor of the back-projected snapshots, :func:`risloc.covariance.sample_covariance`), the SNR
  used (label, or the data-only estimate where the label is missing) and the raw snapshots;
* :func:`effective` = :func:`risloc.covariance.effective_covariance` with the scene's R_s and SNR;
* :class:`Prediction`: the covariance factor F, its effective covariance E(F), the K logits,
  the name of the kind that made it and the kind's own extra outputs;
* small feature helpers shared by the covariance-based kinds (:func:`principal_factor`,
  :func:`real_parts`, :func:`log_spectrum`, :func:`spectrum_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import covariance as cv
from ..scenario import Scenario


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
    cancel: Tensor | None = None
    """Steering vectors ``[B, J, N]`` of sources already found, which a ``spectrum`` network's front
    end cancels before its own picks (the second look of ``learned``; zero rows: none); None on the first look."""
    scenario: Scenario | None = None
    """The scenes' scenario (geometry, physics, prior box), which a ``spectrum`` network uses for its
    dictionary, decoding and factor; None: the network's own (the scenario it was built for)."""
    keep_dictionary: bool = False
    """Inference: a ``spectrum`` network returns its front end's measured dictionary (atom norms
    and products with y, :class:`risloc.grids.MeasuredDictionary`) in :attr:`Prediction.dictionary`,
    for ``learned``'s likelihood stage."""

    def __len__(self) -> int:
        return self.snr_db.shape[0]


def prepare_inputs(y: Tensor, H: Tensor, codes: Tensor, snr_db: Tensor | None, *, regularisation: float,
                   scenario: Scenario | None = None) -> ModelInputs:
    """Sample covariance and SNR of a batch. A missing label (``None`` or NaN entries) is
    replaced by :func:`risloc.covariance.estimate_snr_db` and flagged as unknown. ``scenario``:
    the scenes' scenario (:attr:`ModelInputs.scenario`; None: the network's own)."""
    sample = cv.sample_covariance(y, H, codes, regularisation=regularisation)
    rd = sample.diag.dtype
    if snr_db is None:
        known = torch.zeros(y.shape[0], dtype=rd, device=y.device)
    else:
        snr_db = snr_db.to(device=y.device, dtype=rd)
        known = torch.isfinite(snr_db).to(rd)
    snr = cv.labelled_snr_db(snr_db, y, H, codes, regularisation=regularisation).to(rd)
    return ModelInputs(sample, snr, known, y, H, codes, scenario=scenario)


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


def real_parts(z: Tensor) -> Tensor:
    """Complex ``[..., m]`` -> real ``[..., 2m]`` (real parts, then imaginary parts)."""
    return torch.cat([z.real, z.imag], -1)


def log_spectrum(R: cv.LowRankCovariance, n_values: int) -> Tensor:
    """``log(lambda_i / mean lambda)`` of the ``n_values`` largest eigenvalues (Gram eigenproblem)."""
    lam = R.eigenvalues(n_values).to(torch.float32)
    mean = (R.trace() / R.n).to(torch.float32).unsqueeze(-1)
    return torch.log(lam.clamp(min=1e-9) / mean.clamp(min=1e-9))


def spectrum_features(R: cv.LowRankCovariance, inputs: "ModelInputs", options: cv.CovarianceOptions, n_values: int,
                      n_sample: int) -> Tensor:
    """K-head features of a covariance prediction (no gradient): :func:`log_spectrum` of its
    effective covariance ``R`` (``n_values`` eigenvalues) and of the sample-only effective
    covariance ``effective(None, inputs, options)`` (``n_sample``), concatenated ``[B, n_values + n_sample]``."""
    with torch.no_grad():
        return torch.cat([log_spectrum(R, n_values), log_spectrum(effective(None, inputs, options), n_sample)], -1)


@dataclass
class Prediction:
    factor: Tensor
    """Predicted covariance factor F ``[B, N, K_max]`` (complex64), R_pred = F F^H."""
    covariance: cv.LowRankCovariance
    """Its effective covariance ``effective(F, inputs, options)`` (differentiable)."""
    k_logits: Tensor
    """``[B, K_max]`` logits of K = 1..K_max (untempered)."""
    detections: Any = None
    """The kind's own extra outputs (``spectrum``: its :class:`risloc.nn.networks.spectrum.Detections`)."""
    kind: str = "covariance"
    """Name of the network kind (:mod:`risloc.nn.networks`) that made this prediction."""
    dictionary: Any = None
    """A ``spectrum`` network's measured dictionary (:class:`risloc.grids.MeasuredDictionary`) where
    the inputs asked for it (:attr:`ModelInputs.keep_dictionary`), else None."""


def forward(model, inputs: ModelInputs, options: cv.CovarianceOptions, autocast: torch.dtype | None) -> Prediction:
    """``model(inputs, options)`` under mixed precision ``autocast`` (None: float32), the one
    forward call of validation and inference (both float32: :data:`risloc.nn.inference.INFERENCE_AUTOCAST`)."""
    device_type = inputs.y.device.type if inputs.y is not None else "cpu"
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return model(inputs, options)

