"""The trainer: plain PyTorch, one loop, read it top to bottom (:func:`train`).

    run = train(cfg, "runs/x")          # or: risloc train --config configs/default.toml --out runs/x

Per step g (fractional epoch e = g / steps_per_epoch), in :func:`train`'s loop:
  1. batch: this rank's slice of scenes [g B, (g+1) B) of the stream ``seed``, simulated on its
     own device (or of a fixed pool / scene file, a per-epoch permutation); SNR labels jittered
     and some replaced by the data-only estimate (robustness);
  2. curriculum: beta(e) and the loss weights (risloc.nn.loss.Objective), lr(g) (linear
     warm-up, cosine decay);
  3. forward under AMP (bf16/fp16 on CUDA, fp32 on CPU) and loss in fp32/fp64; the network kind
     (risloc.nn.networks) supplies the main term;
  4. backward;
  5. gate: the total gradient norm; non-finite -> the step is skipped (no parameter, moment or
     EMA change), finite -> clipped to ``grad_clip``. Decided ON THE DEVICE (the fused AdamW's
     ``found_inf``), so the loop has no per-step host synchronisation;
  6. AdamW step; 7. EMA update;
  8. at the end of an epoch: validation of the EMA weights through the real inference path
     (risloc.nn.inference.locate_from_prediction -> risloc.metrics.score), a JSONL line in
     ``RUN/metrics.jsonl``, checkpoint selection on ``val_primary`` (``RUN/best.pt``), early stop;
  9. ``RUN/last.pt`` (everything needed to resume) at the end of every epoch, every
     ``checkpoint_every`` steps, and before a wall-clock budget runs out.
Every ``log_every`` steps: [LR], [GRAD] (total norm before clipping), [STEP] (relative
parameter change of that step) and the running loss terms (the only host syncs besides the
epoch end). At the end (of the schedule, an early stop or ``stop_after_epoch``): K-head
calibration (risloc.nn.calibrate, :func:`calibrate_checkpoint`) on the validation scenes, stored
in ``best.pt``, then ``best.pt`` exported to ``weights.pt`` (the inference-only form).

Resuming (``resume=True``) reloads ``RUN/last.pt`` and continues at its step, possibly inside an
epoch: the data stream is indexed by the global step and every other piece of state (weights,
EMA, AdamW, objective buffers, RNG, the epoch's running sums) is in the checkpoint, so a run cut
into segments gives the same weights as an uninterrupted one (bitwise on CPU; tested).
The learning rate follows the global step; a skipped step is counted and logged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import covariance as cv
from ..data import ScenarioMixture, geometry_family
from ..scenes import Scenes, Truth
from ..simulate import source_factor
from . import calibrate
from .._files import atomic_write_text
from .._provenance import git_commit
from .checkpoint import FORMAT, VERSION, export_weights, load_checkpoint, named_checkpoint, network_weights, save_checkpoint
from .config import TrainConfig
from .distributed import DEFAULT_TIMEOUT_S, Dist, parameter_digest, session
from .inference import INFERENCE_AUTOCAST, Calibration, fallback_order, locate_from_prediction
from .inputs import ModelInputs, effective, forward, prepare_inputs
from .loss import Objective, covariance_nmse, format_selftest, selftest, zero_prediction
from .networks import get_network


# ----------------------------------------------------------------------------------------------
# data: a batch = model inputs + truth
# ----------------------------------------------------------------------------------------------
def scene_source(cfg: TrainConfig) -> ScenarioMixture:
    """Where simulated training and validation scenes come from: the [scenario], or the mixture
    ``cfg.mix`` of scenarios built on it (one component when ``mix`` is empty)."""
    return ScenarioMixture(cfg.scenario, cfg.mix)


def geometry_sources(cfg: TrainConfig) -> list[ScenarioMixture]:
    """The training scene sources, one per geometry: :func:`scene_source` alone without
    ``cfg.geometries``, else one :class:`ScenarioMixture` of ``cfg.mix`` per geometry of
    :func:`risloc.data.geometry_family` (refused, naming the fields, for a network tied to one
    geometry and for a fixed pool or file)."""
    if not cfg.geometries.strip():
        return [scene_source(cfg)]
    family = geometry_family(cfg.scenario, cfg.geometries)
    if any(g != cfg.scenario for g in family) and not cfg.model.geometry_free:
        raise ValueError(f"TrainConfig.geometries = {cfg.geometries!r}: the {cfg.model.kind!r} network of this "
                         f"configuration is tied to one geometry; a network for every geometry is model.kind = "
                         f"'spectrum' with model.snapshot_quantiles > 0")
    if cfg.train_scenes > 0 or cfg.train_file:
        raise ValueError(f"TrainConfig.geometries = {cfg.geometries!r}: needs the simulated stream "
                         f"(train_scenes = 0, no train_file)")
    return [ScenarioMixture(g, cfg.mix) for g in family]


@dataclass
class Batch:
    inputs: ModelInputs
    truth: Truth
    true_factor: Tensor


def _batch_from_scenes(s: Scenes, cfg: TrainConfig) -> Batch:
    """A batch of given scenes (validation, calibration), read with their own scenario."""
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=cfg.loss.regularisation, scenario=s.scenario)
    return Batch(inputs, s.truth, source_factor(s.truth, s.scenario))


class TrainData:
    """Training batches by global step: an endless simulated stream, a fixed simulated pool or a file.

    ``cfg.batch`` B is the GLOBAL batch. With ``world`` W data-parallel ranks, rank r gets the
    slice [r b, (r+1) b) (b = B / W) of the global batch of step g, i.e. scenes
    [g B + r b, g B + (r+1) b) of the stream, and the same slice of everything drawn per global
    batch (SNR-label noise, the dropped labels, the pool order); so the union over ranks of a
    step is exactly the single-process batch. W = 1 is the single-process trainer.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, log: Callable[[str], None], *, rank: int = 0, world: int = 1):
        if cfg.batch % world:
            raise ValueError(f"TrainConfig.batch = {cfg.batch} (the global batch) is not divisible by the {world} ranks")
        self.cfg, self.device = cfg, device
        self.rank, self.world, self.local_batch = rank, world, cfg.batch // world
        self.pool: Scenes | None = None
        self.sources = geometry_sources(cfg)
        """One scene source per geometry (:func:`geometry_sources`); step g draws from source g mod G."""
        if cfg.train_file:
            from ..io import load_scenes

            self.pool = load_scenes(cfg.train_file)
            if self.pool.truth is None:
                raise ValueError(f"train_file {cfg.train_file}: has no truth group; training needs it")
        elif cfg.train_scenes > 0:
            t = time.time()
            self.pool = Scenes.cat([self.sources[0].simulate(min(4096, cfg.train_scenes - a), seed=cfg.seed, start=a, device=device)
                                    for a in range(0, cfg.train_scenes, 4096)])
            log(f"[DATA] pool of {len(self.pool)} scenes (seed {cfg.seed}) simulated in {time.time() - t:.1f} s")
        if self.pool is not None:
            self.pool = self.pool.to(device)
            self._prepared = self._prepare_pool()

    def _prepare_pool(self) -> dict:
        """Sample covariances, SNR estimates and truth factors of the whole pool, once."""
        cfg, out = self.cfg, {"factor": [], "snr": [], "est": [], "F": []}
        for a in range(0, len(self.pool), 2048):
            s = self.pool[a : a + 2048]
            S = cv.sample_covariance(s.y, s.H, s.codes, regularisation=cfg.loss.regularisation)
            out["factor"].append(S.factor)
            out["snr"].append(s.snr_db.float() if s.snr_db is not None else torch.full((len(s),), float("nan"), device=self.device))
            est = cv.estimate_snr_db(s.y, s.H, s.codes, regularisation=cfg.loss.regularisation) if cfg.loss.snr_drop > 0 else torch.zeros(len(s), device=self.device)
            out["est"].append(est.float())
            out["F"].append(source_factor(s.truth, cfg.scenario))
        return {k: torch.cat(v) for k, v in out.items()}

    def _permutation(self, epoch: int) -> Tensor:
        """The pool's order in pass ``epoch`` (a function of (seed, epoch) only; cached)."""
        if getattr(self, "_perm_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(hash((self.cfg.seed, 104729, epoch)) & 0x7FFFFFFFFFFFFFFF)
            self._perm, self._perm_epoch = torch.randperm(len(self.pool), generator=gen), epoch
        return self._perm

    def batch(self, step: int) -> Batch:
        """This rank's share (``local_batch`` scenes) of the global batch of step ``step``."""
        cfg, B, b = self.cfg, self.cfg.batch, self.local_batch
        lo = self.rank * b  # this rank's slice [lo, lo + b) of the global batch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(hash((cfg.seed, 7919, step)) & 0x7FFFFFFFFFFFFFFF)
        source = self.sources[step % len(self.sources)]
        scenario = source.base  # the batch's geometry
        if self.pool is None:
            s = source.simulate(b, seed=cfg.seed, start=step * B + lo, device=self.device)
            S = cv.sample_covariance(s.y, s.H, s.codes, regularisation=cfg.loss.regularisation)
            snr = s.snr_db.float()
            n_drop = int(round(cfg.loss.snr_drop * B))  # the first n_drop scenes of the global batch (scenes are i.i.d.)
            n_loc = min(max(n_drop - lo, 0), b)  # ... of which this many are in this rank's slice
            est = snr.clone()
            if n_loc > 0:
                est[:n_loc] = cv.estimate_snr_db(s.y[:n_loc], s.H[:n_loc], s.codes[:n_loc], regularisation=cfg.loss.regularisation).float()
            truth, F = s.truth, source_factor(s.truth, scenario)
            drop = lo + torch.arange(b, device=self.device) < n_drop
            y, H, codes = s.y, s.H, s.codes
        else:
            n = len(self.pool)
            epoch, within = divmod(step * B, n)
            idx = self._permutation(epoch)[(within + lo + torch.arange(b)) % n].to(self.device)
            p = self._prepared
            S = cv.LowRankCovariance(p["factor"][idx], torch.zeros(b, device=self.device))
            snr, est, F = p["snr"][idx], p["est"][idx], p["F"][idx]
            truth = self.pool.truth[idx]
            y, H, codes = self.pool.y[idx], self.pool.H[idx], self.pool.codes[idx]
            drop = torch.rand(B, generator=gen, device=self.device)[lo : lo + b] < cfg.loss.snr_drop
        noise = torch.randn(B, generator=gen, device=self.device)[lo : lo + b] * cfg.loss.snr_noise_db
        label_ok = torch.isfinite(snr) & ~drop
        snr_used = torch.where(label_ok, snr + noise, est)
        inputs = ModelInputs(S, snr_used, label_ok.float(), y, H, codes, scenario=None if scenario == cfg.scenario else scenario)
        if cfg.second_look > 0:
            inputs, truth = second_look_view(inputs, truth, scenario, cfg.second_look, gen, start=lo, total=B)
            F = source_factor(truth, scenario)
        return Batch(inputs, truth, F)


SECOND_LOOK_LEFT = 3
"""Sources a second-look training scene leaves uncancelled: uniform on 0 .. SECOND_LOOK_LEFT - 1 (at most K)."""
SECOND_LOOK_JITTER = (math.radians(0.5), math.radians(0.5), 0.03)
"""Standard deviations of the perturbation of a cancelled source: phi, theta (rad) and r (relative),
about the errors a few Fisher-scoring steps leave at 10-20 dB, and larger."""
SECOND_LOOK_SPURIOUS = 0.3
"""Probability that a second-look training scene also cancels one spurious source (uniform in the prior box)."""


def second_look_view(inputs: ModelInputs, truth: Truth, scenario, fraction: float, gen: torch.Generator, *,
                     start: int = 0, total: int | None = None) -> tuple[ModelInputs, Truth]:
    """A batch as the network's second look sees it (``TrainConfig.second_look``; inference:
    :func:`risloc.nn.inference.second_look`).

    Each scene is a second look with probability ``fraction``. There, all true sources but
    0 .. SECOND_LOOK_LEFT - 1 of them (chosen at random) are *found*: their steering vectors, at
    positions perturbed by SECOND_LOOK_JITTER, strongest first, and with probability
    SECOND_LOOK_SPURIOUS one spurious source after them, become ``inputs.cancel`` (the front end
    cancels them as its first pursuit picks; the rows after them are zero: its own picks, as at
    inference). The returned truth keeps only the sources left, so that the detection loss teaches
    the network to find what the found sources do not explain; a scene whose cancel rows are all
    zero is a first look with its full truth. Draws from ``gen`` (the batch's generator) for the
    ``total`` scenes of the global batch and uses those of this rank's slice, from ``start``."""
    from .. import physics

    B, K = truth.phi.shape
    dev = truth.phi.device
    total = B if total is None else total
    rand = lambda *shape: torch.rand(total, *shape[1:], generator=gen, device=dev)[start : start + B]
    randn = lambda *shape: torch.randn(total, *shape[1:], generator=gen, device=dev)[start : start + B]
    k_true = truth.K.to(dev, torch.int64)
    slot = torch.arange(K, device=dev).view(1, -1)
    active = slot < k_true.view(-1, 1)
    seen = rand(B) < fraction
    n_left = torch.where(seen, torch.minimum((rand(B) * SECOND_LOOK_LEFT).long(), k_true), k_true)
    rank = torch.argsort(torch.argsort(torch.where(active, rand(B, K), 2.0), dim=1), dim=1)  # a random order, active first
    left = active & (rank < n_left.view(-1, 1))
    found = active & ~left
    # the found sources as a refinement leaves them, strongest first
    jitter = torch.tensor(SECOND_LOOK_JITTER, device=dev)
    phi = torch.nan_to_num(truth.phi.to(dev).float()) + jitter[0] * randn(B, K)
    theta = torch.nan_to_num(truth.theta.to(dev).float()) + jitter[1] * randn(B, K)
    r = torch.nan_to_num(truth.r.to(dev).float(), nan=1.0) * (1 + jitter[2] * randn(B, K)).clamp(min=0.5)
    a = physics.steering(phi, theta, r, scenario, dtype=torch.complex64)  # [B, K, N]
    power = torch.nan_to_num(truth.power.to(dev).float())
    by_power = torch.argsort(torch.where(found, -power, torch.inf), dim=1)
    a = torch.gather(a, 1, by_power.unsqueeze(-1).expand_as(a))
    n_found = found.sum(1)
    rows = torch.arange(K + 1, device=dev).view(1, -1)
    cancel = torch.where((rows[:, :K] < n_found.view(-1, 1)).unsqueeze(-1), a, torch.zeros_like(a))
    cancel = torch.cat([cancel, torch.zeros_like(cancel[:, :1])], 1)  # [B, K + 1, N]
    sc = scenario
    u = math.sin(sc.phi_min) + rand(B) * (math.sin(sc.phi_max) - math.sin(sc.phi_min))
    v = math.sin(sc.theta_min) + rand(B) * (math.sin(sc.theta_max) - math.sin(sc.theta_min))
    rho = 1 / sc.r_max + rand(B) * (1 / sc.r_min - 1 / sc.r_max)
    spurious = physics.steering(torch.asin(u), torch.asin(v), 1 / rho, scenario, dtype=torch.complex64)  # [B, N]
    put = (seen & (rand(B) < SECOND_LOOK_SPURIOUS)).view(-1, 1) & (rows == n_found.view(-1, 1))
    cancel = torch.where(put.unsqueeze(-1), spurious.unsqueeze(1), cancel)
    # the truth of what is left, its sources first
    keep = torch.argsort(torch.where(seen.view(-1, 1), torch.where(left, rank, rank + K), slot), dim=1)  # first looks: as they were
    nan = torch.tensor(float("nan"), device=dev)
    take = lambda t: torch.where(slot < n_left.view(-1, 1), torch.gather(t.to(dev), 1, keep), nan)
    rest = dataclasses.replace(truth, K=n_left.to(truth.K.dtype), phi=take(truth.phi), theta=take(truth.theta), r=take(truth.r),
                               power=take(truth.power), covariance=None)
    return dataclasses.replace(inputs, cancel=cancel), rest


# ----------------------------------------------------------------------------------------------
# optimisation pieces
# ----------------------------------------------------------------------------------------------
class WarmupCosine:
    """lr(step) = lr * (step + 1) / warmup during warm-up, then cosine decay to ``min_lr`` at
    ``total``; ``step`` is the global training step."""

    def __init__(self, lr: float, min_lr: float, warmup: int, total: int):
        self.base, self.min, self.warmup, self.total, self.step = lr, min_lr, warmup, max(total, 1), 0

    def lr(self) -> float:
        s = self.step
        if s < self.warmup:
            return self.base * (s + 1) / self.warmup
        t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.min + 0.5 * (self.base - self.min) * (1 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_optimizer(model: torch.nn.Module, objective: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW on the network kind's parameter groups (:meth:`NetworkKind.parameter_groups`;
    roles 'backbone' and 'k'); the objective's own parameters (uncertainty weights) join the
    first non-decayed backbone group. Fused, so that the gradient gate can skip a step on the
    device (``found_inf``)."""
    groups = get_network(cfg.model.kind).parameter_groups(model, cfg.weight_decay)
    extra = list(objective.parameters())
    if extra:
        target = next(g for g in groups if g["role"] == "backbone" and g["weight_decay"] == 0.0)
        target["params"] = list(target["params"]) + extra
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def gated_step(params: list[Tensor], optimizer: torch.optim.Optimizer, grad_clip: float, scaler=None) -> tuple[Tensor, Tensor]:
    """THE gradient gate, without a host synchronisation. Returns ``(finite, norm)`` (0-d device
    tensors; the norm is taken before clipping).

    norm = |all gradients|_2; a non-finite norm skips the step (``optimizer.found_inf`` = 1:
    the fused AdamW leaves parameters, moments and its step count untouched), a finite one is
    clipped to ``grad_clip``. Under data parallelism the gradients are already averaged over the
    ranks (a non-finite gradient on one rank makes the average non-finite on all), so every rank
    takes the same decision without a collective. With an fp16 ``scaler`` the scaler's own
    skip applies (it unscales first)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool), torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    finite = torch.isfinite(norm)
    if grad_clip > 0:
        coef = torch.where(finite, (grad_clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf = (~finite).to(torch.float32)
        optimizer.step()
        optimizer.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    return finite, norm


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, n_steps: int, finite: Tensor | None = None) -> None:
    """ema <- ema + w (model - ema), w = 1 - min(decay, (1 + n) / (10 + n)); w = 0 where ``finite`` is False."""
    w = 1 - min(decay, (1 + n_steps) / (10 + n_steps))
    e = list(ema.parameters())
    m = [p.detach() for p in model.parameters()]
    if finite is None:
        torch._foreach_lerp_(e, m, w)
        return
    diff = torch._foreach_sub(m, e)
    torch._foreach_mul_(diff, finite.to(e[0].dtype) * w)
    torch._foreach_add_(e, diff)


# ----------------------------------------------------------------------------------------------
# validation: the real inference path
# ----------------------------------------------------------------------------------------------
def k_loc(success: float, k_acc: float) -> float:
    """The 'k_loc' selection metric: (2 success + K_acc) / 3 (higher is better)."""
    return (2 * success + k_acc) / 3


@torch.no_grad()
def validate(model, scenes: Scenes, cfg: TrainConfig, options: cv.CovarianceOptions, calibration: Calibration,
             *, with_locations: bool = True, progress: bool = False) -> tuple[dict, Tensor, Tensor]:
    """Validation metrics, K logits and fall-back K (for calibration) on ``scenes``, in batches
    of ``cfg.val_batch`` (``progress``: a tqdm bar over the scenes on stderr)."""
    from ..metrics import score

    model.eval()
    nmse, logits, ests, fbs = [], [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(scenes), desc="validate", unit="scene", leave=False)
    for a in range(0, len(scenes), cfg.val_batch):
        s = scenes[a : a + cfg.val_batch]
        b = _batch_from_scenes(s, cfg)
        pred = forward(model, b.inputs, options, INFERENCE_AUTOCAST)  # the precision of inference
        R_true = effective(b.true_factor, b.inputs, options)
        nmse.append(covariance_nmse(pred.covariance, R_true, effective(zero_prediction(b.true_factor), b.inputs, options)))
        logits.append(pred.k_logits.float())
        if with_locations:
            ests.append(locate_from_prediction(pred, b.inputs, options, s.scenario, calibration, cfg.music_options))
        if cfg.calibrate:
            try:
                fbs.append(fallback_order(b.inputs, options, s.scenario, cfg.order_rule))
            except ImportError:
                pass
        if bar is not None:
            bar.update(len(s))
    if bar is not None:
        bar.close()
    model.train()
    logits = torch.cat(logits)
    K = scenes.truth.K.to(logits.device)
    temp = calibration.temperature
    m = {
        "val_nmse": float(torch.cat(nmse).mean()),
        "val_k_nll": calibrate.nll(logits, K, temp),
        "val_k_acc_head": float(((logits.argmax(-1) + 1) == K).float().mean()),
    }
    if with_locations:
        est = type(ests[0]).cat(ests)
        o = score(scenes.truth, est, snr_db=scenes.snr_db).overall
        m.update(K_acc=o.K_acc, K_under=o.K_under, K_over=o.K_over, success=o.success,
                 rmse_phi_deg=o.rmse_phi_deg, rmse_theta_deg=o.rmse_theta_deg, rmse_r_m=o.rmse_r_m, n_pairs=o.n_pairs)
        m["k_loc"] = k_loc(o.success, o.K_acc)
    fb = torch.cat(fbs) if fbs else None
    return m, logits, fb


def _primary(m: dict, cfg: TrainConfig) -> float:
    """Higher is better."""
    return -m["val_nmse"] if cfg.val_primary == "loss" or "k_loc" not in m else m["k_loc"]


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
class _Step(torch.nn.Module):
    """One forward of the training step, network (under AMP) + objective, as a module so that
    DistributedDataParallel can wrap both (the objective's uncertainty weights are parameters too)."""

    def __init__(self, model: torch.nn.Module, objective: Objective, device_type: str, amp_dtype):
        super().__init__()
        self.model, self.objective, self.device_type, self.amp_dtype = model, objective, device_type, amp_dtype

    def forward(self, inputs: ModelInputs, options: cv.CovarianceOptions, truth: Truth, true_factor: Tensor, epoch: float):
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.model(inputs, options)
        return self.objective(pred, inputs, options, truth, true_factor, epoch)


@dataclass
class Progress:
    """Where a run stands: the next global step, checkpoint selection, and the running sums of
    the epoch in progress (device tensors; read only when logged)."""

    step: int = 0
    best: float = -math.inf
    bad_epochs: int = 0
    sums: dict | None = None
    counts: dict | None = None
    skipped: Tensor | None = None
    epoch_time: float = 0.0
    last_metrics: dict | None = None

    def reset_epoch(self, device) -> None:
        self.sums, self.counts, self.skipped, self.epoch_time = {}, {}, torch.zeros((), device=device), 0.0

    def to_dict(self, steps_per_epoch: int) -> dict:
        """``epoch`` (the next one), ``step`` (the next one), ``best``, ``bad_epochs`` and, inside an
        epoch, its running sums (``epoch_sums``, ``epoch_counts``, ``epoch_skipped``, ``epoch_time``)."""
        d = {"epoch": self.step // steps_per_epoch, "step": self.step, "best": self.best, "bad_epochs": self.bad_epochs}
        if self.step % steps_per_epoch:
            d.update(epoch_sums={t: v.detach().cpu() for t, v in self.sums.items()},
                     epoch_counts={t: v.detach().cpu() for t, v in self.counts.items()},
                     epoch_skipped=self.skipped.detach().cpu(), epoch_time=self.epoch_time)
        return d

    @classmethod
    def from_dict(cls, d: dict, steps_per_epoch: int, device) -> "Progress":
        p = cls(step=int(d.get("step", int(d["epoch"]) * steps_per_epoch)), best=float(d["best"]), bad_epochs=int(d["bad_epochs"]))
        p.reset_epoch(device)
        if p.step % steps_per_epoch:  # inside an epoch: its running sums go on
            p.sums = {t: v.to(device) for t, v in d.get("epoch_sums", {}).items()}
            p.counts = {t: v.to(device) for t, v in d.get("epoch_counts", {}).items()}
            p.skipped = d["epoch_skipped"].to(device) if "epoch_skipped" in d else p.skipped
            p.epoch_time = float(d.get("epoch_time", 0.0))
        return p


@dataclass
class _Run:
    """The pieces of a training run that the helpers of the loop share."""

    cfg: TrainConfig
    out: Path
    dist: Dist
    model: torch.nn.Module
    ema: torch.nn.Module | None
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: object
    prog: Progress
    calibration: Calibration
    data: "TrainData"
    val_scenes: Scenes | None
    commit: str
    log: Callable[[str], None]


@dataclass
class _Budget:
    """The wall-clock budget of this command: stop (with a resumable checkpoint) while the
    slowest step, save and validation seen so far still fit."""

    seconds: float | None
    t0: float
    every: int
    slowest_step: float = 0.0
    slowest_save: float = 2.0
    slowest_val: float = 0.0

    def exhausted(self, next_ends_epoch: bool) -> bool:
        if self.seconds is None:
            return False
        reserve = (self.every + 1) * self.slowest_step + 2 * self.slowest_save + (self.slowest_val if next_ends_epoch else 0.0)
        return time.monotonic() - self.t0 + reserve > self.seconds


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = False,
    stop_after_epoch: int | None = None,
    val_scenes: Scenes | None = None,
    stop_when: Callable[[dict], bool | str] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    dist_timeout_s: float = DEFAULT_TIMEOUT_S,
    time_budget_s: float | None = None,
    checkpoint_every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train, validate, checkpoint and calibrate; returns the final summary (also in RUN/summary.json).

    ``stop_after_epoch`` ends the run after that epoch as if stopped there (``last.pt`` resumes
    it), then calibrates ``best.pt`` and exports ``weights.pt`` as at the end of the schedule;
    ``val_scenes`` replaces the simulated validation set (the overfit probe);
    ``stop_when(metrics)`` returning True or a non-empty reason ends training after that epoch,
    logged as ``[STOP] <reason> after epoch N`` ("target reached" for True) (then calibration and
    export as usual); ``on_epoch(epoch, record)`` is called
    after each epoch's validation and checkpoints with that epoch's metrics.jsonl record; an
    exception it raises (e.g. ``optuna.TrialPruned``) ends the run and propagates.

    ``time_budget_s``: wall-clock seconds this call may take (from its start); before they run
    out it writes ``RUN/last.pt`` at the current step and returns ``{"stopped": "time_budget",
    "step": ...}``; ``resume=True`` continues exactly there. ``checkpoint_every``: also write
    ``last.pt`` every that many steps (0: at epoch ends only). ``on_step(step)`` is called after
every optimiser step with the number of steps done (benchmarks/bench_train_scaling.py times the
loop with it).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel
    (:mod:`risloc.nn.distributed`, docs/training-at-scale.md): ``cfg.batch`` is the global batch,
    split evenly over the ranks; rank 0 validates, writes checkpoints and logs, calls
    ``on_epoch`` and calibrates; every rank returns the same summary. ``dist_timeout_s`` bounds
    every wait for another rank.
    """
    t_start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state, note = None, None
    if resume:  # the checkpoint's configuration wins (other flags given with --resume are ignored)
        state = load_checkpoint(out / "last.pt")
        saved = TrainConfig.from_toml(state["config"])
        if saved.to_dict() != cfg.to_dict():
            note = "[RESUME] note: the configuration differs from the checkpoint's; using the checkpoint's"
            cfg = saved
    with session(cfg.device, timeout_s=dist_timeout_s) as (dist, device):
        if not dist.is_main:
            log, progress = (lambda s: None), False
        if note:
            log(note)
        budget = _Budget(time_budget_s, t_start, every=10 if dist.enabled else 1)

        # --- model, EMA, objective, optimiser, schedule, data, validation scenes ------------------------
        amp_dtype, amp = _amp(cfg, device)
        torch.manual_seed(cfg.seed)
        kind = get_network(cfg.model.kind)
        model = kind.build(cfg.scenario, cfg.model).to(device)
        if cfg.init and state is None:
            log(_initialise(model, cfg))
        ema = copy.deepcopy(model) if cfg.ema > 0 else None
        objective = Objective(cfg.loss, cfg.scenario, kind).to(device)
        optimizer = make_optimizer(model, objective, cfg)
        spe, total = cfg.steps_per_epoch, cfg.epochs * cfg.steps_per_epoch
        schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, total)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        calibration = Calibration(order_rule=cfg.order_rule)
        prog = Progress()
        prog.reset_epoch(device)
        if state is not None:
            prog = _restore(state, model, ema, objective, optimizer, schedule, scaler, device, spe)
            log(f"[RESUME] from {out / 'last.pt'} at step {prog.step} (epoch {prog.step // spe})")
        _start_metrics(out, dist, prog.step // spe, resume=state is not None)
        stepper = _data_parallel(_Step(model, objective, device.type, amp_dtype), objective, dist)
        data = TrainData(cfg, device, log, rank=dist.rank, world=dist.world)
        val_scenes = _validation_scenes(cfg, val_scenes, device, log) if dist.is_main else None
        running = [b for b in objective.buffers() if b.is_floating_point()]
        commit = git_commit()
        log(f"[RUN] device={device} amp={amp} kind={kind.name} params={sum(p.numel() for p in model.parameters())} seed={cfg.seed}"
            f" git={commit} out={out}" + (f" world={dist.world} backend={dist.backend} batch={cfg.batch} ({data.local_batch} per rank)"
                                          if dist.enabled else ""))
        run = _Run(cfg, out, dist, model, ema, objective, optimizer, schedule, scaler, prog, calibration, data, val_scenes, commit, log)

        # --- the loop -----------------------------------------------------------------------------------
        model.train()
        summary: dict = {}
        bar = _progress_bar(progress, prog.step, total)
        while prog.step < total:
            g = prog.step
            t_step = time.monotonic()
            e = g / spe
            batch = data.batch(g)                                                   # 1. this rank's slice
            options = cfg.covariance_options(objective.beta(e))                     # 2. curriculum
            schedule.step = g
            lr = _set_lr(optimizer, schedule.lr(), objective.weights(e)["k"] > 0, cfg)
            loss, parts = stepper(batch.inputs, options, batch.truth, batch.true_factor, e)  # 3. forward + loss
            (scaler.scale(loss) if scaler is not None else loss).backward()         # 4. backward
            dist.average_(running)  # the running term magnitudes: the same on every rank (an all-reduce, no host sync)
            log_now = (g + 1) % cfg.log_every == 0 or (g + 1) % spe == 0
            before = [p.detach().clone() for p in model.parameters()] if log_now else None
            finite, norm = gated_step(params, optimizer, cfg.grad_clip, scaler)     # 5. gate + 6. AdamW step
            if ema is not None:
                ema_update(ema, model, cfg.ema, g + 1, finite)                      # 7. EMA
            _accumulate(prog, parts, finite)
            prog.step = g + 1
            if on_step is not None:
                on_step(prog.step)
            if log_now:
                _log_step(run, g, lr, options.beta, norm, finite, loss, before)
            if bar is not None:
                bar.update(1)
            budget.slowest_step = max(budget.slowest_step, time.monotonic() - t_step)
            prog.epoch_time += time.monotonic() - t_step

            if prog.step % spe == 0:                                                 # 8. validate, select, save
                epoch = prog.step // spe - 1
                t_val = time.monotonic()
                action, summary, error = _end_epoch(run, epoch, stop_after_epoch, stop_when, on_epoch)
                budget.slowest_val = max(budget.slowest_val, time.monotonic() - t_val)
                if action == "error":
                    if error is not None:
                        raise error
                    raise RuntimeError(f"rank {dist.rank}: stopping, rank 0 raised after epoch {epoch}")
                if action == "return":
                    break
                if action == "stop":
                    break
                prog.reset_epoch(device)
            elif checkpoint_every > 0 and prog.step % checkpoint_every == 0 and dist.is_main:  # 9. periodic save
                t_save = time.monotonic()
                _save(run, out / "last.pt", objective.beta(prog.step / spe))
                budget.slowest_save = max(budget.slowest_save, time.monotonic() - t_save)
            if (budget.seconds is not None and prog.step < total and prog.step % budget.every == 0
                    and dist.any_(budget.exhausted((prog.step + 1) % spe == 0))):
                if dist.is_main:
                    _save(run, out / "last.pt", objective.beta(prog.step / spe))
                log(f"[BUDGET] {time.monotonic() - t_start:.0f} s of {time_budget_s:g} s used: saved {out / 'last.pt'} at step"
                    f" {prog.step}; continue with --resume")
                return {**summary, "stopped": "time_budget", "step": prog.step}

        # --- at the end, an early stop or stop_after_epoch: calibration of the K head on the validation
        # scenes, stored in best.pt, then best.pt -> weights.pt ------------------------------------------------
        if dist.is_main:
            if cfg.calibrate and (out / "best.pt").exists():
                summary["calibration"] = calibrate_checkpoint(out / "best.pt", val_scenes, log=log)
            _export(out, log)
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        return dist.broadcast(summary)


# ----------------------------------------------------------------------------------------------
# helpers of the loop
# ----------------------------------------------------------------------------------------------
def _amp(cfg: TrainConfig, device: torch.device):
    """``(autocast dtype or None, name)``; also sets the CPU threads and cuDNN autotuning."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.autocast_dtype(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    return dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none")


INIT_FREE_FIELDS = ("snapshot_quantiles", "coherent")
"""[model] fields in which a fine-tuning run (``TrainConfig.init``) may differ from the checkpoint it
starts from: what the snapshot channels hold (one per snapshot, or as many quantiles over the
snapshots), not the network; the weights must still fit (e.g. 16 quantiles in place of 16 snapshots);
and the coherent spectra (``coherent``): a network without them gets them as new input channels
of its stem with zero weights, so that it starts as the network it was."""


def _initialise(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """Load the network weights of ``cfg.init`` (a checkpoint file or a packaged model's name) into
    ``model`` (fine-tuning): its EMA weights where it has them. A ValueError naming
    ``TrainConfig.init`` when its [model] section differs from ``cfg.model`` (but in
    :data:`INIT_FREE_FIELDS`) or its weights do not fit (another geometry). Returns the log line."""
    path = named_checkpoint(cfg.init, "TrainConfig.init =")
    state = load_checkpoint(path)
    theirs = TrainConfig.from_toml(state["config"]).model
    differ = [f.name for f in dataclasses.fields(theirs)
              if getattr(theirs, f.name) != getattr(cfg.model, f.name) and f.name not in INIT_FREE_FIELDS]
    if differ:
        raise ValueError(f"TrainConfig.init = {cfg.init!r}: its [model] differs from this run's in {differ}")
    weights = dict(network_weights(state))
    if cfg.model.coherent and not theirs.coherent and "stem.weight" in weights:
        w = weights["stem.weight"]  # [out, c_in, 3, 3, 3]: the coherent channels come last, with zero weights
        extra = model.stem.weight.shape[1] - w.shape[1]
        weights["stem.weight"] = torch.cat([w, w.new_zeros(w.shape[0], max(extra, 0), *w.shape[2:])], 1)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"TrainConfig.init = {cfg.init!r}: its weights do not fit this run's network "
                         f"(another scenario geometry, or another number of snapshot channels: model.snapshot_quantiles "
                         f"= {cfg.model.snapshot_quantiles} against {theirs.snapshot_quantiles}?; a network with the coherent "
                         f"spectra cannot drop them: model.coherent = {cfg.model.coherent} against {theirs.coherent}): "
                         f"{str(err).splitlines()[-1].strip()}") from None
    return f"[INIT] network weights from {path}"


def _restore(state, model, ema, objective, optimizer, schedule, scaler, device, spe) -> Progress:
    """Load a ``last.pt`` into the run's pieces; returns its :class:`Progress`."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # checkpoints of earlier versions stored a non-fused AdamW
        group["fused"], group["foreach"] = True, None
    schedule.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    prog = Progress.from_dict(state["progress"], spe, device)
    prog.last_metrics = state.get("metrics")
    return prog


def _start_metrics(out: Path, dist: Dist, epoch: int, *, resume: bool) -> None:
    """``RUN/metrics.jsonl``: emptied for a new run; on resume, lines of epochs >= ``epoch`` dropped."""
    if not dist.is_main:
        return
    path = out / "metrics.jsonl"
    if resume and path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < epoch]
        path.write_text("".join(ln + "\n" for ln in lines))
    elif not resume:
        path.write_text("")


def _data_parallel(stepper: torch.nn.Module, objective: Objective, dist: Dist) -> torch.nn.Module:
    """The step module, wrapped in DistributedDataParallel under torchrun.

    find_unused_parameters only while some parameters get no gradient: the K head before its
    loss term switches on (``k_weight`` 0 or ``k_start`` > 0); with every parameter in the graph
    from the first step (the shipped configuration) DDP does no graph traversal. broadcast_buffers
    off: the balancer's running magnitudes are averaged after each step instead."""
    if not dist.enabled:
        return stepper
    from torch.nn.parallel import DistributedDataParallel

    unused = objective.weights(0.0)["k"] <= 0
    with warnings.catch_warnings():  # torch >= 2.13 renames broadcast_buffers; the old name works on 2.x
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(stepper, device_ids=None, broadcast_buffers=False, find_unused_parameters=unused,
                                       gradient_as_bucket_view=True)


def validation_scenes(cfg: TrainConfig, n: int | None = None, *, device="cpu") -> Scenes:
    """The trainer's validation scenes of ``cfg``: the first ``n`` (default ``cfg.val_scenes``)
    scenes of the stream ``cfg.val_seed`` (risloc.seeds.TRAINING_VALIDATION_SEED by default),
    or of the scene file ``cfg.val_file`` (all of it by default). Checkpoint selection during
    training and the K-head calibration (:func:`calibrate_checkpoint`, ``risloc calibrate``)
    both read these scenes."""
    if n is not None and n < 1:
        raise ValueError(f"validation scenes: n = {n}, must be >= 1")
    if cfg.val_file:
        from ..io import load_scenes

        scenes = load_scenes(cfg.val_file)
        if n is not None:
            if n > len(scenes):
                raise ValueError(f"validation scenes: n = {n}, but val_file {cfg.val_file} holds {len(scenes)}")
            scenes = scenes[:n]
        return scenes.to(device)
    return scene_source(cfg).simulate(cfg.val_scenes if n is None else n, seed=cfg.val_seed, device=device)


def _validation_scenes(cfg: TrainConfig, scenes: Scenes | None, device, log) -> Scenes:
    """The validation scenes (given, or :func:`validation_scenes`); logs the loss self-test on them."""
    scenes = (scenes if scenes is not None else validation_scenes(cfg, device=device)).to(device)
    vb = _batch_from_scenes(scenes[: min(256, len(scenes))], cfg)
    for b in sorted({0.0, cfg.loss.beta}):
        log(format_selftest(selftest(vb.inputs, vb.true_factor, cfg.covariance_options(b))) + f" beta={b:g}")
    return scenes


def _progress_bar(progress: bool, start: int, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, leave=False, desc="train")


def _set_lr(optimizer, lr: float, k_on: bool, cfg: TrainConfig) -> float:
    """Every group gets ``lr``; the backbone groups x ``backbone_lr_mult`` once the K term is on."""
    for group in optimizer.param_groups:
        group["lr"] = lr * (cfg.loss.backbone_lr_mult if (group["role"] == "backbone" and k_on) else 1.0)
    return lr


def _accumulate(prog: Progress, parts: dict[str, Tensor], finite: Tensor) -> None:
    """Add the step's loss terms to the epoch's running sums (skipped steps count as skipped)."""
    w = finite.to(torch.float64)
    for t, v in parts.items():
        v = torch.where(finite, v.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=v.device))
        prog.sums[t] = prog.sums.get(t, 0) + v
        prog.counts[t] = prog.counts.get(t, 0) + w
    prog.skipped = prog.skipped + (~finite).to(prog.skipped.dtype)


def _log_step(run: _Run, g: int, lr: float, beta: float, norm: Tensor, finite: Tensor, loss: Tensor, before: list[Tensor]) -> None:
    """The [LR], [GRAD], [STEP] lines (host syncs: only here, every ``log_every`` steps), [SKIP] if the step was skipped."""
    log, model, prog, cfg, dist, scaler = run.log, run.model, run.prog, run.cfg, run.dist, run.scaler
    if not bool(finite):
        log(f"[SKIP] step {g}: non-finite gradient norm ({float(norm)}); no update"
            + (f", fp16 scale -> {scaler.get_scale():g}" if scaler is not None else ""))
    after = list(model.parameters())
    dp = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a.detach() - b) for a, b in zip(after, before)]))
    pn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in before]))
    terms = " ".join(f"{t}={float(v) / max(float(prog.counts[t]), 1.0):.4g}" for t, v in prog.sums.items())
    log(f"[LR] step {g} lr={lr:.3e} beta={beta:.3f}")
    log(f"[GRAD] step {g} norm={float(norm):.4g} clip={cfg.grad_clip:g} skipped_this_epoch={int(prog.skipped)}")
    log(f"[STEP] step {g} dparam={float(dp / pn):.3e} loss={float(loss.detach()):.4g} {terms}" + (" (rank 0's share)" if dist.enabled else ""))


def _save(run: _Run, path: Path, beta: float, digests: dict | None = None) -> None:
    """A resumable checkpoint (risloc.nn.checkpoint documents the fields)."""
    cfg, model, ema, scaler, prog = run.cfg, run.model, run.ema, run.scaler, run.prog
    rng = {"torch": torch.get_rng_state()}
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    ckpt = {
        "format": FORMAT, "version": VERSION,
        "config": cfg.to_toml(), "scenario": cfg.scenario.to_toml(),
        "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "objective": run.objective.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": {"step": prog.step},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng, "progress": prog.to_dict(cfg.steps_per_epoch),
        "metrics": prog.last_metrics or {}, "calibration": run.calibration.to_dict(), "beta": beta, "seed": cfg.seed, "git": run.commit,
    }
    if digests is not None:
        ckpt["distributed"] = digests
    save_checkpoint(path, ckpt)


def _end_epoch(run: _Run, epoch: int, stop_after_epoch, stop_when, on_epoch):
    """Epoch means over all ranks, rank 0's validation, checkpoint selection and saves, and the
    continue/stop decision every rank takes: ``(action, summary, error)``."""
    cfg, out, dist, model, ema, prog, log = run.cfg, run.out, run.dist, run.model, run.ema, run.prog, run.log
    sums = dict(prog.sums)
    digests = None
    if dist.enabled:
        keys = sorted(sums)
        vals = [sums[t].reshape(1).clone() for t in keys]
        dist.average_(vals)
        sums = {t: v.reshape(()) for t, v in zip(keys, vals)}
        digests = {"world": dist.world, "local_batch": run.data.local_batch, "param_digests": dist.gather(parameter_digest(model)),
                   "ema_digests": dist.gather(parameter_digest(ema)) if ema is not None else []}
        if len(set(digests["param_digests"])) > 1 or len(set(digests["ema_digests"])) > 1:
            log(f"[DDP] WARNING: the ranks' parameters differ after epoch {epoch}: {digests}")
    action, error, summary = "next", None, {}
    if dist.is_main:
        beta_now = run.objective.beta((epoch + 1) * 1.0)
        t0 = time.monotonic()
        metrics, _, _ = validate(ema if ema is not None else model, run.val_scenes, cfg, cfg.covariance_options(beta_now),
                                 run.calibration, with_locations=cfg.val_locate)
        metrics.update({f"train_{t}": float(v) / max(float(prog.counts[t]), 1.0) for t, v in sums.items()})
        primary = _primary(metrics, cfg)
        primary_name = cfg.val_primary if "k_loc" in metrics else "loss"  # k_loc needs located scenes
        improved = primary > prog.best
        if improved:
            prog.best, prog.bad_epochs = primary, 0
        else:
            prog.bad_epochs += 1
        prog.last_metrics = metrics
        skipped = int(prog.skipped)
        run.schedule.step = prog.step
        record = {"epoch": epoch, "step": prog.step, "opt_steps": prog.step - skipped, "skipped": skipped, "beta": beta_now,
                  "lr": run.schedule.lr(),
                  "time_s": round(prog.epoch_time + time.monotonic() - t0, 3), "seed": cfg.seed, "git": run.commit,
                  **metrics, "val_primary": primary_name, "primary": primary, "best": prog.best}
        if dist.enabled:
            record["world"] = dist.world
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        loc = (f" K_acc={metrics['K_acc']:.3f} K_under={metrics['K_under']:.3f} K_over={metrics['K_over']:.3f} success={metrics['success']:.3f}"
               f" rmse_phi={metrics['rmse_phi_deg']:.3g}deg rmse_theta={metrics['rmse_theta_deg']:.3g}deg rmse_r={metrics['rmse_r_m']:.3g}m"
               if "success" in metrics else "")
        log(f"[VAL] epoch {epoch} nmse={metrics['val_nmse']:.4f} k_nll={metrics['val_k_nll']:.3f}{loc} {primary_name}={primary:.4f}"
            f"{' *best*' if improved else ''} ({record['time_s']:.1f} s)")
        summary = record
        for name in ("last.pt",) + (("best.pt",) if improved else ()):
            _save(run, out / name, beta_now, digests)
        try:
            if on_epoch is not None:
                on_epoch(epoch, dict(record))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, after the other ranks know
            action, error = "error", exc
        if action == "next":
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                log(f"[STOP] stopping after epoch {epoch} as asked")
                action = "return"
            elif stop_when is not None and (why := stop_when(metrics)):
                log(f"[STOP] {why if isinstance(why, str) else 'target reached'} after epoch {epoch}")
                action = "stop"
            elif cfg.patience > 0 and prog.bad_epochs >= cfg.patience:
                log(f"[STOP] no better {cfg.val_primary} for {prog.bad_epochs} epochs; early stop")
                action = "stop"
    # ranks 1.. wait here for rank 0's validation; everyone takes rank 0's decision (and its selection state)
    action, summary, what, best = dist.broadcast((action, summary, repr(error) if error is not None else "", (prog.best, prog.bad_epochs)))
    prog.best, prog.bad_epochs = best
    return action, summary, error


def _export(out: Path, log: Callable[[str], None]) -> None:
    """RUN/weights.pt: the inference-only form of RUN/best.pt (what the package ships)."""
    if (out / "best.pt").exists():
        export_weights(out / "best.pt", out / "weights.pt")
        log(f"[EXPORT] {out / 'weights.pt'}: inference-only weights of best.pt ({(out / 'weights.pt').stat().st_size / 2**20:.1f} MiB)")


CALIBRATION_METRICS = ("val_k_nll", "K_acc", "success")
"""The validation metrics :func:`calibrate_checkpoint` records before (``uncalibrated_*``) and
after (``calibrated_*``) the fit, with ``calibration_scenes``, in the checkpoint's ``metrics``."""


def calibrate_checkpoint(path: str | os.PathLike, scenes: Scenes, *, log: Callable[[str], None] = print,
                         progress: bool = False, batch: int | None = None) -> dict:
    """Fit T and tau of the checkpoint ``path`` (``best.pt`` or an exported ``weights.pt``) on
    ``scenes`` (with truth) and write them into it (atomically, :func:`save_checkpoint`).

    Validates twice through the real inference path (:func:`validate` with locations): with
    the uncalibrated K head (T = 1, no fall-back), which gives the K logits and the fall-back K
    that :func:`risloc.nn.calibrate.fit_temperature` and :func:`~risloc.nn.calibrate.tune_threshold`
    fit on, and with the fitted (T, tau). The checkpoint's ``calibration`` becomes
    ``{"temperature": T, "threshold": tau, "order_rule": ...}`` (what :func:`~risloc.nn.inference.load_model`
    reads); its ``metrics`` gain ``calibrated_<m>`` for every metric of the second validation,
    ``uncalibrated_<m>`` for those of :data:`CALIBRATION_METRICS` from the first, and
    ``calibration_scenes``. The fit starts from the raw logits, so calibrating a calibrated
    checkpoint again on the same scenes gives the same (T, tau).

    ``batch``: scenes per forward pass (default the checkpoint's ``val_batch``; memory only).
    Returns ``{temperature, threshold, order_rule, scenes, k_nll_before, k_nll_after,
    K_acc_before, K_acc_after, calibrated_<m>...}``."""
    from .inference import load_model

    if scenes.truth is None:
        raise ValueError(f"calibration of {path}: the scenes carry no truth")
    loaded = load_model(path, device=scenes.device)
    # validate() computes the fall-back K only with calibrate = true
    cfg = dataclasses.replace(loaded.config, calibrate=True, val_batch=batch or loaded.config.val_batch)
    raw = Calibration(order_rule=cfg.order_rule)
    m0, logits, fb = validate(loaded.model, scenes, cfg, loaded.options, raw, progress=progress)
    K = scenes.truth.K.to(logits.device)
    cal = Calibration(order_rule=cfg.order_rule)
    cal.temperature = calibrate.fit_temperature(logits, K)
    if fb is not None:
        cal.threshold = calibrate.tune_threshold(logits, K, cal.temperature, fb)
    m1, _, _ = validate(loaded.model, scenes, cfg, loaded.options, cal, progress=progress)
    result = {**cal.to_dict(), "scenes": len(scenes), "k_nll_before": m0["val_k_nll"], "k_nll_after": m1["val_k_nll"],
              "K_acc_before": m0["K_acc"], "K_acc_after": m1["K_acc"]}
    log(f"[CAL] T={cal.temperature:.3f} tau={cal.threshold:.3f} ({cal.order_rule}) on {len(scenes)} scenes:"
        f" k_nll {m0['val_k_nll']:.4f} -> {m1['val_k_nll']:.4f}, K_acc {m0['K_acc']:.4f} -> {m1['K_acc']:.4f},"
        f" success {m0['success']:.4f} -> {m1['success']:.4f}")
    state = loaded.state
    state["calibration"] = cal.to_dict()
    state["metrics"] = {**state.get("metrics", {}), **{f"calibrated_{k}": v for k, v in m1.items()},
                        **{f"uncalibrated_{k}": m0[k] for k in CALIBRATION_METRICS}, "calibration_scenes": len(scenes)}
    save_checkpoint(path, state)
    return {**result, **{f"calibrated_{k}": v for k, v in m1.items()}}
