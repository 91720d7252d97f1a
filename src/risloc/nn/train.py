"""The trainer: plain PyTorch, one loop, read it top to bottom.

    run = train(cfg, "runs/x")          # or: risloc train --config configs/default.toml --out runs/x

Per step (global step g, fractional epoch e = g / steps_per_epoch):
  1. the batch: scenes [g B, (g+1) B) of the stream ``seed`` (simulated on the device), or of a
     fixed pool / scene file (a per-epoch permutation); SNR labels jittered and some replaced by
     the data-only estimate (robustness);
  2. beta(e) and the loss weights from the curriculum (risloc.nn.loss.Objective);
  3. forward under AMP (bf16/fp16 on CUDA, fp32 on CPU), loss in fp32/fp64;
  4. backward; ONE gate on the total gradient norm: a non-finite norm skips the step (logged,
     the scheduler does not tick), a finite one is clipped to ``grad_clip``;
  5. AdamW step, scheduler tick (linear warm-up, cosine decay), EMA update.
Every ``log_every`` steps: [LR], [GRAD] (total norm before clipping), [STEP] (relative
parameter change |d theta| / |theta| of that step) and the running loss terms.
Per epoch: validation of the EMA weights through the real inference path
(risloc.nn.inference.locate_from_prediction -> risloc.metrics.score), a JSONL line in
``RUN/metrics.jsonl``, ``RUN/last.pt`` (everything needed to resume) and ``RUN/best.pt``
(best ``val_primary``), early stopping. At the end: K-head calibration (risloc.nn.calibrate)
stored in ``best.pt``.

Resuming (``resume=True``) reloads ``RUN/last.pt`` and continues at the next epoch: the data
stream is indexed by the global step, every other piece of state is in the checkpoint, so a
killed run resumed gives the same result as an uninterrupted one (bitwise on CPU).
The only host-device synchronisation per step is the gate's finiteness check.
"""

from __future__ import annotations

import copy
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
from ..scenes import Scenes, Truth
from ..simulate import simulate, source_factor
from . import calibrate
from .._provenance import git_commit
from .checkpoint import FORMAT, VERSION, export_weights, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DEFAULT_TIMEOUT_S, Dist, parameter_digest, session
from .inference import Calibration, fallback_order, locate_from_prediction
from .loss import Objective, covariance_nmse, format_selftest, selftest, zero_prediction
from .model import ModelInputs, build_model, effective, prepare_inputs


# ----------------------------------------------------------------------------------------------
# data: a batch = model inputs + truth
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    inputs: ModelInputs
    truth: Truth
    true_factor: Tensor


def _batch_from_scenes(s: Scenes, cfg: TrainConfig) -> Batch:
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=cfg.loss.regularisation)
    return Batch(inputs, s.truth, source_factor(s.truth, cfg.scenario))


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
        if cfg.train_file:
            from ..io import load_scenes

            self.pool = load_scenes(cfg.train_file)
            if self.pool.truth is None:
                raise ValueError(f"train_file {cfg.train_file}: has no truth group; training needs it")
        elif cfg.train_scenes > 0:
            t = time.time()
            self.pool = Scenes.cat([simulate(cfg.scenario, min(4096, cfg.train_scenes - a), seed=cfg.seed, start=a, device=device)
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
        if self.pool is None:
            s = simulate(cfg.scenario, b, seed=cfg.seed, start=step * B + lo, device=self.device)
            S = cv.sample_covariance(s.y, s.H, s.codes, regularisation=cfg.loss.regularisation)
            snr = s.snr_db.float()
            n_drop = int(round(cfg.loss.snr_drop * B))  # the first n_drop scenes of the global batch (scenes are i.i.d.)
            n_loc = min(max(n_drop - lo, 0), b)  # ... of which this many are in this rank's slice
            est = snr.clone()
            if n_loc > 0:
                est[:n_loc] = cv.estimate_snr_db(s.y[:n_loc], s.H[:n_loc], s.codes[:n_loc], regularisation=cfg.loss.regularisation).float()
            truth, F = s.truth, source_factor(s.truth, cfg.scenario)
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
        inputs = ModelInputs(S, snr_used, label_ok.float(), y, H, codes)
        return Batch(inputs, truth, F)


# ----------------------------------------------------------------------------------------------
# optimisation pieces
# ----------------------------------------------------------------------------------------------
class WarmupCosine:
    """lr(step) = lr * step / warmup during warm-up, then cosine decay to ``min_lr`` at ``total``.
    ``step`` counts real optimiser steps only (a skipped step does not tick)."""

    def __init__(self, lr: float, min_lr: float, warmup: int, total: int):
        self.base, self.min, self.warmup, self.total, self.step = lr, min_lr, warmup, max(total, 1), 0

    def lr(self) -> float:
        s = self.step
        if s < self.warmup:
            return self.base * (s + 1) / self.warmup
        t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.min + 0.5 * (self.base - self.min) * (1 + math.cos(math.pi * t))

    def tick(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_optimizer(model: torch.nn.Module, objective: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three groups: backbone weights (decayed), backbone biases/norms/embeddings
    (not decayed), the K head (own LR multiplier 'k'); the backbone groups are tagged 'backbone'."""
    k_ids = {id(p) for p in model.k_head_parameters()}
    decay, no_decay, k_head = [], [], []
    for name, p in model.named_parameters():
        if id(p) in k_ids:
            k_head.append(p)
        elif p.dim() >= 2 and not name.startswith(("pos_", "embed_rows")):
            decay.append(p)
        else:
            no_decay.append(p)
    no_decay += list(objective.parameters())
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "role": "backbone"},
        {"params": no_decay, "weight_decay": 0.0, "role": "backbone"},
        {"params": k_head, "weight_decay": cfg.weight_decay, "role": "k"},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def gated_step(params: list[Tensor], optimizer, scheduler: WarmupCosine, grad_clip: float, scaler=None,
               all_finite: Callable[[Tensor], bool] | None = None) -> tuple[bool, Tensor]:
    """THE gradient gate: total norm of all gradients; non-finite -> skip (zero grads, no tick),
    else clip to ``grad_clip``, step, tick. Returns (stepped, norm before clipping).

    ``all_finite(norm)`` makes the decision (default: ``torch.isfinite``); data-parallel training
    passes :meth:`risloc.nn.distributed.Dist.all_finite`, a MIN over ranks, so every rank skips
    or steps together."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in grads])) if grads else torch.zeros(())
    finite = all_finite(norm) if all_finite is not None else bool(torch.isfinite(norm))  # the one sync per step
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False, norm
    if grad_clip > 0:
        coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.tick()
    return True, norm


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, n_steps: int) -> None:
    d = min(decay, (1 + n_steps) / (10 + n_steps))
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1 - d)


# ----------------------------------------------------------------------------------------------
# validation: the real inference path
# ----------------------------------------------------------------------------------------------
def k_loc(success: float, k_acc: float) -> float:
    """The 'k_loc' selection metric: (2 success + K_acc) / 3 (higher is better)."""
    return (2 * success + k_acc) / 3


@torch.no_grad()
def validate(model, scenes: Scenes, cfg: TrainConfig, options: cv.CovarianceOptions, calibration: Calibration,
             *, with_locations: bool = True) -> tuple[dict, Tensor, Tensor]:
    """Validation metrics, K logits and fall-back K (for calibration) on ``scenes``."""
    from ..metrics import score

    model.eval()
    nmse, logits, ests, fbs = [], [], [], []
    for a in range(0, len(scenes), cfg.val_batch):
        s = scenes[a : a + cfg.val_batch]
        b = _batch_from_scenes(s, cfg)
        pred = model(b.inputs, options)
        R_true = effective(b.true_factor, b.inputs, options)
        nmse.append(covariance_nmse(pred.covariance, R_true, effective(zero_prediction(b.true_factor), b.inputs, options)))
        logits.append(pred.k_logits.float())
        if with_locations:
            ests.append(locate_from_prediction(pred, b.inputs, options, cfg.scenario, calibration, cfg.music_options))
        if cfg.calibrate:
            try:
                fbs.append(fallback_order(b.inputs, options, cfg.scenario, cfg.order_rule))
            except ImportError:
                pass
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
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = False,
    stop_after_epoch: int | None = None,
    val_scenes: Scenes | None = None,
    stop_when: Callable[[dict], bool] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    dist_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Train, validate, checkpoint and calibrate; returns the final summary (also in RUN/summary.json).

    ``stop_after_epoch`` ends the run after that epoch as if killed (for resume tests);
    ``val_scenes`` replaces the simulated validation set (the overfit probe); ``stop_when(metrics)``
    returning True ends training after that epoch (then calibration as usual);
    ``on_epoch(epoch, record)`` is called after each epoch's validation and checkpoints with that
    epoch's metrics.jsonl record (validation metrics, ``primary``, ``best``, ...); an exception it
    raises (e.g. ``optuna.TrialPruned``) ends the run and propagates.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel
    (:mod:`risloc.nn.distributed`, docs/training-at-scale.md): ``cfg.batch`` is the global batch,
    split evenly over the ranks; rank 0 validates, writes checkpoints and logs, calls
    ``on_epoch`` and calibrates; every rank returns the same summary. ``dist_timeout_s`` bounds
    every wait for another rank.
    """
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
        return _train(cfg, out, state, dist, device, log=log, progress=progress, stop_after_epoch=stop_after_epoch,
                      val_scenes=val_scenes, stop_when=stop_when, on_epoch=on_epoch)


def _train(cfg: TrainConfig, out: Path, state: dict | None, dist: Dist, device: torch.device, *, log, progress, stop_after_epoch,
           val_scenes, stop_when, on_epoch) -> dict:
    resume = state is not None
    main = dist.is_main
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"TrainConfig.amp = {amp!r}: mixed precision is for CUDA only (device {device})")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    commit = git_commit()

    # --- model, EMA, objective, optimiser, scheduler -----------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.scenario, cfg.model).to(device)
    ema = copy.deepcopy(model) if cfg.ema > 0 else None
    objective = Objective(cfg.loss, cfg.scenario).to(device)
    optimizer = make_optimizer(model, objective, cfg)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    scheduler = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start_epoch, best, bad_epochs, calibration = 0, -math.inf, 0, Calibration(order_rule=cfg.order_rule)
    metrics_path = out / "metrics.jsonl"

    if resume:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        start_epoch = int(state["progress"]["epoch"])
        best, bad_epochs = float(state["progress"]["best"]), int(state["progress"]["bad_epochs"])
        if main and metrics_path.exists():  # drop log lines of epochs after the checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < start_epoch]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
        log(f"[RESUME] from {out / 'last.pt'} at epoch {start_epoch} (optimiser step {scheduler.step})")
    elif main:
        metrics_path.write_text("")
    if main:
        (out / "config.toml").write_text(cfg.to_toml())

    # --- the step module; data-parallel under torchrun ---------------------------------------------
    stepper: torch.nn.Module = _Step(model, objective, device.type, amp_dtype)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: the K head gets no gradient before its loss term switches on;
        # broadcast_buffers off: the objective's running magnitudes are averaged after each step instead.
        # (device_ids=None: the batch is already on this rank's device, DDP moves nothing.)
        with warnings.catch_warnings():  # torch >= 2.13 renames broadcast_buffers; the old name works on 2.x
            warnings.simplefilter("ignore", FutureWarning)
            stepper = DistributedDataParallel(stepper, device_ids=None, broadcast_buffers=False, find_unused_parameters=True)
    running = [b for b in objective.buffers() if b.is_floating_point()]

    # --- data -------------------------------------------------------------------------------------
    data = TrainData(cfg, device, log, rank=dist.rank, world=dist.world)
    if main:
        if val_scenes is None:
            if cfg.val_file:
                from ..io import load_scenes

                val_scenes = load_scenes(cfg.val_file)
            else:
                val_scenes = simulate(cfg.scenario, cfg.val_scenes, seed=cfg.val_seed, device=device)
        val_scenes = val_scenes.to(device)

        # --- self-test of the loss on the first validation batch ------------------------------------
        vb = _batch_from_scenes(val_scenes[: min(256, len(val_scenes))], cfg)
        for b in sorted({0.0, cfg.loss.beta}):
            log(format_selftest(selftest(vb.inputs, vb.true_factor, cfg.covariance_options(b))) + f" beta={b:g}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[RUN] device={device} amp={amp} params={n_params} seed={cfg.seed} git={commit} out={out}"
        + (f" world={dist.world} backend={dist.backend} batch={cfg.batch} ({data.local_batch} per rank)" if dist.enabled else ""))

    def save(path: Path, epoch_next: int, metrics: dict, beta: float, digests: dict | None) -> None:
        ckpt = {
            "format": FORMAT, "version": VERSION,
            "config": cfg.to_toml(), "scenario": cfg.scenario.to_toml(),
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "objective": objective.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "progress": {"epoch": epoch_next, "step": epoch_next * cfg.steps_per_epoch, "best": best, "bad_epochs": bad_epochs},
            "metrics": metrics, "calibration": calibration.to_dict(), "beta": beta, "seed": cfg.seed, "git": commit,
        }
        if digests is not None:
            ckpt["distributed"] = digests
        save_checkpoint(path, ckpt)

    # --- the loop ---------------------------------------------------------------------------------
    model.train()
    summary: dict = {}
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        n_sum, skipped = 0, 0
        steps = range(cfg.steps_per_epoch)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"epoch {epoch}", leave=False)
        for i in steps:
            g = epoch * cfg.steps_per_epoch + i
            e = g / cfg.steps_per_epoch
            batch = data.batch(g)
            options = cfg.covariance_options(objective.beta(e))
            lr = scheduler.lr()
            k_on = objective.weights(e)["k"] > 0
            for group in optimizer.param_groups:
                mult = cfg.loss.backbone_lr_mult if (group["role"] == "backbone" and k_on) else 1.0
                group["lr"] = lr * mult

            loss, parts = stepper(batch.inputs, options, batch.truth, batch.true_factor, e)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            dist.average_(running)  # the running term magnitudes: the same on every rank

            log_now = (i + 1) % cfg.log_every == 0 or i == cfg.steps_per_epoch - 1
            before = [p.detach().clone() for p in model.parameters()] if log_now else None
            stepped, norm = gated_step(params, optimizer, scheduler, cfg.grad_clip, scaler, all_finite=dist.all_finite)
            if not stepped:
                skipped += 1
                log(f"[SKIP] step {g}: non-finite gradient norm ({float(norm)}); no update, scheduler not ticked"
                    + (f", fp16 scale -> {scaler.get_scale():g}" if scaler is not None else ""))
                continue
            if ema is not None:
                ema_update(ema, model, cfg.ema, scheduler.step)
            for t, v in parts.items():
                sums[t] = sums.get(t, 0) + v.detach()
                counts[t] = counts.get(t, 0) + 1
            n_sum += 1
            if log_now:
                after = list(model.parameters())
                dp = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a.detach() - b) for a, b in zip(after, before)]))
                pn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in before]))
                terms = " ".join(f"{t}={float(v) / counts[t]:.4g}" for t, v in sums.items())
                log(f"[LR] step {g} lr={lr:.3e} beta={options.beta:.3f}")
                log(f"[GRAD] step {g} norm={float(norm):.4g} clip={cfg.grad_clip:g}")
                log(f"[STEP] step {g} dparam={float(dp / pn):.3e} loss={float(loss.detach()):.4g} {terms}"
                    + (" (rank 0's share)" if dist.enabled else ""))

        # --- every rank: epoch means over the whole global batch, parameter digests -------------------
        digests = None
        if dist.enabled:
            keys = sorted(sums)
            vals = [sums[t].reshape(1).clone() for t in keys]
            dist.average_(vals)
            sums = {t: v.reshape(()) for t, v in zip(keys, vals)}
            digests = {"world": dist.world, "local_batch": data.local_batch,
                       "param_digests": dist.gather(parameter_digest(model)),
                       "ema_digests": dist.gather(parameter_digest(ema)) if ema is not None else []}
            if len(set(digests["param_digests"])) > 1 or len(set(digests["ema_digests"])) > 1:
                log(f"[DDP] WARNING: the ranks' parameters differ after epoch {epoch}: {digests}")

        # --- rank 0: validation through the inference path, checkpoints, callback ----------------------
        action, error = "next", None
        if main:
            beta_now = objective.beta((epoch + 1) * 1.0)
            options = cfg.covariance_options(beta_now)
            metrics, _, _ = validate(ema if ema is not None else model, val_scenes, cfg, options, calibration, with_locations=cfg.val_locate)
            train_terms = {f"train_{t}": float(v) / counts[t] for t, v in sums.items()}
            metrics.update(train_terms)
            primary = _primary(metrics, cfg)
            primary_name = cfg.val_primary if "k_loc" in metrics else "loss"  # k_loc needs located scenes
            improved = primary > best
            if improved:
                best, bad_epochs = primary, 0
            else:
                bad_epochs += 1
            record = {"epoch": epoch, "step": (epoch + 1) * cfg.steps_per_epoch, "opt_steps": scheduler.step, "skipped": skipped,
                      "beta": beta_now, "lr": scheduler.lr(), "time_s": round(time.time() - t0, 3), "seed": cfg.seed, "git": commit,
                      **metrics, "val_primary": primary_name, "primary": primary, "best": best}
            if dist.enabled:
                record["world"] = dist.world
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            loc = (f" K_acc={metrics['K_acc']:.3f} K_under={metrics['K_under']:.3f} K_over={metrics['K_over']:.3f} success={metrics['success']:.3f}"
                   f" rmse_phi={metrics['rmse_phi_deg']:.3g}deg rmse_theta={metrics['rmse_theta_deg']:.3g}deg rmse_r={metrics['rmse_r_m']:.3g}m"
                   if "success" in metrics else "")
            log(f"[VAL] epoch {epoch} nmse={metrics['val_nmse']:.4f} k_nll={metrics['val_k_nll']:.3f}{loc} {primary_name}={primary:.4f}"
                f"{' *best*' if improved else ''} ({record['time_s']:.1f} s)")
            summary = record
            save(out / "last.pt", epoch + 1, metrics, beta_now, digests)
            if improved:
                save(out / "best.pt", epoch + 1, metrics, beta_now, digests)
            try:
                if on_epoch is not None:
                    on_epoch(epoch, dict(record))
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                action, error = "error", exc
            if action == "next":
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    log(f"[STOP] stopping after epoch {epoch} as asked")
                    action = "return"
                elif stop_when is not None and stop_when(metrics):
                    log(f"[STOP] target reached after epoch {epoch}")
                    action = "stop"
                elif cfg.patience > 0 and bad_epochs >= cfg.patience:
                    log(f"[STOP] no better {cfg.val_primary} for {bad_epochs} epochs; early stop")
                    action = "stop"
        # ranks 1.. wait here for rank 0's validation; everyone takes rank 0's decision
        action, summary, what = dist.broadcast((action, summary, repr(error) if error is not None else ""))
        if action == "error":
            if error is not None:
                raise error
            raise RuntimeError(f"rank {dist.rank}: stopping, rank 0 raised {what} after epoch {epoch}")
        if action == "return":
            if main:
                _export(out, log)
            return summary
        if action == "stop":
            break

    # --- calibration of the K head on validation data, stored in best.pt ---------------------------------
    if main:
        if cfg.calibrate and (out / "best.pt").exists():
            summary["calibration"] = calibrate_checkpoint(out / "best.pt", val_scenes, log=log)
        _export(out, log)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return dist.broadcast(summary)


def _export(out: Path, log: Callable[[str], None]) -> None:
    """RUN/weights.pt: the inference-only form of RUN/best.pt (what the package ships)."""
    if (out / "best.pt").exists():
        export_weights(out / "best.pt", out / "weights.pt")
        log(f"[EXPORT] {out / 'weights.pt'}: inference-only weights of best.pt ({(out / 'weights.pt').stat().st_size / 2**20:.1f} MiB)")


def calibrate_checkpoint(path: Path, scenes: Scenes, *, log: Callable[[str], None] = print) -> dict:
    """Fit T and tau of a checkpoint on ``scenes`` (with truth), re-validate, and write them into it."""
    from .inference import load_model

    loaded = load_model(path, device=scenes.device)
    cfg = loaded.config
    cal = Calibration(order_rule=cfg.order_rule)
    m0, logits, fb = validate(loaded.model, scenes, cfg, loaded.options, cal, with_locations=False)
    K = scenes.truth.K.to(logits.device)
    cal.temperature = calibrate.fit_temperature(logits, K)
    if fb is not None:
        cal.threshold = calibrate.tune_threshold(logits, K, cal.temperature, fb)
    m1, _, _ = validate(loaded.model, scenes, cfg, loaded.options, cal)
    log(f"[CAL] T={cal.temperature:.3f} tau={cal.threshold:.3f} ({cal.order_rule}) k_nll {m0['val_k_nll']:.4f} -> {m1['val_k_nll']:.4f};"
        f" K_acc={m1.get('K_acc', float('nan')):.3f} success={m1.get('success', float('nan')):.3f}")
    state = loaded.state
    state["calibration"] = cal.to_dict()
    state["metrics"] = {**state.get("metrics", {}), **{f"calibrated_{k}": v for k, v in m1.items()}}
    save_checkpoint(path, state)
    return {**cal.to_dict(), "k_nll_before": m0["val_k_nll"], "k_nll_after": m1["val_k_nll"], **{f"calibrated_{k}": v for k, v in m1.items()}}
