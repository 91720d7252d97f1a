"""Calibration of the K head: temperature scaling and a model-based fall-back below a threshold.

1. Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural
   networks", ICML 2017): one scalar T > 0 minimises the validation negative log-likelihood

       NLL(T) = -mean_s log softmax(z_s / T)[K_s - 1]

   (z the K logits). T changes the confidences, never the arg-max.
2. Fall-back: with confidence c_s = max softmax(z_s / T), scenes with c_s < tau take K-hat from
   a model-based order rule (:func:`risloc.estimators.order.estimate_order` on the eigenvalues of
   the sample-only effective covariance). tau is the candidate (0 or a validation confidence)
   that maximises the validation K accuracy of the combined rule (the smallest on ties).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nll(logits: Tensor, K: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true K (1..K_max) under softmax(logits / T)."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return float(-logp.gather(-1, (K.long() - 1).clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).mean())


def fit_temperature(logits: Tensor, K: Tensor, *, lo: float = 0.05, hi: float = 20.0, iters: int = 60) -> float:
    """The T minimising :func:`nll` (golden-section search on log T; NLL(T) is unimodal in practice)."""
    logits, K = logits.detach().cpu(), K.detach().cpu()
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, K, math.exp(c)), nll(logits, K, math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, K, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, K, math.exp(d))
    return math.exp((a + b) / 2)


def decide_k(logits: Tensor, temperature: float, threshold: float, fallback: Tensor | None) -> tuple[Tensor, Tensor]:
    """K-hat ``[B]`` (arg-max of the calibrated softmax, or ``fallback`` where the confidence is
    below ``threshold``) and the confidence ``[B]``."""
    prob = torch.softmax(logits.float() / temperature, -1)
    conf, idx = prob.max(-1)
    K = idx + 1
    if fallback is not None and threshold > 0:
        K = torch.where(conf < threshold, fallback.to(K.device, K.dtype), K)
    return K, conf


def tune_threshold(logits: Tensor, K: Tensor, temperature: float, fallback: Tensor) -> float:
    """The confidence threshold tau maximising the K accuracy of the combined rule on validation data."""
    logits, K, fallback = logits.detach().cpu(), K.detach().cpu().long(), fallback.detach().cpu().long()
    prob = torch.softmax(logits.float() / temperature, -1)
    conf, idx = prob.max(-1)
    net_ok = (idx + 1) == K
    fb_ok = fallback == K
    order = torch.argsort(conf)
    # threshold just above the i-th smallest confidence: the first i+1 scenes use the fall-back
    gain = torch.cumsum((fb_ok[order].int() - net_ok[order].int()), 0)
    best = int(torch.argmax(gain))
    if gain[best] <= 0:
        return 0.0
    c = conf[order]
    upper = float(c[best + 1]) if best + 1 < len(c) else 1.0
    return 0.5 * (float(c[best]) + upper)
