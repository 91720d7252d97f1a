"""The learned estimators ("learned", "learned+ml"): network -> K-hat -> the kind's estimates.

The path, shared verbatim by validation during training and by inference::

    inputs = prepare_inputs(y, H, codes, snr_db)               sample covariance, SNR (estimated if missing)
    pred   = model(inputs, options)                            factor F, effective covariance E(F), K logits
    K-hat  = decide_k(logits, T, tau, order-rule fall-back)    calibrated K head (risloc.nn.calibrate),
                                                               or the K the caller knows
    est    = kind.to_estimates(pred, inputs, options, K-hat)   risloc.nn.networks (e.g. MUSIC on E(F))

``options`` are the checkpoint's CovarianceOptions (the final hybrid weight beta, loading,
shrinkage), i.e. the same arguments as the training loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import covariance as cv
from ..cuda_graphs import cache_entry, graphable, graphed
from ..estimators import register
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from .calibrate import decide_k
from .checkpoint import PACKAGED_MODELS, file_sha256, load_checkpoint, named_checkpoint, network_weights
from .config import TrainConfig
from .inputs import ModelInputs, Prediction, effective, forward, prepare_inputs
from .networks import NetworkKind, build_model, get_network
from .networks.spectrum import set_cpu_conv_precision

BASE_WEIGHTS = PACKAGED_MODELS / "default.pt"
"""The packaged base network (the ``spectrum`` network trained on default-scenario scenes,
docs/learned.md; ``risloc train --config configs/default.toml --stop-after-epoch 6`` reproduces it;
``checkpoint="default"``)."""

DEFAULT_WEIGHTS = PACKAGED_MODELS / "mixed.pt"
"""The packaged default model of ``learned`` and ``learned+ml``: the ``mixed`` network, i.e. the base
network (:data:`BASE_WEIGHTS`) fine-tuned on stochastic and static signals, random and ``dft`` codes
and impaired scenes (``risloc train --config configs/mixed.toml`` reproduces it from the base
network; ``checkpoint="mixed"``). Chosen on the validation seed 1000 (one H100,
benchmarks/results/h100/validation-dft-mixed-e0d1e64/): ``learned`` success at 10-20 dB / over
-5...20 dB, K_acc at 10-20 dB, with the base network and with this one: default scenes 0.705 /
0.425 / 0.984 and 0.704 / 0.425 / 0.981; static signals 0.782 / 0.502 / 0.947 and 0.787 / 0.505 /
0.952; ``dft`` codes 0.734 / 0.436 / 0.975 and 0.739 / 0.439 / 0.982 (on 400 CPU validation scenes
per seed, benchmarks/results/cpu/mixed-default-val/: -1 and -1 scenes, -1 and -2, +3 and +4)."""


@dataclass
class Calibration:
    """Temperature of the K logits, confidence threshold of the fall-back and its order rule."""

    temperature: float = 1.0
    threshold: float = 0.0
    order_rule: str = "mdl"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: TrainConfig
    options: cv.CovarianceOptions
    calibration: Calibration
    sha256: str
    state: dict = field(repr=False, default_factory=dict)


def load_model(checkpoint: str | Path, *, device=None) -> LoadedModel:
    """Build the network of a checkpoint with its EMA weights (or raw weights without EMA).
    ``checkpoint``: a file, or the bare name of a packaged model (``"mixed"``, ``"default"``:
    :func:`risloc.nn.checkpoint.named_checkpoint`)."""
    checkpoint = named_checkpoint(checkpoint, "checkpoint")
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_toml(state["config"])
    model = build_model(cfg.scenario, cfg.model)
    model.load_state_dict(network_weights(state))
    model.eval()
    if device is not None:
        model.to(device)
    cal = Calibration(**state.get("calibration", {}))
    options = cfg.covariance_options(state.get("beta", cfg.loss.beta))
    return LoadedModel(model, cfg, options, cal, file_sha256(checkpoint), state)


_CACHE: dict = {}


def _cached_model(checkpoint, device) -> LoadedModel:
    """:func:`load_model`, remembered for the last checkpoint file (same path, size, mtime, device):
    the registry calls a learned estimator once per batch of scenes."""
    st = Path(checkpoint).stat()
    key = (str(Path(checkpoint).resolve()), st.st_size, st.st_mtime_ns, str(device))
    return cache_entry(_CACHE, key, lambda: load_model(checkpoint, device=device), limit=0)


def fallback_order(inputs: ModelInputs, options: cv.CovarianceOptions, scenario: Scenario, rule: str) -> torch.Tensor:
    """K from the model-based order rule (risloc.estimators.order, in the dual form that MUSIC
    uses by default) on the eigenvalues of the sample-only effective covariance."""
    from ..estimators.music import order_from_covariance

    return order_from_covariance(effective(None, inputs, options), scenario, rule=rule)


def known_k(method: str, K, scenes: Scenes) -> torch.Tensor | None:
    """``K`` (None, an int or a per-scene ``[S]`` tensor) as an int64 ``[S]`` tensor on the scenes'
    device, validated by :func:`risloc.estimators.known_k` (ValueError naming ``method`` and the scene)."""
    if K is None:
        return None
    from ..estimators import known_k as _known_k

    try:
        return _known_k(K, len(scenes), scenes.scenario.k_max, device=scenes.device).clone()
    except ValueError as exc:
        raise ValueError(f"{method}: {exc}") from None


def complete_to_k(est: Estimates, K: torch.Tensor, candidates: Estimates | None) -> Estimates:
    """``est`` with exactly ``K`` sources per scene: scenes where it found fewer (MUSIC returns
    fewer when fewer distinct peaks exist) take the missing ones from ``candidates`` (ranked,
    strongest first), skipping candidates within one angular hit tolerance
    (:data:`risloc.metrics.ANGLE_TOL`, 2 degrees) of a source already there."""
    K = K.to(est.K.device, torch.int64)
    if candidates is None or bool((est.K >= K).all()):
        return est
    from ..metrics import ANGLE_TOL
    from ..physics import angle_between

    phi, theta, r = est.phi.clone(), est.theta.clone(), est.r.clone()
    have = est.K.to(torch.int64).clone()
    n = phi.shape[1]
    cp, ct, cr = (x.to(phi.device, phi.dtype) for x in (candidates.phi, candidates.theta, candidates.r))
    slots = torch.arange(n, device=phi.device)
    for j in range(cp.shape[1]):  # candidates in rank order (a handful): vectorised over scenes
        filled = slots.view(1, -1) < have.view(-1, 1)
        near = angle_between(phi, theta, cp[:, j : j + 1], ct[:, j : j + 1]) < ANGLE_TOL
        dup = (near & filled).any(1)
        take = (have < K) & ~dup & torch.isfinite(cp[:, j])
        put = (slots.view(1, -1) == have.view(-1, 1)) & take.view(-1, 1)
        phi = torch.where(put, cp[:, j : j + 1], phi)
        theta = torch.where(put, ct[:, j : j + 1], theta)
        r = torch.where(put, cr[:, j : j + 1], r)
        have = have + take.to(have.dtype)
    return Estimates(have.to(est.K.dtype), phi, theta, r, method=est.method)


def count_sources(
    pred: Prediction,
    inputs: ModelInputs,
    options: cv.CovarianceOptions,
    scenario: Scenario,
    calibration: Calibration,
    *,
    K: torch.Tensor | None = None,
    order_rule: str | None = None,
) -> torch.Tensor:
    """K per scene ``[B]`` (int64, in 0..K_max): the given ``K``; else ``order_rule`` ('mdl',
    'aic', 'eigengap') on the prediction's effective covariance; else the calibrated K head with
    its fall-back (:func:`risloc.nn.calibrate.decide_k`). Without a given K, a scene whose
    measurements are all zero has no source: K = 0 there (:func:`risloc.estimators.order.no_energy`
    of its sample covariance's factor, which is linear in y), whatever the network says."""
    if K is not None:
        return K.to(pred.k_logits.device, torch.int64).clamp(min=0, max=scenario.k_max)
    elif order_rule is not None:
        from ..estimators.music import order_from_covariance

        R = cv.LowRankCovariance(pred.covariance.factor.detach(), pred.covariance.diag.detach())
        K_use = order_from_covariance(R, scenario, rule=order_rule)
    else:
        fb = fallback_order(inputs, options, scenario, calibration.order_rule) if calibration.threshold > 0 else None
        K_use, _ = decide_k(pred.k_logits, calibration.temperature, calibration.threshold, fb)
    from ..estimators.order import no_energy

    K_use = K_use.clamp(min=1, max=scenario.k_max)
    return torch.where(no_energy(inputs.sample.factor).to(K_use.device), torch.zeros_like(K_use), K_use)


def k_confidence(pred: Prediction, calibration: Calibration) -> torch.Tensor:
    """The calibrated K head's confidence ``[B]``: max_K softmax(z / T) (:func:`risloc.nn.calibrate.decide_k`)."""
    return decide_k(pred.k_logits, calibration.temperature, 0.0, None)[1]


def locate_from_prediction(
    pred: Prediction,
    inputs: ModelInputs,
    options: cv.CovarianceOptions,
    scenario: Scenario,
    calibration: Calibration,
    music_options: dict | None = None,
    *,
    K: torch.Tensor | None = None,
    order_rule: str | None = None,
) -> Estimates:
    """K per scene (:func:`count_sources`), then the kind's estimates
    (:meth:`risloc.nn.networks.NetworkKind.to_estimates`); with a given ``K`` exactly that K."""
    kind = get_network(pred.kind)
    K_use = count_sources(pred, inputs, options, scenario, calibration, K=K, order_rule=order_rule)
    est = kind.to_estimates(pred, inputs, options, scenario, K_use, music_options)
    if K is not None:
        est = complete_to_k(est, K_use, kind.candidates(pred))
    return est


@torch.no_grad()
def predict(model: torch.nn.Module, scenes: Scenes, *, options: cv.CovarianceOptions, use_snr: bool = True,
            autocast: torch.dtype | None = None, cancel: torch.Tensor | None = None,
            inputs: ModelInputs | None = None) -> tuple[ModelInputs, Prediction]:
    """The network's inputs and :class:`Prediction` for ``scenes`` (on the model's device); a few
    scenes on CUDA run the forward pass as one replayed CUDA graph (:mod:`risloc.cuda_graphs`).
    ``cancel``: :attr:`ModelInputs.cancel` (the second look, :func:`second_look`). ``inputs``: the
    scenes' :func:`~risloc.nn.inputs.prepare_inputs`, where the caller has made them."""
    s = scenes.to(next(model.parameters()).device)
    if inputs is None:
        inputs = _inputs(s, options, use_snr)
    if cancel is not None:
        inputs = dataclasses.replace(inputs, cancel=cancel.to(s.device))
    if graphable(len(inputs), s.device, model):
        pred = graphed(lambda x: forward(model, x, options, autocast), inputs, ("forward", options, autocast), owner=model)
    else:
        pred = forward(model, inputs, options, autocast)
    return inputs, pred


def _inputs(scenes: Scenes, options: cv.CovarianceOptions, use_snr: bool) -> ModelInputs:
    """The network's inputs of ``scenes`` (their SNR labels unless ``use_snr`` is False)."""
    return prepare_inputs(scenes.y, scenes.H, scenes.codes, scenes.snr_db if use_snr else None,
                          regularisation=options.regularisation, scenario=scenes.scenario)


@torch.no_grad()
def second_look(model: torch.nn.Module, scenes: Scenes, found: Estimates, n: int, *, options: cv.CovarianceOptions,
                use_snr: bool = True, autocast: torch.dtype | None = None) -> Estimates | None:
    """The network's ``n`` strongest candidates after it has seen the sources ``found`` removed.

    The network runs again on the same scenes, but its matched-filter front end cancels the
    steering vectors a(phi_k, theta_k, r_k) of the ``found`` sources (e.g. the likelihood-refined
    detections of the first look), in their order, as its first pursuit picks
    (:attr:`ModelInputs.cancel`, :func:`risloc.nn.networks.spectrum.matched_filter_spectra`)
    instead of the grid atoms nearest to them. A source refined to its own position is cancelled
    almost exactly, so what a weaker source next to it contributes shows in the pursuit spectra,
    where the residue of a grid atom hid it on the first look. Returns the network's ``n``
    strongest heat maxima of that pass (:meth:`~risloc.nn.networks.NetworkKind.candidates`),
    or None for a network kind without candidates. Fixed cost: one more forward pass."""
    from .. import physics

    slot = torch.arange(found.phi.shape[1], device=found.phi.device).view(1, -1)
    keep = (slot < found.K.view(-1, 1)) & torch.isfinite(found.phi) & torch.isfinite(found.theta) & torch.isfinite(found.r)
    a = physics.steering(torch.nan_to_num(found.phi), torch.nan_to_num(found.theta), torch.nan_to_num(found.r, nan=1.0),
                         scenes.scenario, dtype=torch.complex64)  # [B, K, N]
    a = torch.where(keep.unsqueeze(-1), a, torch.zeros_like(a))  # a zero row: the front end's own pick
    _, pred = predict(model, scenes, options=options, use_snr=use_snr, autocast=autocast, cancel=a)
    return get_network(pred.kind).candidates(pred, n)


@torch.no_grad()
def run_model(
    model: torch.nn.Module,
    scenes: Scenes,
    *,
    options: cv.CovarianceOptions,
    calibration: Calibration,
    music_options: dict | None = None,
    use_snr: bool = True,
    K: torch.Tensor | None = None,
    order_rule: str | None = None,
    autocast: torch.dtype | None = None,
    stage: str = "music",
    inputs: ModelInputs | None = None,
) -> tuple[Estimates, Prediction]:
    """One batch of ``scenes`` through the network, on the model's device: its estimates
    (:func:`locate_from_prediction`) and the network's :class:`Prediction` (K logits, and the
    kind's ranked candidates through :meth:`~risloc.nn.networks.NetworkKind.candidates`).

    ``K`` ``[S]``: known source numbers (each scene gets exactly that K); ``order_rule``: K from
    that rule on the prediction (see :func:`locate_from_prediction`). ``autocast``: the mixed
    precision of the forward pass (None: float32, :data:`INFERENCE_AUTOCAST`).
    ``stage="detections"``: for a kind with candidates, the estimates are its K strongest
    detections themselves (K from :func:`count_sources`), without the MUSIC step of
    :func:`locate_from_prediction` (for callers that refine them on the likelihood next).
    ``inputs``: the scenes' network inputs where the caller has prepared them (:func:`predict`)."""
    s = scenes.to(next(model.parameters()).device)
    inputs, pred = predict(model, s, options=options, use_snr=use_snr, autocast=autocast, inputs=inputs)
    K = K.to(s.device) if K is not None else None
    if stage not in ("music", "detections"):
        raise ValueError(f"run_model: stage = {stage!r}: must be 'music' or 'detections'")
    candidates = get_network(pred.kind).candidates(pred) if stage == "detections" else None
    if candidates is not None:
        K_use = count_sources(pred, inputs, options, s.scenario, calibration, K=K, order_rule=order_rule)
        return over_init(candidates, K_use, 0), pred
    est = locate_from_prediction(pred, inputs, options, s.scenario, calibration, music_options, K=K, order_rule=order_rule)
    return est, pred


def packaged_or_given(method: str, checkpoint, default: Path, hint: str):
    """``checkpoint``, or the packaged weights ``default`` when it is None (an error naming
    ``--checkpoint`` and ``hint`` when the package has none). A bare name (no folder, no
    suffix, not a file here), e.g. ``"mixed"``, names a packaged model:
    ``src/risloc/weights/<name>.pt`` (:func:`risloc.nn.checkpoint.named_checkpoint`)."""
    if checkpoint is not None:
        return named_checkpoint(checkpoint, f"{method}: checkpoint")
    if not default.is_file():
        raise ValueError(f"{method}: no checkpoint given and no packaged weights ({default}); "
                         f"pass --checkpoint FILE (checkpoint=...) or {hint}")
    return default


def prepare_checkpoint(method: str, kind: str, checkpoint, scenes: Scenes, beta, music_options):
    """The shared start of a learned estimator: ``(loaded model, covariance options, MUSIC options)``,
    the model on the scenes' device.

    Refuses a checkpoint of another network kind (``model.kind``; ``kind`` is one name or a tuple), one trained for another
    N or L than the scenes (unless its network reads every geometry, ``ModelConfig.geometry_free``), and a network with a
    K head (``spectrum``, ``covariance``, ``subspacenet``) trained for a smaller k_max than the scenes'; ``beta`` overrides the checkpoint's blend weight and
    ``music_options`` update the checkpoint's MUSIC options.
    """
    loaded = _cached_model(checkpoint, scenes.device)
    cfg = loaded.config
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if cfg.model.kind not in kinds:
        raise ValueError(f"{method}: checkpoint {checkpoint} holds a model.kind = {cfg.model.kind!r} network, not {' or '.join(map(repr, kinds))}")
    if not cfg.model.geometry_free and (scenes.scenario.n_elements != cfg.scenario.n_elements
                                        or scenes.scenario.snapshots != cfg.scenario.snapshots):
        raise ValueError(
            f"{method}: checkpoint {checkpoint} was trained for N = {cfg.scenario.n_elements}, L = {cfg.scenario.snapshots}; "
            f"the scenes have N = {scenes.scenario.n_elements}, L = {scenes.scenario.snapshots}"
            + (" (the packaged 'family' network reads every geometry: checkpoint='family', --checkpoint family; "
               "or train one for this geometry)" if "spectrum" in kinds else "")
        )
    if cfg.model.kind in ("spectrum", "covariance", "subspacenet") and scenes.scenario.k_max > cfg.scenario.k_max:
        raise ValueError(
            f"{method}: checkpoint {checkpoint} counts at most k_max = {cfg.scenario.k_max} sources (its K head); "
            f"the scenes allow k_max = {scenes.scenario.k_max}: train a network with --scenario.k_max "
            f"{scenes.scenario.k_max}, or use ml, which searches any k_max")
    options = loaded.options if beta is None else dataclasses.replace(loaded.options, beta=float(beta))
    music = dict(cfg.music_options)
    music.update(music_options or {})
    return loaded, options, music


INFERENCE_AUTOCAST = None
"""Mixed precision of the network's forward pass in validation and inference: None (float32).
On 4 000 scenes of the validation seed 1000 on one H100 the shipped model under bf16 autocast
(as trained) scored 0.390 / 0.659 (all SNRs / 10-20 dB, with the likelihood refinement) against
0.393 / 0.663 in float32, for 9 % more forward speed (benchmarks/results/h100/learned-speed/)."""

LEARNED_DEFAULTS = {"iterations": 3, "greedy_iterations": 3}
"""``ml`` options of ``learned``'s likelihood stage besides its growth, RELAX and pruning counts
and its dictionary (:data:`LEARNED_GRID`): 3 Fisher-scoring steps of the start and after each
change (``iterations``, ``greedy_iterations``); RELAX re-searches the sources of
:data:`LEARNED_RELAX_SOURCES`. Chosen on 4 000 scenes of the validation seed 1000 on one H100
(benchmarks/results/h100/learned-stage/), success at 10-20 dB / over all SNRs and K_acc at
10-20 dB, with one growth, one RELAX re-search and one pruning pass on ``ml``'s dictionary:
6 steps 0.704 / 0.426 / 0.984, 4 steps 0.706 / 0.427 / 0.984, 3 steps 0.706 / 0.427 / 0.984,
2 steps 0.705 / 0.428 / 0.981; re-searching every source instead of the weakest: 0.704 / 0.427
/ 0.985 at half the speed; ``ml`` itself 0.707 / 0.429 / 0.989. The Levenberg-Marquardt steps
start next to the optimum, so a few suffice. With 3 steps, by dictionary
(grid_val1000.json, the stage's scenes/s at batch 1 024 in one run): 25 x 13 x 14 0.706 /
0.427 / 0.984 at 4 550-4 670; 21 x 11 x 12 0.704 / 0.425 / 0.982 at 6 130; 19 x 10 x 10 0.704 /
0.426 / 0.979 at 6 490; 15 x 8 x 8 0.702 / 0.424 / 0.973 at 6 370; 13 x 7 x 7 0.699 / 0.422 /
0.974 at 7 390: the 21 x 11 x 12 grid keeps K_acc above 0.98 for a third more speed."""

LEARNED_GRID = {"stochastic": (24, 12, 12), "static": (25, 13, 14)}
"""The near-field dictionary (n_phi, n_theta, n_r; ``ml``'s ``grid_shape``) that ``learned``'s growth
and RELAX steps search, by the scenes' signal model; ``ml_options={"grid_shape": ...}`` overrides it.

Stochastic signals: 24 x 12 x 12 (3 456 atoms; ``ml``'s own is 25 x 13 x 14, 4 550), the packaged
networks' own grid, so that the stage reads the dictionary their front end has already measured
(|phi_lq|^2 and y_l^H phi_lq, :func:`reuses_dictionary`) instead of measuring one of its own.
Before, 21 x 11 x 12 (2 772 atoms), chosen with the step counts (:data:`LEARNED_DEFAULTS`, whose
docstring has the measurements). Measured on validation scenes only (successes over -5..20 dB /
at 10-20 dB / correct counts at 10-20 dB, 24 x 12 x 12 minus 21 x 11 x 12): 2 000 default scenes
of seed 2026 on the CPU 0 / +3 / 0, 1 000 ``dft`` scenes of each of seeds 1000 and 2026 on the
CPU -5 / -2 / -2 (benchmarks/results/cpu/learned-network-grid/), 4 000 default scenes of seed
1000 on one H100 +3 / +2 / -2 (benchmarks/results/h100/learned-network-grid/; on the CPU the
first 2 000 of them gave -4 / -2 / -2): -2 / +3 / -4 over those 8 000 scenes, i.e. the same
accuracy, for +6.8 % scenes/s on one H100 (benchmarks/results/h100/maps-and-grid-ab/, variants
alternated in one process) and one scene 46.0 -> 42.2 ms on a 2-core CPU. Adopted by the rule
written before the held-out check: successes at 10-20 dB not lower, over all SNRs lower by at
most 0.1 % of the scenes, correct counts lower by at most 0.2 %, and faster.

Static signals: ``ml``'s 25 x 13 x 14, with three growth steps (:data:`LEARNED_GROW`). There the
stage's K accuracy stayed below ``ml``'s because it missed more sources. On 400 static scenes at
10-20 dB of each validation seed, 1000 and 2026 (the packaged default network ``mixed``, one thread
of a 2-core CPU, benchmarks/results/cpu/learned-static-k-mixed/), success / K_acc / K_under: two
growth steps on the 21 x 11 x 12 dictionary (the previous default) 0.758 / 0.940 / 0.050 and
0.780 / 0.960 / 0.030; three on ``ml``'s 0.758 / 0.963 / 0.030 and 0.788 / 0.968 / 0.023, for
1.26 x the time; ``ml`` 0.755 / 0.963 / 0.030 and 0.783 / 0.965 / 0.025 (with the base network,
benchmarks/results/cpu/learned-static-penalty/, the same picture: 0.760 / 0.953 -> 0.760 / 0.963
and 0.785 / 0.955 -> 0.785 / 0.963). Adopted by the rule set
before the run: success summed over both seeds not lower by more than one scene, K accuracy
higher. A later check on 1 000 static scenes of seed 1000 over -5..20 dB (same folder) did not
confirm the K gain: K-hat = K in 380 of 399 scenes at 10-20 dB with either stage, success 504
against 506 of 1 000, 1.6 x the time on the CPU."""

LEARNED_OVER = 1
"""Extra detections of ``learned``'s start (``over``): the network's min(K-hat + 1, K_max)
strongest detections are refined, and ``over + prune`` pruning passes follow (the likelihood
drops the extra one where it is not a source). The extra detection stands in for the growth
step's dictionary search (:data:`LEARNED_GROW`: none for stochastic signals). Chosen on 4 000 scenes of each validation
seed, 1000 and 2026, on one H100 (benchmarks/results/h100/learned-stage/over_val1000.json,
over_val2026.json), success over all SNRs / at 10-20 dB, K_acc at 10-20 dB, the stage's
scenes/s at batch 1 024: one growth, no extra detection (the previous default) 0.4253 / 0.704 /
0.982 at 6 900 (seed 1000) and 0.426 / 0.707 / 0.980 at 6 760-7 120 (seed 2026); one extra
detection, no growth 0.425 / 0.705 / 0.984 at 7 310 and 0.428 / 0.708 / 0.980 at 7 010; one extra
detection and one growth 0.425 / 0.705 / 0.985 at 6 010 and 0.428 / 0.707 / 0.982 at 5 390; two
extra detections and one growth 0.426 / 0.705 / 0.984 at 4 560 and 0.427 / 0.707 / 0.981 at
5 030. ``ml`` itself: 0.428 / 0.706 / 0.989 and 0.430 / 0.710 / 0.989."""

LEARNED_SEARCH = "dictionary"
"""What ``learned``'s growth and RELAX steps search (option ``search``): ``"dictionary"``, every
atom of the near-field dictionary of :data:`LEARNED_DEFAULTS`, or ``"network"``, the
:data:`LEARNED_CANDIDATES` strongest candidates of the network's second look
(:func:`second_look`: the network run again with the refined start cancelled in its front end;
the stage then has no dictionary search, only fixed-cost steps).

Chosen on the validation seeds. Default scenes, 4 000 of seed 1000, one H100
(benchmarks/results/h100/second-look-val-5218f1a/), success at 10-20 dB / all SNRs, K_acc at
10-20 dB, scenes/s at batch 1 024, one-scene latency: the second look 0.702 / 0.426 / 0.977,
3 810/s, 22.7 ms; the dictionary 0.705 / 0.425 / 0.984, 5 360/s, 16.1 ms; ``ml`` 0.707 / 0.428 /
0.989. ``dft`` codes, 1 000 scenes: the second look 0.727 / 0.434 / 0.942, the dictionary 0.732 /
0.436 / 0.970. On 400 scenes at 10-20 dB of each validation seed, 1000 and 2026 (2-core CPU),
success / K_acc: default scenes, the second look 0.683 / 0.970 and 0.725 / 0.983 (16 candidates
on seed 2026: 0.723 / 0.980), the dictionary 0.683 / 0.978 and 0.730 / 0.988, the network's
first-look candidates 0.653 / 0.928 and 0.698 / 0.938, no search 0.635 / 0.895 and 0.693 /
0.895; static signals (two growth steps, every source re-searched), the second look 0.690 /
0.890 and 0.720 / 0.883, the dictionary 0.760 / 0.953 and 0.785 / 0.955; ``dft`` codes, the second
look 0.670 / 0.920 and 0.695 / 0.935, the dictionary 0.683 / 0.953 and 0.708 / 0.965. The second
look finds most of the sources the first look missed (K_acc 0.93 -> 0.98 against its first-look
candidates), but the dictionary finds a few more, and on the GPU its second forward pass costs
more than the dictionary search."""

LEARNED_CANDIDATES = 8
"""Candidates of the network's second look that ``learned`` scores (``search = "network"``,
:data:`LEARNED_SEARCH`)."""

LEARNED_OVER_DFT = 2
"""Extra detections of ``learned``'s start for scenes with ``dft`` codes (``over``; its pruning passes
are ``over`` + :data:`LEARNED_PRUNE` of stochastic signals, so three). With ``dft`` codes the network misses more
sources (K_acc 0.970 on 1 000 validation scenes at 10-20 dB, ``ml`` 0.975-0.980 on 400); a second extra
detection, moved by the RELAX re-search, finds some of them. 400 ``dft``-code scenes at 10-20 dB of
each validation seed, 1000 and 2026 (the packaged default network, 2-core CPU,
benchmarks/results/cpu/learned-dft-over/), success / K_acc: one extra detection 0.683 / 0.953 and
0.708 / 0.965; two 0.688 / 0.963 and 0.715 / 0.975; every source re-searched by RELAX instead
0.688 / 0.963 and 0.715 / 0.973 (about 1.4 x the time of two extra detections); two RELAX cycles
0.680 / 0.965 and 0.715 / 0.973; ``ml`` 0.693 / 0.975 and 0.720 / 0.980. (Earlier, one growth step
or ``ml``'s dictionary moved at most two scenes of 400: benchmarks/results/cpu/learned-dft-k/.)"""


def default_over(scenario: Scenario) -> int:
    """Extra detections of ``learned``'s start for scenes of ``scenario``: :data:`LEARNED_OVER_DFT`
    with ``dft`` codes, else :data:`LEARNED_OVER`."""
    return LEARNED_OVER_DFT if scenario.codebook == "dft" else LEARNED_OVER


LEARNED_GROW = {"stochastic": 0, "static": 3}
"""Greedy additions of ``learned``'s likelihood stage by the scenes' signal model (``ml``'s
``init_grow``; the option ``grow`` overrides it): the atom of a near-field dictionary of largest
likelihood gain is added where the penalised likelihood prefers one source more. The network
misses sources that no detection is near (docs/learned.md).

Stochastic signals: none. On the validation seed 1000 (8 refinement steps, no RELAX or pruning,
benchmarks/results/h100/learned-speed/grow_val1000.json) success at 10-20 dB / all SNRs and
K_acc at 10-20 dB were 0.647 / 0.389 / 0.890 without, 0.680 / 0.406 / 0.959 with one; with the
RELAX re-search and the pruning passes, one extra detection (:data:`LEARNED_OVER`) does as well
for less time.

Static signals: three, on ``ml``'s dictionary (:data:`LEARNED_GRID`, where the measurements are),
with every source re-searched (:data:`LEARNED_RELAX_SOURCES`; the measurements with one step are
there). Before that, two on the 21 x 11 x 12 dictionary: on 400 static scenes at 10-20 dB of each validation seed,
1000 and 2026 (the packaged default network, 2-core CPU,
benchmarks/results/cpu/learned-static-grow2/), success / K_acc: one growth step 0.743 / 0.930 and
0.778 / 0.943, two 0.760 / 0.953 and 0.785 / 0.955 (the ``mixed`` network: 0.748 -> 0.758 and
0.773 -> 0.780), three 0.763 / 0.955 and 0.785 / 0.958; ``ml`` 0.755 / 0.963 and 0.783 / 0.965."""

LEARNED_RELAX = 1
"""RELAX cycles of ``learned`` (``ml``'s ``init_relax``; with :data:`LEARNED_RELAX_SOURCES`'s
one source for stochastic signals the weakest source is searched again on the dictionary given
the others, for static signals every source).
A source the refinement left at a wrong position has a low estimated power; moved to where it
belongs, the pruning pass that follows no longer drops it. On the validation seed 1000
(benchmarks/results/h100/learned-stage/relax_val1000.json, 6 refinement steps): growth alone
0.680 / 0.407 / K_acc 0.958; growth + pruning 0.692 / 0.419 / 0.950; growth + RELAX of the
weakest + pruning 0.704 / 0.426 / 0.984."""

LEARNED_RELAX_SOURCES = {"stochastic": 1, "static": 0}
"""Sources re-searched by each RELAX cycle of ``learned`` (``ml``'s ``relax_sources``: the
weakest first; 0: every source), by the scenes' signal model; ``ml_options={"relax_sources": n}``
overrides it.

Stochastic signals: the weakest. On 4 000 scenes of the validation seed 1000 (one H100,
:data:`LEARNED_DEFAULTS`) re-searching every source scored 0.704 / 0.427 / 0.985 (success at
10-20 dB / all SNRs, K_acc at 10-20 dB) against 0.706 / 0.427 / 0.984 for the weakest, at half
the speed.

Static signals: every source, after the growth steps (:data:`LEARNED_GROW`). There the network's
K head under-counts and its detections of coherent, unchanging sources are less accurate, so that
the weakest source is not the only one to move. 400 static scenes at 10-20 dB of each validation
seed, 1000 and 2026, the packaged ``mixed`` network, one thread of a 2-core CPU
(benchmarks/results/cpu/learned-static-relax/), success / K_acc / K_under: the stochastic
defaults (no growth, the weakest) 0.595 / 0.755 / 0.237 and 0.618 / 0.780 / 0.215; one growth
0.708 / 0.868 / 0.120 and 0.705 / 0.873 / 0.120; every source re-searched 0.713 / 0.848 / 0.150 and
0.735 / 0.877 / 0.115; both 0.748 / 0.927 / 0.063 and 0.772 / 0.945 / 0.045; ``ml`` on the same
scenes 0.755 / 0.963 / 0.030 and 0.782 / 0.965 / 0.025. Less: two growth steps 0.715 and 0.718,
two extra detections (``over=2``) 0.615 and 0.630, one growth with 8 refinement steps 0.713 or
``ml``'s 25 x 13 x 14 dictionary 0.710 (seed 1000)."""

LEARNED_PRUNE = {"stochastic": 1, "static": 2}
"""Pruning passes of ``learned`` beyond ``over`` (``ml``'s ``init_prune`` = over + prune), by the
scenes' signal model (the option ``prune`` overrides it): the source whose removal costs least
likelihood is dropped where ``ml``'s penalised likelihood or power rule prefers one source fewer;
it removes the extra detection of :data:`LEARNED_OVER` where it is not a source and corrects the
K head's over-counts (see :data:`LEARNED_RELAX`).

Static signals: two, since the three growth steps (:data:`LEARNED_GROW`) can add as many sources.
400 static-signal scenes of each validation seed, 1000 and 2026 (the packaged ``mixed`` network,
one thread of a 2-core CPU, benchmarks/results/cpu/learned-ml-static/, the rule set before the
run: adopt where success over -5-20 dB summed over the seeds is higher and at 10-20 dB not
lower), success / K_acc over -5-20 dB: one pass 0.4925 / 0.765 and 0.5225 / 0.7825, two 0.4975 /
0.7625 and 0.5225 / 0.7725; at 10-20 dB the same scores both ways (0.7575 / 0.9625 and 0.7875 / 0.9675).
The second pass drops a few spurious sources at low SNR and a few true weak ones."""


def stage_options(signal: str, *, over: int = LEARNED_OVER, grow: int | None = None, relax: int = LEARNED_RELAX,
                  prune: int | None = None) -> dict:
    """The ``ml`` options of ``learned``'s likelihood stage (:func:`estimate`) for scenes of the
    signal model ``signal`` ("stochastic" or "static"): :data:`LEARNED_DEFAULTS`, the dictionary of
    :data:`LEARNED_GRID` and the RELAX sources of :data:`LEARNED_RELAX_SOURCES` of the signal model,
    ``grow`` greedy additions (default :data:`LEARNED_GROW` of the signal model), ``relax`` RELAX
    cycles and ``over + prune`` pruning passes (``prune`` default :data:`LEARNED_PRUNE` of the
    signal model)."""
    grow = LEARNED_GROW[signal] if grow is None else grow
    prune = LEARNED_PRUNE[signal] if prune is None else prune
    return {**LEARNED_DEFAULTS, "grid_shape": LEARNED_GRID[signal], "relax_sources": LEARNED_RELAX_SOURCES[signal],
            "init_grow": grow, "init_relax": relax, "init_prune": over + prune}


def _counts(method: str, **counts) -> dict[str, int]:
    """The stage counts (``grow``, ``relax``, ...) as ints, each >= 0 (a ValueError naming ``method`` and the option)."""
    out = {}
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
            raise ValueError(f"{method}: {name} = {v!r}: must be an integer >= 0")
        out[name] = int(v)
    return out


def _likelihood_stage(scenes: Scenes, init: Estimates, K: torch.Tensor | None, options: dict,
                      dictionary=None) -> Estimates:
    """``ml`` from ``init`` with ``options`` (its ``init_*`` counts, iterations, ``atoms``, ...), on the
    same batch; with a known ``K`` no growth and no pruning (the RELAX re-search keeps the count).
    ``ml``'s batch function itself (:func:`risloc.estimators.ml.estimate`: the registry's call of
    the learned estimator has checked the scenes), or the registry's ``ml`` in batches of
    ``options["batch"]`` scenes where that is given. ``dictionary``: the network's measured
    dictionary (:class:`risloc.grids.MeasuredDictionary`) that the searches read instead of
    measuring their own (one ``ml`` call only). The stage does not read the SNR labels."""
    from ..estimators import get, ml

    options = dict(options)
    if K is not None:
        options["init_grow"] = options["init_prune"] = 0
    if "batch" in options:
        if dictionary is not None:
            raise ValueError("learned: a measured dictionary serves one ml call; not with the option batch")
        return get("ml")(scenes, init=init, **options)
    return ml.estimate(scenes, init=init, dictionary=dictionary, **options)


def reuses_dictionary(options: dict, model: torch.nn.Module) -> bool:
    """Whether ``learned``'s likelihood stage with the ``ml`` ``options`` reads the network's own
    measured dictionary (:class:`risloc.grids.MeasuredDictionary`: |phi_lq|^2 and y_l^H phi_lq,
    what a ``spectrum`` network's front end measures first) instead of measuring its dictionary
    again: where its grid (``grid_shape``, :data:`LEARNED_GRID`) is the network's (``model.shape``)
    and it runs as one ``ml`` call (no ``batch``) in complex64, without ``atoms``, on the codes as
    given (``amplitude="given"``, what the front end measured with). The answers are those of the
    stage measuring the same grid itself, to float32 rounding."""
    from ..estimators import ml

    net = getattr(model, "shape", None)
    grid = options.get("grid_shape", ml.MLOptions().grid_shape)
    return (net is not None and tuple(int(n) for n in grid) == tuple(int(n) for n in net) and "batch" not in options
            and "atoms" not in options and options.get("dtype", torch.complex64) == torch.complex64
            and options.get("amplitude", "given") == "given")


@torch.no_grad()
def _refined(scenes: Scenes, checkpoint, beta, use_snr: bool, music_options, K: torch.Tensor | None, over: int,
             options: dict) -> Estimates:
    """The network's start (:func:`_start`, ``over`` extra detections) and the likelihood stage
    from it (:func:`_likelihood_stage` with ``options``), named after the network (``learned:<sha>``).

    A few scenes on CUDA (:func:`risloc.cuda_graphs.graphable`) run both stages as ONE replayed
    CUDA graph: the network's inputs are prepared first (a missing SNR label is estimated there,
    which waits for the device), then the forward pass, the K head, the start and ``ml``'s
    ``init`` path, none of which reads a device value, are captured together. A stream of single
    scenes then pays neither the dispatch of the operators between the two stages nor a wait for
    the device between them. The stages run one after the other, as they are, where a step would
    wait for the device: the K head's fall-back order rule (a calibration threshold > 0, an
    eigen-decomposition), ``ml`` options under which its ``init`` path reads device values
    (:func:`risloc.estimators.ml.init_path_reads`) or runs in batches (``batch``)."""
    from ..estimators import ml

    def run(x):
        s, inputs, k = x
        first, init, dictionary = _start(s, checkpoint, beta, use_snr, music_options, k, over, inputs=inputs)
        est = _likelihood_stage(s, init, k, options, dictionary=dictionary)
        est.method = first.method
        return est

    path = packaged_or_given("learned", checkpoint, DEFAULT_WEIGHTS, "train one with `risloc train`")
    loaded, net_options, _ = prepare_checkpoint("learned", ("spectrum", "covariance"), path, scenes, beta, music_options)
    reuse = reuses_dictionary(options, loaded.model)
    inputs = lambda s: dataclasses.replace(_inputs(s, net_options, use_snr), keep_dictionary=reuse)  # noqa: E731
    if ("batch" in options or loaded.calibration.threshold > 0 or not graphable(len(scenes), scenes.device, loaded.model)
            or ml.init_path_reads(scenes.scenario, **options)):
        return run((scenes, inputs(scenes), K))
    s = dataclasses.replace(scenes, truth=None)  # what the stages read: the graph copies no truth
    key = ("learned", beta, use_snr, repr(music_options), over, repr(sorted(options.items())))
    return graphed(run, (s, inputs(s), K), key, owner=loaded.model)


@register("learned")
def estimate(
    scenes: Scenes,
    *,
    checkpoint: str | Path | None = None,
    K=None,
    beta: float | None = None,
    use_snr: bool = True,
    music_options: dict | None = None,
    refine: str = "likelihood",
    over: int | None = None,
    grow: int | None = None,
    relax: int = LEARNED_RELAX,
    prune: int | None = None,
    ml_options: dict | None = None,
    search: str | None = None,
    conv_precision: str = "fp32",
) -> Estimates:
    """The learned estimator: the network's detections and calibrated K head, then (default) a
    short likelihood stage on the measurements that corrects their positions and their count.

    Stages: the network reads the scene and predicts its sources (a ``spectrum`` network: the
    detections and a K head giving K-hat). With ``refine="likelihood"`` (default) ``ml``'s
    ``init`` path (:func:`risloc.estimators.ml.estimate`) takes the min(K-hat + ``over``, K_max)
    strongest detections (``over`` default :func:`default_over`: :data:`LEARNED_OVER`, with
    ``dft`` codes :data:`LEARNED_OVER_DFT`; a network without detections gives its K-hat estimates):

    1. their positions, powers and sigma^2 take a few joint Fisher-scoring steps on the exact
       likelihood of the measurements y_l ~ CN(0, G_l R G_l^H + sigma^2 I) (no search);
    2. ``grow`` (default :data:`LEARNED_GROW` of the scenes' signal model: none for stochastic
       signals, three for static ones) greedy additions: the atom of a near-field
       dictionary (:data:`LEARNED_GRID` of the signal model) of largest likelihood gain given
       those sources is added and all are refined; the larger model is kept only where
       ``ml``'s penalised likelihood and power rule prefer it;
    3. ``relax`` (default :data:`LEARNED_RELAX`) RELAX cycles on the weakest source (static
       signals: on every source, :data:`LEARNED_RELAX_SOURCES`): it is removed, searched again
       on the dictionary given the others, and the move is kept where the likelihood rises;
    4. ``over + prune`` (``prune`` default :data:`LEARNED_PRUNE` of the signal model: one for
       stochastic signals, two for static ones) pruning passes: the source
       whose removal costs least is dropped where the penalised likelihood or the power rule
       prefers one fewer.

    ``search`` (default :data:`LEARNED_SEARCH`) says what steps 2 and 3
    search: ``"network"``, the network's second look (:func:`second_look`): after step 1 the
    network runs again with the refined sources cancelled in its front end, and its
    :data:`LEARNED_CANDIDATES` strongest candidates are scored (by the same exact likelihood
    gain) instead of a dictionary, so the stage has no dictionary search (it needs a network with
    candidates, a ``spectrum`` one); ``"dictionary"``, the near-field dictionary.

    So the network proposes and the likelihood decides K within K-hat - prune ... K-hat + over + grow.
    Step counts and the other ``ml`` options: :data:`LEARNED_DEFAULTS`, updated by
    ``ml_options`` (e.g. ``{"relax_sources": 0}`` re-searches every source; ``batch``: scenes
    per ``ml`` call, default the whole batch). Why: the network's failures are mostly right
    counts with a source outside the hit window (step 1 fixes them), missed sources no
    detection is near (the extra detection moved by step 3, or step 2) and over-counts
    (steps 3-4); docs/learned.md.
    ``refine="music"``: the network's own positions: MUSIC on the effective covariance E(F) of
    the K-hat strongest detections (the one builder :func:`risloc.covariance.effective_covariance`;
    ``beta`` blends the scene's own sample covariance in, default the checkpoint's), searched
    locally from the detections, as in the training validation.

    ``K``: the number of sources when it is known (an int or a per-scene ``[S]`` tensor, each in
    1..K_max): every scene then gets exactly that K (a ``spectrum`` network's K strongest
    detections, refined and re-searched, with no growth or pruning; with ``refine="music"``
    missing ones come from its next detections by heat).

    ``conv_precision``: the precision of the network's convolutions on the CPU, ``"fp32"`` (default),
    ``"bf16"`` or ``"auto"`` (:func:`risloc.nn.networks.spectrum.set_cpu_conv_precision`).

    ``checkpoint``: a file written by ``risloc train``; ``None`` looks for the packaged default
    ``src/risloc/weights/mixed.pt`` (:data:`DEFAULT_WEIGHTS`). ``use_snr=False`` ignores the scenes' SNR labels
    (estimated from the data instead). One batch, on the scenes' device (the registry,
    ``risloc.locate(scenes, "learned", batch=..., device=...)``, runs large scene sets in batches
    of 1024 and on another device); the likelihood stage is ``ml``'s, on the same batch (a few
    scenes on CUDA: the network and the stage as one replayed CUDA graph, :func:`_refined`). Returns Estimates with ``method = "learned:<first 12 hex of the checkpoint's SHA-256>"``.
    """
    with set_cpu_conv_precision(conv_precision):
        if refine not in ("likelihood", "music"):
            raise ValueError(f"learned: refine = {refine!r}: must be 'likelihood' or 'music'")
        if search not in (None, "network", "dictionary"):
            raise ValueError(f"learned: search = {search!r}: must be 'network' or 'dictionary'")
        over = default_over(scenes.scenario) if over is None else over
        counts = _counts("learned", over=over, relax=relax, **({} if grow is None else {"grow": grow}),
                         **({} if prune is None else {"prune": prune}))
        K = known_k("learned", K, scenes)
        if refine == "music":
            return _learned(scenes, checkpoint, beta, use_snr, music_options, K=K, stage="music")[0]
        options = {**stage_options(scenes.scenario.signal, **counts), **(ml_options or {})}
        if (search or LEARNED_SEARCH) != "network":
            return _refined(scenes, checkpoint, beta, use_snr, music_options, K, counts["over"], options)
        # the second look: the network again, on what its refined start leaves
        first, init, _ = _start(scenes, checkpoint, beta, use_snr, music_options, K, counts["over"])
        checkpoint = packaged_or_given("learned", checkpoint, DEFAULT_WEIGHTS, "train one with `risloc train`")
        loaded, net_options, _ = prepare_checkpoint("learned", ("spectrum", "covariance"), checkpoint, scenes, beta, None)
        if type(get_network(loaded.config.model.kind)).candidates is NetworkKind.candidates:
            raise ValueError(f"learned: search = 'network' needs a network with candidates (a 'spectrum' network); "
                             f"this checkpoint holds a {loaded.config.model.kind!r} network: use search='dictionary'")
        if (options.get("init_grow", 0) or options.get("init_relax", 0)) and len(scenes):  # steps that search
            found = _likelihood_stage(scenes, init, K, {**options, "init_grow": 0, "init_relax": 0, "init_prune": 0})
            atoms = second_look(loaded.model, scenes, found, LEARNED_CANDIDATES, options=net_options, use_snr=use_snr,
                                autocast=INFERENCE_AUTOCAST)
            init, options = found, {**options, "atoms": atoms}
        est = _likelihood_stage(scenes, init, K, options)
        est.method = first.method
        return est


def _learned(scenes, checkpoint, beta, use_snr, music_options, *, candidates: bool = False, K: torch.Tensor | None = None,
             stage: str = "music", inputs: ModelInputs | None = None):
    """The network stage of ``learned`` on one batch: ``(estimates, the network's ranked
    candidates or None, its measured dictionary or None)`` on the scenes' device; the candidates
    only when asked for and when the network kind has them (a ``spectrum`` network's decoded
    detections, strongest first), the dictionary only where ``inputs.keep_dictionary``
    (:attr:`Prediction.dictionary`). ``stage``, ``inputs``: see :func:`run_model`; the forward
    pass runs in :data:`INFERENCE_AUTOCAST` precision."""
    checkpoint = packaged_or_given("learned", checkpoint, DEFAULT_WEIGHTS, "train one with `risloc train`")
    loaded, options, music = prepare_checkpoint("learned", ("spectrum", "covariance"), checkpoint, scenes, beta, music_options)
    est, pred = run_model(loaded.model, scenes, options=options, calibration=loaded.calibration, music_options=music,
                          use_snr=use_snr, K=K, autocast=INFERENCE_AUTOCAST, stage=stage, inputs=inputs)
    est.method = f"learned:{loaded.sha256[:12]}"
    return est, (get_network(pred.kind).candidates(pred) if candidates else None), pred.dictionary


def over_init(candidates: Estimates, K: torch.Tensor, extra: int) -> Estimates:
    """The start of an over-proposal: per scene the network's min(K + ``extra``, n) strongest
    detections (``candidates``, strongest first, n = K_max of them), NaN after."""
    n = candidates.phi.shape[1]
    K = torch.clamp(K.to(torch.int64) + int(extra), max=n)
    keep = torch.arange(n, device=K.device).view(1, -1) < K.view(-1, 1)
    nan = torch.full_like(candidates.phi, float("nan"))
    pick = lambda c: torch.where(keep, c, nan)
    return Estimates(K, pick(candidates.phi), pick(candidates.theta), pick(candidates.r), method=candidates.method)


def _start(scenes, checkpoint, beta, use_snr, music_options, K: torch.Tensor | None, over: int,
           inputs: ModelInputs | None = None) -> tuple[Estimates, Estimates, object]:
    """The network stage and the start of the likelihood stage of ``learned`` / ``learned+ml``:
    ``(the K-hat strongest detections, the start, the network's measured dictionary or None)``;
    the start is :func:`over_init` of the network's ranked detections with ``over`` extra ones, or
    the K-hat detections themselves where ``over`` is 0, K is known or the network kind has no
    ranked detections. ``inputs``: see :func:`run_model` (and :func:`_learned` for the dictionary)."""
    over_propose = K is None and over > 0  # the network's further detections are needed only then
    first, cand, dictionary = _learned(scenes, checkpoint, beta, use_snr, music_options, candidates=over_propose, K=K,
                                       stage="detections", inputs=inputs)
    return first, (over_init(cand, first.K, over) if cand is not None else first), dictionary


LEARNED_ML_DEFAULTS = {"iterations": 8, "greedy_iterations": 8}
"""``ml`` options of ``learned+ml``'s second stage: 8 refinement steps of the start and after each
pruning and RELAX re-search, 8 after the greedy addition (12, ``ml``'s own, scored the same on
the validation seed 1000 at 0.8 x the speed: benchmarks/results/h100/learned-speed/iters_val1000.json)."""

LEARNED_ML_OVER = 1
"""Extra detections of ``learned+ml``'s over-proposal (``over``); its greedy additions (``grow``,
:data:`LEARNED_ML_GROW`), RELAX cycles (``relax``, :data:`LEARNED_ML_RELAX`) and ``over + prune``
pruning passes (:data:`LEARNED_ML_PRUNE`) follow. Chosen on 4 000 scenes of each validation
seed, 1000 and 2026, on one H100 (benchmarks/results/h100/learned-stage/lml_val1000.json,
lml_val2026.json, over_val1000.json, over_val2026.json), success over all SNRs / at 10-20 dB,
K_acc at 10-20 dB: no extra detection (the previous default) 0.4268 / 0.705 / 0.986 (seed 1000)
and 0.4280 / 0.709 / 0.984 (seed 2026); one extra detection 0.4278 / 0.707 / 0.988 and
0.4293 / 0.710 / 0.989, at 0.85-0.95 x the scenes/s end to end (one source more in every step;
learned-stage/batch_memory.json against batch_memory_17ee87f.json); two 0.4273 / 0.706 / 0.987
and 0.4290 / 0.710 / 0.989; one extra detection and two growth steps 0.4280 / 0.707 / 0.989
and 0.4298 / 0.710 / 0.989 at 0.75-0.85 x the speed of one; a second RELAX cycle, a second
pruning pass without the extra detection, 12 refinement steps or a 31 x 16 x 17 dictionary
changed no score by more than 3 scenes of 4 000;
``ml`` 0.4278 / 0.706 / 0.989 and 0.4303 / 0.710 / 0.989. Earlier, before RELAX existed in this
stage, extra detections had cost sources (over 1 or 2 with one growth: 0.668 / 0.410 and 0.671 /
0.411 at 10-20 dB / all SNRs on seed 1000, benchmarks/results/h100/learned-speed/)."""

LEARNED_ML_GROW = {"stochastic": 1, "static": 3}
"""Greedy additions of ``learned+ml`` by the scenes' signal model (the option ``grow`` overrides it).
Stochastic signals: one (see :data:`LEARNED_ML_OVER`). Static signals: three, as ``learned``'s
(:data:`LEARNED_GROW`): the network under-counts static sources, and one growth step left
``learned+ml`` below ``learned`` and ``ml`` in K accuracy. 400 static-signal scenes at 10-20 dB
of each validation seed, 1000 and 2026 (the packaged ``mixed`` network, one thread of a 2-core
CPU, benchmarks/results/cpu/learned-ml-static/), success / K_acc: one growth step 0.748 / 0.938
and 0.785 / 0.955, three 0.760 / 0.958 and 0.790 / 0.970, in 0.9 x the time (fewer sources are
left for the pruning and RELAX steps to work on); ``learned`` 0.758 / 0.963 and 0.788 / 0.968;
``ml`` 0.755 / 0.963 and 0.783 / 0.965."""

LEARNED_ML_RELAX = 1
"""RELAX re-search cycles of ``learned+ml`` after the growth (see :data:`LEARNED_ML_OVER`)."""

LEARNED_ML_PRUNE = {"stochastic": 1, "static": 2}
"""Pruning passes of ``learned+ml`` beyond ``over``, by the scenes' signal model (the option
``prune`` overrides it). Stochastic signals: one (see :data:`LEARNED_ML_OVER`). Static signals:
two, after its three growth steps, by the rule and on the scenes of :data:`LEARNED_PRUNE`
(benchmarks/results/cpu/learned-ml-static/), success / K_acc over -5-20 dB: one pass 0.490 /
0.760 and 0.530 / 0.785, two 0.4925 / 0.7575 and 0.530 / 0.775; at 10-20 dB the same scores both
ways (0.760 / 0.9575 and 0.790 / 0.970)."""


@register("learned+ml")
def estimate_learned_ml(
    scenes: Scenes,
    *,
    checkpoint: str | Path | None = None,
    K=None,
    beta: float | None = None,
    use_snr: bool = True,
    music_options: dict | None = None,
    ml_options: dict | None = None,
    over: int = LEARNED_ML_OVER,
    grow: int | None = None,
    relax: int = LEARNED_ML_RELAX,
    prune: int | None = None,
    conv_precision: str = "fp32",
) -> Estimates:
    """The network's detections, then ``ml``'s likelihood refinement, growth and pruning.

    The network (a ``spectrum`` kind) proposes min(K-hat + ``over``, K_max) sources, its
    strongest detections (K-hat from its K head); ``ml`` refines all their positions, powers and
    sigma^2 jointly on the exact likelihood of the measurements
    (:func:`risloc.estimators.ml.estimate`, argument ``init``); ``grow`` greedy additions each
    add the dictionary atom of largest likelihood gain where the penalised likelihood prefers
    one source more (``init_grow``; default :data:`LEARNED_ML_GROW` of the scenes' signal model); ``relax`` RELAX cycles (Li & Stoica 1996) re-search each
    source given the others (``init_relax``); then ``over + prune`` backward pruning passes each
    drop the source whose removal costs least where ``ml``'s penalised likelihood (or its power
    rule) prefers one source fewer (``init_prune``). So the likelihood, not the K head, has the
    last word on K. Defaults :data:`LEARNED_ML_OVER`, :data:`LEARNED_ML_GROW`,
    :data:`LEARNED_ML_RELAX`, :data:`LEARNED_ML_PRUNE` (chosen on validation scenes). ``ml_options`` go to ``ml`` on top of these and of
    :data:`LEARNED_ML_DEFAULTS` (``iterations``, ``init_prune``, ...; ``batch``: scenes per
    ``ml`` call, default all of this batch). Networks without detections (``covariance``) start
    from the first stage's K-hat estimates. One batch, on the scenes' device (the registry runs
    large scene sets in batches of 1024). Returns ``method = "learned+ml:<checkpoint sha, 12 hex>"``.

    ``K`` (an int or a per-scene ``[S]`` tensor): the known number of sources; the network's K
    strongest detections are refined without pruning and every scene gets exactly that K.
    ``conv_precision``: as for ``learned``.
    """
    with set_cpu_conv_precision(conv_precision):
        grow = LEARNED_ML_GROW[scenes.scenario.signal] if grow is None else grow
        prune = LEARNED_ML_PRUNE[scenes.scenario.signal] if prune is None else prune
        counts = _counts("learned+ml", over=over, grow=grow, relax=relax, prune=prune)
        K = known_k("learned+ml", K, scenes)
        options = {**LEARNED_ML_DEFAULTS, "init_grow": counts["grow"], "init_relax": counts["relax"],
                   "init_prune": counts["over"] + counts["prune"], **(ml_options or {})}
        refined = _refined(scenes, checkpoint, beta, use_snr, music_options, K, counts["over"], options)
        refined.method = refined.method.replace("learned:", "learned+ml:", 1)
        return refined
