"""``ml-joint``: the source positions and the RIS hardware estimated together (docs/estimators-ml.md,
"Joint estimation of the RIS hardware").

The RIS may not realise the commanded codes c_ln (docs/model.md, "Impairments"): a phase-dependent
amplitude and failed elements give c~_ln = w_ln c_ln with a real w_ln >= 0. ``ml-joint`` models

    w_ln = alpha_q(l,n) g_n,

alpha_q >= 0 the amplitude of phase level q (q(l,n) the level of the commanded phase of c_ln, one of
the Q = 2^code_bits quantised phases 2 pi q / Q; with more than 16 levels, the nearest of 16 phase
bins) and g_n in {0, 1} (failed or working element), estimates them jointly with the positions where
the likelihood says they are there, and is told nothing about the impairment.

Steps (all batched over scenes; one batch of scenes, the registry chunks):

0. Start: ``ml-robust``'s answer p^(0) (``ml.estimate`` with ``mismatch="auto"``) and its criterion
   J^(0) = NLL + tau K-hat (+ ``mismatch_penalty`` where a model-error floor is taken), evaluated
   by :func:`criterion` (the likelihood refined from the answer, the order penalty of stage 4).
1. For i = 1..``joint_iterations``, from the current positions p^(i-1):

   a. the hardware by :func:`estimate_hardware` at the positions p^(i-1) (below);
   b. the positions: ``ml.estimate`` on the scenes with the codes replaced by the estimated
      realised codes w_ln c_ln, started from p^(i-1) (its ``init`` path: refinement, ``init_grow``
      greedy additions, ``init_relax`` RELAX cycles, ``init_prune`` pruning passes, all under the
      model-error floor of ``mismatch="auto"``; with a known K no growth and no pruning), giving p^(i)
      (and, refined by :func:`criterion`, the positions of step a of the next iteration);
   c. its criterion J^(i) = criterion(scenes with codes w c, p^(i)) + the hardware penalty
      P = ``hardware_penalty`` x (amplitude parameters: one per phase level that occurs less one for
      the scale, at most 3 for the parametric model, 0 where the amplitudes are left ideal) + ``failed_penalty`` x (elements
      declared failed). A hardware with neither (the ideal one) is ``ml-robust``'s own model: not a
      candidate, so steps b and c run only on the scenes whose fitted hardware is not ideal (the
      iterations stop where none is left).

2. Per scene, the answer of least J over i = 0..``joint_iterations``; i = 0, ``ml-robust``'s answer
   as it is, wherever no joint model gains more than its penalty (ideal scenes: ``ml-robust``'s
   answer exactly).

The hardware fit (:func:`estimate_hardware`), per scene, positions p fixed, theta = (alpha, g) real:

* variable projection: the signals are the least-squares ones of the hardware,
  s_l(theta) = B_l^+ y_l with B_l = H diag(w_l c_l) A(p), x_l = A(p) s_l, and the residual
  r_l = P_perp,l y_l = y_l - B_l s_l, RSS(theta) = sum_l |r_l|^2 (y and H at unit mean power);
* given the signals the model is linear in each part of theta, with u_ln = c_ln x_ln:
  sum_q alpha_q z_lq, z_lq = sum_(n: q(l,n) = q) H[:, n] g_n u_ln, and V_l g, V_l = H diag(alpha_q(l,n) u_l);
* Levenberg-Marquardt on RSS with Kaufman's Jacobian J_l = P_perp,l [Z_l, V_l]:
  (Re sum_l J_l^H J_l + lambda diag) delta = Re sum_l J_l^H r_l, theta <- max(theta + delta, 0), a step
  kept per scene where RSS drops (lambda / 3; else lambda x 5); from alpha = 1, g = 1,
  ``hardware_iterations`` steps with alpha and g free, then g rescaled to median 1;
* candidates: the failed sets F_t = {n : g_n < t} for t = 0, ``failed_ratio`` / 2, ``failed_ratio``,
  each with the ideal amplitudes (alpha = 1) or with alpha refitted (``hardware_iterations`` / 2
  steps, alpha only) under the binary gains g_n = 1 - f_n; per scene the candidate of least
  L M log RSS + ``hardware_penalty`` n_amplitude + ``failed_penalty`` |F| (L M log RSS: the
  likelihood of deterministic signals, sigma^2 concentrated out) is the hardware; the LS gains g_n
  serve only this decision, the realised codes estimated are w_ln c_ln, w_ln = alpha_q(l,n) (1 - f_n).

The global scale is the signals' (alpha is rescaled to max_q alpha_q = 1). The parametric amplitude
(beta_min, mu, kappa) (:func:`risloc.physics.practical_amplitude`) is fitted to the per-level
amplitudes by least squares weighted by the level counts, alpha_q ~ s ((1 - beta_min)
((sin(theta_q - mu) + 1) / 2)^kappa + beta_min) (grid over mu and kappa, s and beta_min in closed
form); with more than 16 phase levels (``amplitude_model="auto"``, code_bits > 4) or
``amplitude_model="parametric"`` the codes use the parametric amplitude of each commanded phase
(3 parameters; the RSS of the candidates is still that of the 16 phase bins) instead of the
per-level ones.

Cost: one ``ml-robust`` search, then per joint iteration one hardware fit (about 2
``hardware_iterations`` Levenberg-Marquardt steps, each a (Q + N)-square real Cholesky solve per
scene) and, on the scenes with a non-ideal fitted hardware, one ``ml`` init-path pass; and
1 + ``joint_iterations`` likelihood evaluations
(:func:`criterion`: ``final_iterations`` refinement steps plus the model-error levels).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .. import physics
from ..scenes import Estimates, Scenes, _Batched
from . import ml, ml_robust, register
from .ml_core import measure, unit_power

__all__ = ["Hardware", "JointOptions", "estimate_hardware", "criterion", "estimate"]

MAX_LEVELS = 16
"""At most this many phase levels get an amplitude of their own (more: 16 phase bins)."""


@dataclass(frozen=True)
class JointOptions:
    """Options of ``ml-joint`` of its own (every ``ml`` option applies too, to its ``ml`` passes)."""

    joint_iterations: int = 2
    """Alternations hardware -> positions (step 1); 0 gives ``ml-robust``'s answer."""
    hardware_iterations: int = 8
    """Levenberg-Marquardt steps of the hardware fit with amplitudes and gains free (half as many
    for each candidate's amplitudes; :func:`estimate_hardware`)."""
    hardware_penalty: float = 2.0
    """Penalty [nats] per amplitude parameter of the joint model (the levels that occur less one, or 3 parametric; as
    ``mismatch_penalty`` for the one parameter of the model-error floor)."""
    failed_penalty: float = 5.0
    """Penalty [nats] per element declared failed (about log N: which element)."""
    failed_ratio: float = 0.5
    """Failed-set candidates: the elements whose least-squares gain is below this fraction of the
    median, and below half of it (and none); the penalised fit chooses."""
    amplitude_model: str = "auto"
    """``"levels"``: one amplitude per phase level; ``"parametric"``: (beta_min, mu, kappa) fitted to
    them; ``"auto"``: levels up to code_bits = 4 (16 levels), parametric beyond."""

    def __post_init__(self):
        for name in ("joint_iterations", "hardware_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) < 0:
                raise ValueError(f"ml-joint: {name} = {v!r}: must be an integer >= 0")
        if int(self.hardware_iterations) < 1:
            raise ValueError(f"ml-joint: hardware_iterations = {self.hardware_iterations}: must be >= 1")
        for name in ("hardware_penalty", "failed_penalty"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"ml-joint: {name} = {getattr(self, name)!r}: must be a finite number >= 0")
        if not (0 <= float(self.failed_ratio) < 1):
            raise ValueError(f"ml-joint: failed_ratio = {self.failed_ratio!r}: must be in [0, 1)")
        if self.amplitude_model not in ("auto", "levels", "parametric"):
            raise ValueError(f"ml-joint: amplitude_model = {self.amplitude_model!r}: must be 'auto', 'levels' or 'parametric'")


_JOINT = {f.name for f in fields(JointOptions)}
DEFAULTS = {**ml_robust.DEFAULTS, "init_grow": 1, "init_relax": 1, "init_prune": 2,
            **{f.name: getattr(JointOptions(), f.name) for f in fields(JointOptions)}}
"""``ml``'s option defaults with ``mismatch="auto"`` and the ``init`` path of step 1b
(``init_grow=1, init_relax=1, init_prune=2``), and the options of :class:`JointOptions`."""
OPTION_TYPES = {**ml_robust.OPTION_TYPES, **{f.name: f.type for f in fields(JointOptions)}}
"""The annotations of those options."""


@dataclass
class Hardware(_Batched):
    """The RIS hardware estimated per scene (:func:`estimate_hardware`); S scenes, Q levels, N elements."""

    levels: Tensor
    """Per-level amplitudes alpha_q ``[S, Q]`` (real >= 0, max 1 over the levels that occur; 1 for a
    level no code of the scene commands), of the level phases ``phases``."""
    phases: Tensor
    """The level phases 2 pi q / Q [rad] ``[S, Q]`` (the same in every scene)."""
    counts: Tensor
    """Commanded codes per level ``[S, Q]`` (int64; the weights of the parametric fit)."""
    gain: Tensor
    """Least-squares element gains g_n ``[S, N]`` (real >= 0, median 1; ~0 for a failed element)."""
    failed: Tensor
    """Elements declared failed ``[S, N]`` (bool)."""
    fitted: Tensor
    """Whether the amplitudes were fitted ``[S]`` (bool; False: the ideal amplitudes, ``levels`` all 1)."""
    beta_min: Tensor
    """Parametric amplitude fitted to ``levels``: beta_min ``[S]``, mu [rad] ``[S]``, kappa ``[S]``
    (:func:`risloc.physics.practical_amplitude`), and its scale ``[S]`` (alpha_q ~ scale x amplitude)."""
    mu: Tensor
    kappa: Tensor
    scale: Tensor
    parametric: bool = False
    """Whether :meth:`amplitude` uses the parametric model (True) or the per-level amplitudes."""

    def __len__(self) -> int:
        return self.levels.shape[0]

    def amplitude(self, codes: Tensor) -> Tensor:
        """The estimated amplitude of each commanded code ``[S, L, N]`` (real): alpha_q(l,n) (or the
        parametric amplitude of its phase), 0 for a failed element."""
        rd = physics.real_dtype(codes.dtype) if codes.is_complex() else codes.dtype
        S = codes.shape[0]
        if self.parametric:
            model = types.SimpleNamespace(ris_beta_min=self.beta_min.view(S, 1, 1).to(rd), ris_mu=self.mu.view(S, 1, 1).to(rd),
                                          ris_kappa=self.kappa.view(S, 1, 1).to(rd))  # per-scene parameters, broadcast
            amp = physics.practical_amplitude(torch.angle(codes), model) * self.scale.view(S, 1, 1).to(rd)
        else:
            q = _level_index(codes, self.levels.shape[1])
            amp = self.levels.to(rd).gather(1, q.flatten(1)).view(q.shape)
        return amp * (~self.failed).to(rd).unsqueeze(1)

    def realised(self, codes: Tensor) -> Tensor:
        """The estimated realised codes w_ln c_ln ``[S, L, N]`` of the commanded ``codes``."""
        return codes * self.amplitude(codes).to(codes.dtype)

    def n_parameters(self) -> Tensor:
        """(amplitude parameters, elements declared failed) ``[S, 2]`` (int64): the levels that occur
        less one (the scale; 3 at most for the parametric model), 0 where not ``fitted``, and the
        failed count."""
        amp = self.fitted.to(torch.int64) * _amplitude_parameters(self.counts, self.parametric)
        return torch.stack([amp, self.failed.sum(1)], dim=1)


def _amplitude_parameters(counts: Tensor, parametric: bool) -> Tensor:
    """Free parameters of fitted amplitudes ``[S]`` (int64): the phase levels that occur (``counts``
    ``[S, Q]`` > 0; the dft codebook commands 4 of 8) less one (the scale belongs to the signals),
    at most 3 for the parametric model (beta_min, mu, kappa)."""
    used = (counts > 0).sum(1) - 1
    return used.clamp(max=3) if parametric else used


def _n_levels(code_bits: int) -> int:
    """Phase levels with an amplitude of their own: 2^code_bits, at most :data:`MAX_LEVELS`."""
    return min(2 ** int(code_bits), MAX_LEVELS)


def _level_index(codes: Tensor, Q: int) -> Tensor:
    """q(l,n): the nearest of the Q level phases 2 pi q / Q to the phase of each code (int64, ``codes``' shape)."""
    return torch.remainder(torch.round(torch.angle(codes) * (Q / (2 * math.pi))), Q).to(torch.int64)


def _vp_residual(theta: Tensor, y: Tensor, H: Tensor, codes: Tensor, A: Tensor, act: Tensor, q: Tensor):
    """The variable-projection fit of the hardware theta = (alpha ``[S, Q]``, g ``[S, N]``) with Q =
    theta's columns less N (module docstring): returns (RSS ``[S]``, and for the step, alpha_q(l,n)
    ``[S, L, N]``, B_l ``[S, L, M, K]``, (B_l^H B_l)^-1, s_l ``[S, L, K, 1]``, r_l ``[S, L, M]``)."""
    S, L, N = codes.shape
    Q = theta.shape[1] - N
    K = A.shape[1]
    alpha, g = theta[:, :Q], theta[:, Q:]
    aq = alpha.gather(1, q.flatten(1)).view(S, L, N)  # alpha_q(l,n)
    Bm = measure(H, codes * (aq * g.unsqueeze(1)).to(codes.dtype), A)  # B_l = H diag(w_l c_l) A, [S, L, M, K]
    G = Bm.mH @ Bm
    scale = torch.diagonal(G, dim1=-2, dim2=-1).real.mean((-1, -2)).clamp_min(1e-30)
    G = G + torch.diag_embed((~act).to(G.dtype).view(S, 1, K).expand(S, L, K) + (1e-9 * scale).to(G.dtype).view(S, 1, 1))
    Gi = torch.linalg.inv(G)
    s = Gi @ (Bm.mH @ y.unsqueeze(-1))  # s_l = B_l^+ y_l, [S, L, K, 1]
    r = y - (Bm @ s).squeeze(-1)  # P_perp y_l, [S, L, M]
    return r.abs().square().sum((1, 2)), aq, Bm, Gi, s, r


def _vp_step(theta: Tensor, free: Tensor, lam: Tensor, y: Tensor, H: Tensor, codes: Tensor, A: Tensor, act: Tensor,
             q: Tensor, onehot: Tensor):
    """The variable-projection residual of the hardware theta (:func:`_vp_residual`) and its
    Levenberg-Marquardt step (module docstring): returns (RSS ``[S]``, the step ``[S, Q + N]``, zero
    on the parameters not ``free``)."""
    rss, aq, Bm, Gi, s, r = _vp_residual(theta, y, H, codes, A, act, q)
    g = theta[:, onehot.shape[-1]:]
    u = codes * (s.squeeze(-1) @ A)  # u_ln = c_ln x_ln, x_l = A s_l
    Z = H.unsqueeze(1) @ ((g.unsqueeze(1) * u).unsqueeze(-1) * onehot.to(u.dtype))  # d model / d alpha_q, [S, L, M, Q]
    V = H.unsqueeze(1) * (aq * u).unsqueeze(2)  # d model / d g_n, [S, L, M, N]
    J = torch.cat([Z, V], dim=-1)
    J = J - Bm @ (Gi @ (Bm.mH @ J))  # P_perp J (Kaufman's variable-projection Jacobian)
    Nm = (J.mH @ J).sum(1).real  # [S, P, P]
    b = (J.mH @ r.unsqueeze(-1)).sum(1).real.squeeze(-1)  # [S, P]
    keep = free.to(Nm.dtype)
    Nm = Nm * keep.unsqueeze(-1) * keep.unsqueeze(-2)
    d = torch.diagonal(Nm, dim1=-2, dim2=-1)
    eye = torch.eye(Nm.shape[-1], dtype=Nm.dtype, device=Nm.device)
    A_ = Nm + torch.diag_embed(lam.view(-1, 1) * d + 1e-9 * d.mean(-1, keepdim=True) + (1 - keep)) + 1e-30 * eye
    Lc, info = torch.linalg.cholesky_ex(A_)  # symmetric positive definite (a Cholesky solve, not LU)
    step = torch.cholesky_solve((b * keep).unsqueeze(-1), Lc).squeeze(-1)
    step = torch.where((info == 0).view(-1, 1), step, torch.zeros_like(step))
    return rss, torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0) * keep


def _levenberg_marquardt(theta: Tensor, free: Tensor, iterations: int, *args) -> tuple[Tensor, Tensor]:
    """``iterations`` Levenberg-Marquardt steps on the variable-projection RSS (:func:`_vp_step`),
    projected on theta >= 0; a step is kept per scene where it lowers the RSS (lambda / 3), else
    lambda x 5. Returns (theta, its RSS)."""
    lam = torch.full((theta.shape[0],), 1e-3, dtype=theta.dtype, device=theta.device)
    rss, step = _vp_step(theta, free, lam, *args)
    for _ in range(int(iterations)):
        trial = (theta + step).clamp_min(0)
        rss_t, step_t = _vp_step(trial, free, lam, *args)
        ok = torch.isfinite(rss_t) & (rss_t < rss)
        theta = torch.where(ok.view(-1, 1), trial, theta)
        rss = torch.where(ok, rss_t, rss)
        lam = torch.where(ok, lam / 3, lam * 5).clamp(1e-9, 1e9)
        _, step_o = _vp_step(theta, free, lam, *args) if not bool(ok.all()) else (None, step_t)
        step = torch.where(ok.view(-1, 1), step_t, step_o)
    return theta, rss


def _fit_parametric(levels: Tensor, phases: Tensor, counts: Tensor):
    """(beta_min, mu, kappa, scale) ``[S]`` each: the LS fit of alpha_q ~ a b_q + c weighted by the
    level counts, b_q = ((sin(theta_q - mu) + 1) / 2)^kappa, over a grid of mu (2 deg) and kappa
    (0..6 by 0.1), a >= 0 and c >= 0 in closed form for each; scale = a + c, beta_min = c / (a + c)."""
    rd = levels.dtype
    dev = levels.device
    S, Q = levels.shape
    mu = torch.arange(180, dtype=rd, device=dev) * (math.pi / 90)  # [U]
    base = ((torch.sin(phases.unsqueeze(1) - mu.view(1, -1, 1)) + 1) / 2).clamp_min(0)  # [S, U, Q]
    w = counts.to(rd).view(S, 1, Q)
    a_ = levels.view(S, 1, Q)
    sw = w.sum(-1).clamp_min(1e-30)
    ma = (w * a_).sum(-1) / sw
    best = torch.full((S,), float("inf"), dtype=rd, device=dev)
    out = [torch.zeros(S, dtype=rd, device=dev) for _ in range(4)]  # slope, intercept, mu, kappa
    for kappa in torch.arange(61, dtype=rd).mul(0.1).tolist():  # a loop over the grid, not over scenes
        b = base.pow(kappa)  # [S, U, Q]
        mb = (w * b).sum(-1) / sw
        var = (w * (b - mb.unsqueeze(-1)).square()).sum(-1)
        slope = ((w * (b - mb.unsqueeze(-1)) * (a_ - ma.unsqueeze(-1))).sum(-1) / var.clamp_min(1e-30)).clamp_min(0)
        icpt = ma - slope * mb
        neg = icpt < 0  # c >= 0: the slope through the origin instead
        slope = torch.where(neg, (w * b * a_).sum(-1) / (w * b * b).sum(-1).clamp_min(1e-30), slope)
        icpt = icpt.clamp_min(0)
        rss = (w * (a_ - slope.unsqueeze(-1) * b - icpt.unsqueeze(-1)).square()).sum(-1)  # [S, U]
        r, j = rss.min(1)
        take = r < best
        ar = torch.arange(S, device=dev)
        for i, v in enumerate((slope[ar, j], icpt[ar, j], mu[j], torch.full_like(r, kappa))):
            out[i] = torch.where(take, v, out[i])
        best = torch.where(take, r, best)
    a, c, m, kappa = out
    s = (a + c).clamp_min(1e-30)
    return c / s, torch.remainder(m + math.pi, 2 * math.pi) - math.pi, kappa, s


def estimate_hardware(scenes: Scenes, est: Estimates, *, hardware_iterations: int = 8, hardware_penalty: float = 2.0,
                      failed_penalty: float = 5.0, failed_ratio: float = 0.5, amplitude_model: str = "auto") -> Hardware:
    """The RIS hardware of each scene given source positions ``est`` (module docstring, "The hardware
    fit"): per-level amplitudes, least-squares element gains, failed elements, the parametric fit.

    Variable projection (signals by least squares given the hardware) and Levenberg-Marquardt from
    the ideal hardware (alpha = 1, g = 1), then the choice among the candidate failed sets and
    ideal or fitted amplitudes by L M log RSS + the penalties. Scenes without a source (K-hat = 0)
    get the ideal hardware. Computed in double precision on the scenes' device; positions
    ``est.phi/theta/r`` ``[S, K]`` (the first ``est.K`` of each scene). The options are those of
    :class:`JointOptions`."""
    JointOptions(hardware_iterations=hardware_iterations, hardware_penalty=hardware_penalty, failed_penalty=failed_penalty,
                 failed_ratio=failed_ratio,
                 amplitude_model=amplitude_model)  # validation
    sc = scenes.scenario
    S, L, N = scenes.codes.shape
    dev = scenes.device
    cd = torch.complex128
    rd = torch.float64
    y, H, _ = unit_power(scenes.y.to(cd), scenes.H.to(cd))
    codes = scenes.codes.to(cd)
    K = est.phi.shape[1]
    act = torch.arange(K, device=dev).view(1, -1) < est.K.to(dev).view(-1, 1)
    z = lambda t, v: torch.where(act, torch.nan_to_num(t.to(dev, rd), nan=v), torch.full_like(t.to(dev, rd), v))
    A = physics.steering(z(est.phi, 0.0), z(est.theta, 0.0), z(est.r, 1.0), sc, dtype=cd) * act.to(cd).unsqueeze(-1)  # [S, K, N]
    Q = _n_levels(sc.code_bits)
    parametric = amplitude_model == "parametric" or (amplitude_model == "auto" and 2 ** int(sc.code_bits) > MAX_LEVELS)
    q = _level_index(codes, Q)  # [S, L, N]
    onehot = torch.nn.functional.one_hot(q, Q).to(cd)  # [S, L, N, Q]
    counts = onehot.real.sum((1, 2)).to(torch.int64)  # [S, Q]
    phases = (torch.arange(Q, dtype=rd, device=dev) * (2 * math.pi / Q)).expand(S, Q)
    args = (y, H, codes, A, act, q, onehot)
    ones = torch.ones(S, Q + N, dtype=rd, device=dev)
    theta, _ = _levenberg_marquardt(ones, torch.ones(Q + N, dtype=torch.bool, device=dev), hardware_iterations, *args)
    g = theta[:, Q:] / theta[:, Q:].median(1, keepdim=True).values.clamp_min(1e-30)
    has = act.any(1, keepdim=True)
    levels_only = torch.arange(Q + N, device=dev) < Q
    LM = float(y.shape[1] * y.shape[2])
    n_fitted = _amplitude_parameters(counts, parametric)  # amplitude parameters of a fitted candidate
    best = None
    for ratio in (0.0, 0.5 * float(failed_ratio), float(failed_ratio)):  # the candidate failed sets
        f = (g < ratio) & has
        f = f & ~f.all(1, keepdim=True)  # at least one element works
        work = (~f).to(rd)
        for fitted in (False, True):  # ideal amplitudes, or one per level
            th = torch.cat([theta[:, :Q] if fitted else ones[:, :Q], work], dim=1)
            if fitted:
                th, rss = _levenberg_marquardt(th, levels_only, max(1, int(hardware_iterations) // 2), *args)
            else:
                rss = _vp_residual(th, *args[:-1])[0]
            n_amp = n_fitted if fitted else 0
            crit = LM * torch.log(rss.clamp_min(1e-300)) + float(hardware_penalty) * n_amp + float(failed_penalty) * f.sum(1)
            crit = torch.nan_to_num(crit, nan=float("inf"))
            cand = (crit, th[:, :Q], f, torch.full((S,), fitted, device=dev))
            if best is None:
                best = cand
            else:
                take = cand[0] < best[0]
                best = tuple(torch.where(take.view(-1, *([1] * (u.ndim - 1))), u, v) for u, v in zip(cand, best))
    _, alpha, failed, fitted = best
    alpha = alpha / alpha.masked_fill(counts == 0, 0).max(1, keepdim=True).values.clamp_min(1e-30)
    alpha = torch.where(counts == 0, torch.ones_like(alpha), alpha)  # a level that never occurs: not identifiable
    ideal = ~has.view(-1)
    g = torch.where(ideal.view(-1, 1), torch.ones_like(g), g)
    beta, mu, kappa, scale = _fit_parametric(alpha, phases, counts)
    return Hardware(alpha, phases.clone(), counts, g, failed, fitted & ~ideal, beta, mu, kappa, scale, parametric)


def criterion(scenes: Scenes, est: Estimates, options: ml.MLOptions | None = None, *, model: str | None = None):
    """The penalised likelihood of the answer ``est`` on ``scenes`` (their codes as given): ml's
    likelihood refined from it (``final_iterations`` steps, powers and sigma^2 initialised by least
    squares, positions clipped into the prior box), then under the model-error floor of option
    ``mismatch`` (:func:`risloc.estimators.ml._with_floor`, where it takes a level > 0: NLL +
    ``mismatch_penalty``), plus the order penalty tau K-hat. Returns (criterion ``[S]``, the refined
    positions as :class:`Estimates`)."""
    opts = options if options is not None else ml.MLOptions()
    sc = scenes.scenario
    cd = opts.dtype
    rd = physics.real_dtype(cd)
    dev = scenes.device
    y, H, empty = unit_power(scenes.y.to(cd), scenes.H.to(cd))
    box = ml._box(sc, rd, dev)
    prob = ml._Problem(y, H, scenes.codes.to(cd), sc, (model or sc.signal) == "static", box, None, opts)
    st = ml._init_state(est, box, est.phi.shape[1], rd, dev)
    if not prob.static:
        st.logp, st.logs = ml._ls_powers(st, prob)
    st, nll, _, _ = ml._refine(st, prob, opts.final_iterations)
    nll = torch.nan_to_num(nll, nan=float("inf"))
    if ml._robust(prob):
        prob_f, level = ml._with_floor(st, prob)
        new, nll_f, _, _ = ml._refine(st, prob_f, ml._MISMATCH_ITERATIONS)
        nll_f = torch.nan_to_num(nll_f, nan=float("inf")) + float(opts.mismatch_penalty)
        take = level > 0
        st = ml._where(take, new, st)
        nll = torch.where(take, nll_f, nll)
    crit = nll + prob.tau * est.K.to(dev, rd)
    return crit, ml._output(st, est.K.to(dev), empty, st.phi.shape[1], est.method)


def _scatter(part: Estimates, idx: Tensor, whole: Estimates) -> Estimates:
    """``whole`` with its scenes ``idx`` replaced by ``part`` (the estimates of those scenes, in order)."""
    def put(a: Tensor, b: Tensor) -> Tensor:
        out = b.clone()
        out[idx] = a.to(b.dtype)
        return out

    return Estimates(put(part.K, whole.K), *(put(getattr(part, n), getattr(whole, n)) for n in ("phi", "theta", "r")),
                     whole.method)


def _pick(cond: Tensor, a: Estimates, b: Estimates) -> Estimates:
    """Per scene: ``a`` where ``cond``, else ``b``."""
    c = cond.view(-1, 1)
    return Estimates(torch.where(cond, a.K, b.K), *(torch.where(c, getattr(a, n), getattr(b, n)) for n in ("phi", "theta", "r")),
                     b.method)


def estimate(scenes: Scenes, *, k_max: int | None = None, K: int | Tensor | None = None, snr_db=None,
             model: str | None = None, options: ml.MLOptions | None = None, mismatch: str | float = "auto",
             joint_iterations: int = 2, hardware_iterations: int = 8, hardware_penalty: float = 2.0,
             failed_penalty: float = 5.0, failed_ratio: float = 0.5, amplitude_model: str = "auto",
             **overrides) -> Estimates:
    """Positions and RIS hardware jointly (module docstring); returns the positions (``method``
    "ml-joint"; :func:`estimate_hardware` on the answer gives the hardware).

    Args:
        scenes, k_max, K, snr_db, model, options, **overrides: as :func:`risloc.estimators.ml.estimate`
            (``mismatch="auto"`` and ``init_grow=1, init_relax=1, init_prune=2`` by default; the
            ``init_*`` options apply to step 1b; with a known ``K`` step 1b neither grows nor prunes).
        joint_iterations, hardware_iterations, hardware_penalty, failed_penalty, failed_ratio,
        amplitude_model: :class:`JointOptions`.
    """
    jo = JointOptions(joint_iterations, hardware_iterations, hardware_penalty, failed_penalty, failed_ratio,
                      amplitude_model)
    names = {f.name for f in fields(ml.MLOptions)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"ml-joint: unknown option(s) {sorted(unknown)}; known: {sorted(names | _JOINT)}")
    base = options if options is not None else ml.MLOptions()
    grow = {k: overrides.pop(k, DEFAULTS[k]) for k in ("init_grow", "init_relax", "init_prune")}
    opts = replace(base, mismatch=mismatch, **overrides)
    if K is not None:
        grow.update(init_grow=0, init_prune=0)
    start = ml.estimate(scenes, k_max=k_max, K=K, snr_db=snr_db, model=model, options=opts)
    best = start
    S = len(scenes)
    if jo.joint_iterations == 0 or S == 0:
        best.method = "ml-joint"
        return best
    with torch.no_grad():
        best_crit, refined = criterion(scenes, start, opts, model=model)
        best_crit = torch.where(torch.isfinite(best_crit), best_crit, torch.full_like(best_crit, float("inf")))
        empty = ~(scenes.y.abs().square().mean((1, 2)) > 0)
        cur = refined
        for _ in range(jo.joint_iterations):
            hw = estimate_hardware(scenes, cur, hardware_iterations=jo.hardware_iterations, hardware_penalty=jo.hardware_penalty,
                                   failed_penalty=jo.failed_penalty,
                                   failed_ratio=jo.failed_ratio, amplitude_model=jo.amplitude_model)
            n = hw.n_parameters()
            # the ideal hardware is ml-robust's model: the joint pass runs only where the fit found another
            idx = torch.nonzero((n.sum(1) > 0) & ~empty).flatten()
            if idx.numel() == 0:
                break
            sub = scenes[idx]
            told = replace(sub, codes=hw[idx].realised(sub.codes.to(torch.complex128)).to(sub.codes.dtype), truth=None)
            snr_sub = snr_db[idx] if isinstance(snr_db, Tensor) and snr_db.dim() > 0 else snr_db
            cand = ml.estimate(told, k_max=k_max, snr_db=snr_sub, model=model, init=cur[idx], options=replace(opts, **grow))
            crit, refined = criterion(told, cand, opts, model=model)
            n = n[idx].to(crit.dtype)
            crit = crit + jo.hardware_penalty * n[:, 0] + jo.failed_penalty * n[:, 1]
            better = torch.zeros(S, dtype=torch.bool, device=crit.device)
            better[idx] = crit < best_crit[idx]
            best = _pick(better, _scatter(cand, idx, best), best)
            best_crit = best_crit.index_put((idx,), torch.where(better[idx], crit, best_crit[idx]))
            cur = _scatter(refined, idx, cur)
    best.method = "ml-joint"
    return best


estimate = register("ml-joint")(estimate)
