"""Network kinds of the learned pipeline, by name: ``get_network("spectrum").build(scenario, cfg)``.

A kind (``ModelConfig.kind``) is one module of this package that registers a
:class:`NetworkKind` under its name. The kind supplies everything the trainer, the loss and
inference need to know about its network, so that none of them branches on the kind:

* :meth:`NetworkKind.build`: the ``nn.Module`` mapping ``(ModelInputs, CovarianceOptions) ->
  Prediction`` (:mod:`risloc.nn.inputs`);
* :meth:`NetworkKind.main_loss`: the per-scene main term of the objective; ``mains`` lists the
  ``LossConfig.main`` values the kind supports (the first is its own);
* :meth:`NetworkKind.to_estimates`: a prediction and a K per scene -> :class:`~risloc.scenes.Estimates`
  (exactly that K per scene);
* :meth:`NetworkKind.candidates`: the kind's ranked position candidates, if it has any;
* :meth:`NetworkKind.parameter_groups`: the AdamW parameter groups.

Registered kinds: ``spectrum`` (the shipped default, :mod:`.spectrum`), ``covariance``
(:mod:`.covariance`) and ``subspacenet`` (:mod:`.subspacenet`). A new kind is a new module here
plus one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from torch import Tensor, nn

from ... import covariance as cv
from ...scenario import Scenario
from ...scenes import Estimates, Truth
from ..config import ModelConfig
from ..inputs import ModelInputs, Prediction
from ..loss import covariance_main_loss, music_main_loss

# name -> module that registers it (imported on first use)
_MODULES = {
    "spectrum": "risloc.nn.networks.spectrum",
    "covariance": "risloc.nn.networks.covariance",
    "subspacenet": "risloc.nn.networks.subspacenet",
}
_KINDS: dict[str, "NetworkKind"] = {}


class NetworkKind:
    """The contract of a network kind; the defaults suit networks that predict a covariance
    factor and are located by MUSIC on its effective covariance (``covariance``, ``subspacenet``)."""

    name: str = ""
    mains: tuple[str, ...] = ("cov", "music")
    """``LossConfig.main`` values this kind supports (the first is its own)."""
    no_decay_prefixes: tuple[str, ...] = ()
    """Parameter-name prefixes kept out of weight decay besides biases and norms (1-D parameters)."""

    def build(self, scenario: Scenario, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def main_loss(self, main: str, pred: Prediction, inputs: ModelInputs, options: cv.CovarianceOptions, truth: Truth,
                  true_factor: Tensor, loss_cfg, scenario: Scenario) -> Tensor:
        """The main term ``main`` per scene ``[B]``: 'cov' (covariance NMSE against the true R) or
        'music' (the MUSIC null spectrum at the true positions), :mod:`risloc.nn.loss`."""
        if main == "cov":
            return covariance_main_loss(pred, inputs, options, true_factor)
        if main == "music":
            return music_main_loss(pred, truth, scenario, loss_cfg)
        raise ValueError(f"LossConfig.main = {main!r}: the {self.name!r} network supports {', '.join(map(repr, self.mains))}")

    def to_estimates(self, pred: Prediction, inputs: ModelInputs, options: cv.CovarianceOptions, scenario: Scenario,
                     K: Tensor, music_options: dict | None = None) -> Estimates:
        """MUSIC with K sources per scene on the prediction's effective covariance (detached)."""
        from ...estimators.music import music_from_covariance

        R = cv.LowRankCovariance(pred.covariance.factor.detach(), pred.covariance.diag.detach())
        return music_from_covariance(R, scenario, K=K, **dict(music_options or {}))

    def candidates(self, pred: Prediction, n: int | None = None) -> Estimates | None:
        """Ranked position candidates of the prediction (strongest first; ``n`` of them, default
        the kind's own number), ``None`` if the kind has none."""
        return None

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Three AdamW groups: weights (decayed), biases/norms/``no_decay_prefixes`` (not decayed),
        the K head (``model.k_head``, decayed, role 'k'); the first two have role 'backbone'."""
        k_ids = {id(p) for p in model.k_head.parameters()}
        decay, no_decay, k_head = [], [], []
        for name, p in model.named_parameters():
            if id(p) in k_ids:
                k_head.append(p)
            elif p.dim() >= 2 and not name.startswith(self.no_decay_prefixes):
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "role": "backbone"},
            {"params": no_decay, "weight_decay": 0.0, "role": "backbone"},
            {"params": k_head, "weight_decay": weight_decay, "role": "k"},
        ]


def register_network(kind: NetworkKind) -> NetworkKind:
    """Make ``kind`` available as ``get_network(kind.name)``."""
    _KINDS[kind.name] = kind
    return kind


def get_network(name: str) -> NetworkKind:
    """The kind registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _KINDS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _KINDS:
        raise ValueError(f"unknown network kind {name!r}; available: {available()}")
    return _KINDS[name]


def available() -> list[str]:
    """Names of the network kinds."""
    return sorted(set(_MODULES) | set(_KINDS))


def build_model(scenario: Scenario, cfg: ModelConfig) -> nn.Module:
    """The network of ``cfg.kind`` (see :func:`get_network`)."""
    return get_network(cfg.kind).build(scenario, cfg)
