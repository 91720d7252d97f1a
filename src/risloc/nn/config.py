"""Configuration of the learned pipeline: dataclasses with defaults, TOML in/out, CLI flags.

One :class:`TrainConfig` holds everything a training run needs; its nested sections are
:class:`ModelConfig` (the network), :class:`LossConfig` (the loss terms, their weights and
ramps, the effective-covariance knobs) and the :class:`~risloc.scenario.Scenario` (the
scene distribution). On disk it is TOML with one table per section::

    [train]     lr = 3e-4 ...
    [model]     width = 128 ...
    [loss]      beta = 0.25 ...
    [scenario]  k_max = 5 ...

From the command line every field is a flag: ``--lr 1e-3`` (train section),
``--model.width 64``, ``--loss.k_weight 0.2``, ``--scenario.k_max 3``, or generically
``--set model.width=64``. :func:`add_config_flags` generates the flags from the dataclass
fields, :func:`config_from_args` applies them on top of a TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..covariance import CovarianceOptions
from .._files import InputError
from .._toml import coerce, read_toml
from .._toml import dumps as toml_dumps
from ..scenario import Scenario


@dataclass
class ModelConfig:
    """The network (see docs/learned.md). The defaults are the shipped model's (configs/default.toml)."""

    width: int = 32
    """Channels of the first level (spectrum), token width d (covariance), channels (subspacenet)."""
    depth: int = 2
    """Residual blocks at the bottleneck (spectrum), transformer encoder layers (covariance)."""
    patch: int = 1
    """Elements per token along each axis (1: one token per element; 2: 2 x 2 patches, 4x fewer tokens)."""
    heads: int = 4
    """Attention heads."""
    mlp_ratio: int = 2
    """Hidden width of each token MLP, in units of ``width``."""
    dropout: float = 0.0
    """Dropout inside the encoder (0 keeps training bitwise reproducible without RNG bookkeeping)."""
    k_hidden: int = 128
    """Hidden width of the K head."""
    residual: bool = True
    """Predict F = F0 + dF with F0 the K_max dominant eigenpairs of the sample covariance (dF starts at 0)."""
    kind: str = "spectrum"
    """The network kind (risloc.nn.networks): 'spectrum' (the 3-D detector on matched-filter
    spectra, the shipped default; uses width, depth, k_hidden and the grid_* fields),
    'covariance' (the transformer over RIS elements, docs/learned.md; uses width, depth, patch,
    heads, mlp_ratio, dropout, k_hidden, residual) or 'subspacenet' (the SubspaceNet-style
    convolutional peer, docs/learned-peer.md; uses width, k_hidden, residual, rank_extra)."""
    rank_extra: int = 0
    """subspacenet only: columns of the surrogate factor Z beyond K_max (r = K_max + rank_extra)."""
    grid_phi: int = 24
    """spectrum only: grid points in sin(phi) over the field of view (a multiple of 4)."""
    grid_theta: int = 12
    """spectrum only: grid points in sin(theta) (a multiple of 4)."""
    grid_rho: int = 12
    """spectrum only: grid points in 1/r over [1/r_max, 1/r_min] (a multiple of 4)."""
    snapshot_channels: bool = True
    """spectrum only: feed the per-snapshot matched filters c_l as channels (besides their mean);
    ignored when ``snapshot_quantiles`` > 0. A network without them reads every geometry too."""
    snapshot_quantiles: int = 0
    """spectrum only: > 0 feeds that many quantiles over the snapshots of the per-snapshot matched
    filters (their sorted values, interpolated to evenly spaced levels) instead of one channel
    per snapshot, so that no input of the network depends on the geometry (N, M, L): one network
    for scenes of any RIS size, antenna count and snapshot count (``TrainConfig.geometries``).
    0: one channel per snapshot (``snapshot_channels``)."""
    pursuit: int = 5
    """spectrum only: orthogonal-matching-pursuit picks of the front end (0: the matched filter
    alone); the network sees S_0..S_{pursuit-1} and the residual power after 1..pursuit picks."""
    channels_last: bool = True
    """spectrum only: run the 3-D convolutions in channels-last layout on CUDA (speed only; same weights)."""
    coherent: bool = False
    """spectrum only: also feed the coherent spectra C_0..C_{pursuit-1} (one amplitude per source held
    over the snapshots: the static signal model's matched filter, whose sidelobes are about L times
    weaker than those of S; :func:`risloc.nn.networks.spectrum.matched_filter_spectra`), as
    2 (pursuit) more input channels after the others."""

    def __post_init__(self):
        if not self.kind or not isinstance(self.kind, str):
            raise ValueError(f"ModelConfig.kind = {self.kind!r}: must name a network kind (risloc.nn.networks.available())")
        if self.pursuit < 0:
            raise ValueError(f"ModelConfig.pursuit = {self.pursuit}: must be >= 0")
        if self.rank_extra < 0:
            raise ValueError(f"ModelConfig.rank_extra = {self.rank_extra}: must be >= 0")
        if self.snapshot_quantiles < 0:
            raise ValueError(f"ModelConfig.snapshot_quantiles = {self.snapshot_quantiles}: must be >= 0")

    @property
    def geometry_free(self) -> bool:
        """Whether a network of this configuration reads scenes of any geometry: a ``spectrum``
        network whose inputs do not depend on the snapshot count (``snapshot_quantiles`` > 0 or no
        snapshot channels). The others are tied to the N and L they were trained for."""
        return self.kind == "spectrum" and (self.snapshot_quantiles > 0 or not self.snapshot_channels)


@dataclass
class LossConfig:
    """Loss terms, their weights and curriculum ramps, and the effective-covariance knobs
    (defaults: the shipped ``spectrum`` model's; the covariance kinds' curricula are in their configs).

    Every auxiliary term ``t`` has ``t_weight`` (its target share of the main term when
    ``balance`` is on, a plain multiplier otherwise; 0 switches it off), ``t_start`` (epoch at
    which it switches on) and ``t_ramp`` (epochs over which its weight rises linearly to full).
    """

    # --- the effective covariance (the SAME options for loss, validation and inference) ---
    beta: float = 0.0
    """Final hybrid blend weight of the scene's own sample covariance (stage 2 on)."""
    beta_start: float = 2.0
    """Epoch at which beta starts to rise from 0 (stage 2)."""
    beta_ramp: float = 1.0
    """Epochs over which beta rises to its final value."""
    loading: float = CovarianceOptions.loading
    """Diagonal loading delta (relative to the average eigenvalue)."""
    shrinkage: float = CovarianceOptions.shrinkage
    """Strength of the SNR-aware shrinkage towards the identity."""
    regularisation: float = CovarianceOptions.regularisation
    """Relative Tikhonov term of the back-projection (sample covariance)."""

    # --- auxiliary terms -------------------------------------------------------------------
    raw_weight: float = 0.0
    raw_start: float = 0.0
    raw_ramp: float = 1.0
    k_weight: float = 0.2
    k_start: float = 0.0
    k_ramp: float = 1.0
    gap_weight: float = 0.0
    gap_start: float = 5.0
    gap_ramp: float = 1.0
    sub_weight: float = 0.0
    sub_start: float = 6.0
    sub_ramp: float = 1.0
    peak_weight: float = 0.0
    peak_start: float = 7.0
    peak_ramp: float = 1.0
    orth_weight: float = 0.0
    orth_start: float = 8.0
    orth_ramp: float = 1.0

    balance: bool = False
    """Scale each auxiliary term by EMA(main)/EMA(term) so that ``weight`` is its share of the main term."""
    balance_momentum: float = 0.99
    """Momentum of the running term magnitudes used by ``balance``."""
    uncertainty: bool = False
    """Learned homoscedastic-uncertainty weights exp(-s_t) L_t + s_t (Kendall et al., CVPR 2018) on top."""
    peak_margin: float = 0.5
    """Margin (in log units of the Capon spectrum) of the peak-contrast hinge."""
    backbone_lr_mult: float = 1.0
    """LR multiplier of everything but the K head once the K loss is on (0 freezes the backbone)."""
    main: str = "detect"
    """The main term: 'detect' (the spectrum network's detection loss,
    risloc.nn.networks.spectrum.detection_loss), 'cov' (covariance NMSE against the true R) or
    'music' (the normalised MUSIC null spectrum at the true positions, no covariance target: the
    SubspaceNet-style peer, risloc.nn.loss.music_null_loss, docs/learned-peer.md). Each network
    kind lists the terms it supports (NetworkKind.mains)."""
    music_negatives: int = 0
    """main = 'music' only: hard negatives per scene (deepest coarse-grid nulls > 6 deg from every
    source) whose null must exceed the truth's by ``peak_margin`` in log units; 0: off."""
    music_negative_weight: float = 1.0
    """main = 'music' only: weight of the hard-negative hinge inside the main term."""
    detect_sigma: float = 1.0
    """main = 'detect' only: std (grid cells) of the Gaussian heat-map targets."""
    detect_offset_weight: float = 1.0
    """main = 'detect' only: weight of the position (hit-unit Huber) loss."""
    detect_power_weight: float = 0.1
    """main = 'detect' only: weight of the log-power loss."""
    detect_cov_weight: float = 0.0
    """main = 'detect' only: weight of the covariance NMSE of the detections' factor (the 'cov'
    term, risloc.nn.loss.covariance_main_loss) added to the detection loss. 0 in the shipped run;
    the overfit probe (risloc.cli.overfit) sets it, as its stop criterion is that NMSE."""

    # --- SNR-label robustness ----------------------------------------------------------------
    snr_noise_db: float = 1.5
    """Std of Gaussian noise added to the SNR label during training (dB)."""
    snr_drop: float = 0.1
    """Probability that a training scene's SNR label is replaced by the data-only estimate."""

    def __post_init__(self):
        if self.main not in ("cov", "music", "detect"):
            raise ValueError(f"LossConfig.main = {self.main!r}: must be 'cov', 'music' or 'detect'")

    def covariance_options(self, beta: float | None = None) -> CovarianceOptions:
        """The :class:`CovarianceOptions` of the effective covariance at blend weight ``beta``."""
        return CovarianceOptions(
            beta=self.beta if beta is None else float(beta),
            loading=self.loading,
            shrinkage=self.shrinkage,
            regularisation=self.regularisation,
        )


@dataclass
class TrainConfig:
    """A training run (see docs/learned.md, 'Trainer' and 'Curriculum'). The defaults are the
    shipped model's run (configs/default.toml)."""

    seed: int = 0
    """Seed of the training scene stream (scene i of the stream is the same on every resume)."""
    val_seed: int = 1_000_003
    """Seed of the validation scenes (a different stream)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    amp: str = "auto"
    """'auto' (bf16 on CUDA, none on CPU), 'bf16', 'fp16' (CUDA only) or 'none'."""
    epochs: int = 9
    steps_per_epoch: int = 1000
    batch: int = 256
    train_scenes: int = 0
    """0: an endless simulated stream; > 0: a fixed pool of that many scenes, reused every epoch."""
    train_file: str = ""
    """Train on this scene file (HDF5, with truth) instead of simulating."""
    mix: str = ""
    """Simulate training and validation scenes from a mixture of scenarios,
    ``"FIELD=V1,V2,...;FIELD=..."`` (every combination of the values, each the [scenario] with
    those fields set, interleaved scene by scene: :class:`risloc.data.ScenarioMixture`);
    empty: the [scenario] alone."""
    geometries: str = ""
    """Train one network for a family of geometries, ``"FIELD=V1,V2,...;FIELD=..."`` over n_h, n_v,
    m_bs and snapshots (every combination, each the [scenario] with those fields set:
    :func:`risloc.data.geometry_family`); step g draws its whole batch from geometry g mod G (a batch
    has one geometry) and validation stays on the [scenario]. Needs a network that reads every
    geometry (``ModelConfig.geometry_free``: ``model.snapshot_quantiles`` > 0) and the simulated
    stream (no ``train_scenes`` pool, no ``train_file``). Empty: the [scenario]'s geometry alone."""
    second_look: float = 0.0
    """Fraction of each training batch seen as the network's second look (the ``search="network"``
    option of ``learned``; :func:`risloc.nn.train.second_look_view`): the front end cancels the
    scene's true sources but 0-2 of them, at slightly perturbed positions (with, at times, one
    spurious source), and the detection targets are the sources left; the K head is not trained
    on those scenes. 0: every scene is a first look."""
    init: str = ""
    """Start the network from this checkpoint's weights (its EMA weights where it has them) instead
    of a random initialisation: fine-tuning. A file written by ``risloc train`` or the name of a
    packaged model (e.g. ``"default"``); its [model] section must equal this run's (the optimiser,
    schedule and EMA start afresh). Empty: random initialisation."""
    val_scenes: int = 2048
    val_file: str = ""
    """Validate on this scene file instead of simulating ``val_scenes``."""
    val_batch: int = 1024
    val_locate: bool = True
    """Run MUSIC and score locations at every validation (off: NMSE and K-head metrics only)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup_steps: int = 500
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    """Clip the total gradient norm to this value (a non-finite norm skips the step)."""
    ema: float = 0.999
    """Decay of the EMA weights used for validation and saved checkpoints (0 disables)."""
    val_primary: str = "k_loc"
    """'loss' (validation covariance NMSE, lower is better) or 'k_loc' = (2 success + K_acc) / 3."""
    patience: int = 0
    """Stop after this many epochs without a better val_primary (0: never)."""
    calibrate: bool = True
    """Temperature-scale the K logits and tune the fall-back threshold at the end."""
    order_rule: str = "mdl"
    """Model-based order rule used below the calibrated-confidence threshold."""
    log_every: int = 200
    """Steps between [LR]/[GRAD]/[STEP] log lines."""
    music_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword options of music_from_covariance used by validation and inference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scenario: Scenario = field(default_factory=Scenario)

    def __post_init__(self):
        if self.val_primary not in ("loss", "k_loc"):
            raise ValueError(f"TrainConfig.val_primary = {self.val_primary!r}: must be 'loss' or 'k_loc'")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"TrainConfig.amp = {self.amp!r}: must be auto, bf16, fp16 or none")
        for name in ("epochs", "steps_per_epoch", "batch", "val_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.second_look <= 1.0:
            raise ValueError(f"TrainConfig.second_look = {self.second_look}: must be a fraction in [0, 1]")

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"train": {...}, "model": {...}, "loss": {...}, "scenario": {...}}`` (TOML-ready)."""
        train = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in _SECTIONS}
        out = {"train": train}
        for name in _SECTIONS:
            out[name] = {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
        return out

    def to_toml(self) -> str:
        d = self.to_dict()
        music = d["train"].pop("music_options")
        text = "# risloc training configuration (risloc train --config FILE)\n" + toml_dumps(d)
        if music:
            text += toml_dumps({"train.music_options": music})
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        unknown = set(data) - {"train", *_SECTIONS}
        if unknown:
            raise ValueError(f"unknown configuration table(s) {sorted(unknown)}; known: train, {', '.join(_SECTIONS)}")
        cfg = cls()
        cfg = apply_overrides(cfg, {f"{k}": v for k, v in data.get("train", {}).items()})
        for name in _SECTIONS:
            cfg = apply_overrides(cfg, {f"{name}.{k}": v for k, v in data.get(name, {}).items()})
        return cfg

    @classmethod
    def from_toml(cls, text: str) -> "TrainConfig":
        return cls.from_dict(tomllib.loads(text))

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """A training-configuration TOML file (``InputError`` naming the file if it is not TOML or not a configuration)."""
        data = read_toml(path)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None

    def covariance_options(self, beta: float | None = None):
        return self.loss.covariance_options(beta)

    def autocast_dtype(self, device) -> torch.dtype | None:
        """The mixed-precision dtype of training steps on ``device`` (``amp``: 'auto' is bfloat16 on
        CUDA and none on the CPU), or None for float32. Validation and inference run the network
        in float32 (:data:`risloc.nn.inference.INFERENCE_AUTOCAST`)."""
        device = torch.device(device)
        amp = self.amp if self.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
        if amp != "none" and device.type != "cuda":
            raise ValueError(f"TrainConfig.amp = {amp!r}: mixed precision is for CUDA only (device {device})")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


_SECTIONS = ("model", "loss", "scenario")


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    return v


def _field_map(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(obj)}


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    return coerce(f, value, f"configuration field {where!r}")


def apply_overrides(cfg: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``{"lr": 1e-3, "model.width": 64, ...}`` applied (values coerced)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    train_fields = _field_map(cfg)
    for key, value in changes.items():
        key = key.replace("-", "_")
        section, _, name = key.rpartition(".")
        if section in ("", "train"):
            if name not in train_fields or name in _SECTIONS:
                raise ValueError(f"unknown training option {key!r}; known: {sorted(set(train_fields) - set(_SECTIONS))}")
            top[name] = _coerce(train_fields[name], value, key)
        elif section in _SECTIONS:
            sub_fields = _field_map(getattr(cfg, section))
            if name not in sub_fields:
                raise ValueError(f"unknown option {key!r}; known in [{section}]: {sorted(sub_fields)}")
            nested[section][name] = _coerce(sub_fields[name], value, key)
        else:
            raise ValueError(f"unknown configuration section in {key!r}; known: train, {', '.join(_SECTIONS)}")
    for section, ch in nested.items():
        if ch:
            top[section] = dataclasses.replace(getattr(cfg, section), **ch)
    return dataclasses.replace(cfg, **top)


# ----------------------------------------------------------------------------------------------
# command-line flags generated from the dataclass fields
# ----------------------------------------------------------------------------------------------
def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--<field>`` for every TrainConfig field, ``--<section>.<field>`` for the nested ones,
    and ``--set KEY=VALUE`` (repeatable). Defaults are ``None`` (= keep the file's value)."""
    group = parser.add_argument_group("configuration (override the --config file)")
    cfg = TrainConfig()
    for f in fields(cfg):
        if f.name in _SECTIONS:
            continue
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg:{f.name}", default=None, metavar=_metavar(f), help=_help(cfg, f))
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg:{section}.{f.name}", default=None, metavar=_metavar(f), help=_help(obj, f))
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any option, e.g. --set model.width=64 (repeatable)")


def _metavar(f) -> str:
    return str(f.type if not isinstance(f.type, type) else f.type.__name__).upper().split("[")[0]


def _help(obj, f) -> str:
    return f"default {getattr(obj, f.name)!r}".replace("%", "%%")


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (or the --config file, or the defaults) with every given flag applied."""
    if base is None:
        path = getattr(args, "config", None)
        base = TrainConfig.load(path) if path else TrainConfig()
    changes: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            changes[key[4:]] = value
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not of the form KEY=VALUE")
        k, v = item.split("=", 1)
        changes[k.strip()] = v.strip()
    return apply_overrides(base, changes)
