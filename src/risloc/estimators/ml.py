"""Maximum-likelihood localisation (``ml``): greedy likelihood search on a near-field
dictionary, joint Fisher-scoring refinement, likelihood-penalty order selection.

Measurement model (docs/model.md): for snapshot l = 1..L,

    y_l = G_l A(eta) s(l) + n_l,   G_l = H diag(c_l),   n_l ~ CN(0, sigma^2 I_M),

with A = [a(phi_k, theta_k, r_k)] the exact near-field RIS steering vectors.

Likelihoods (``model``):

* ``"stochastic"`` (s(l) ~ CN(0, P) i.i.d.; Jaffer 1988, Stoica & Nehorai 1990):
  y_l ~ CN(0, C_l), C_l = B_l P B_l^H + sigma^2 I, B_l = G_l A, and
  NLL = sum_l [log det C_l + y_l^H C_l^-1 y_l]; unknowns eta, P = diag(p), sigma^2.
* ``"static"`` (s(l) = g; deterministic/conditional ML, Bresler & Macovski 1986):
  y = Psi(eta) g + n with Psi = [G_1 A; ...; G_L A]; g and sigma^2 concentrated out,
  NLL = L M log |P_perp(Psi) y|^2.

Stages (all batched over scenes; scenes with different K are handled by masks):

1. Normalise y per scene to unit mean power (scale invariance), and H to unit mean power.
2. Forward greedy pass: for k = 1..k_max, every atom of a dictionary uniform in
   (sin phi, sin theta, 1/r) is scored by the exact likelihood gain of adding it to the
   current model. Stochastic: with alpha_l = phi_l^H C_l^-1 phi_l and
   beta_l = |phi_l^H C_l^-1 y_l|^2 (phi_l = G_l d_q) the NLL change is
   sum_l [log(1 + p alpha_l) - p beta_l / (1 + p alpha_l)] (inversion and determinant
   lemmas), minimised over p (and over sigma^2 for the first source). Static: orthogonal
   least squares, the RSS reduction |phi^H r|^2 / |P_perp phi|^2.
   After each addition all positions (and powers, sigma^2) are refined jointly by
   Levenberg-Marquardt-damped Fisher scoring (stochastic) or variable-projection
   Gauss-Newton (static), projected onto the priors' box. At k = k_max one RELAX cycle
   (Li & Stoica 1996: remove each source in turn, re-search it given the others, keep if
   the NLL drops) un-merges sources the greedy pass fused.
3. Backward pass: from k_max down, drop the source whose removal costs least, refine,
   and keep that (k-1)-source model if it beats the forward one (the one pruning step,
   ``_drop_one``, also used by the ``init`` path's ``init_prune``).
4. Order selection: K-hat = argmin_K NLL_K + tau K (tau per source, calibrated on
   simulated validation scenes, docs/estimators-ml.md); orders whose estimated powers
   spread more than the scenario's power spread + a margin are excluded (stochastic).
   With a known ``K`` (int or per scene) stages 2-3 run up to max(K) sources and K-hat = K.
5. One RELAX cycle and a final refinement of the selected model.
6. Range decision: the reported range maximises the posterior hit probability
   P(|r-hat - r| <= 0.1 r) under the scenario's uniform range prior, with the likelihood
   of 1/r approximated by a Gaussian of the (inflated) Fisher variance (``range_decision``).

Priors used (all read from ``scenes.scenario``): the field of view phi in [phi_min, phi_max],
theta in [theta_min, theta_max], range r in [r_min, r_max] (positions are kept inside this
box), the uniform distribution of r on that interval (range decision), k_max, the power
spread (``power_spread_db``) for the order rule, and the signal model (``scenario.signal``)
to pick the likelihood unless ``model=`` says otherwise.

``init``: an :class:`~risloc.scenes.Estimates` (K-hat and positions, e.g. from a network)
skips stages 2-5: its K-hat sources are refined by the same likelihood (powers and sigma^2
initialised by least squares; positions clipped into the prior box) and K-hat is kept,
except that ``init_grow = m`` greedy additions (stage 2's forward step, each kept only where the
order rule of stage 4 prefers it) may follow, then ``init_relax`` RELAX cycles (stage 5) with a
final refinement, then ``init_prune = n`` pruning passes may drop sources by the order rule of
stage 4, and after them the same rule compares the model with the empty one (K-hat = 0 where no
source pays its penalty, as the search path decides on noise alone); the range decision
(stage 6) comes last, as usual.

Model error (``mismatch``, off by default; ``ml-robust`` is ``mismatch="auto"``): CSI error and
RIS phase noise enter the stochastic likelihood as a floor added to the noise,
C_l = B_l P B_l^H + sigma^2 I + F_l, the error covariance given the signals with |diag(c_l) x_l|^2
replaced by its posterior mean under the plain fit (white e~ q_l I for CSI error, coloured
e~ H diag(omega_l) H^H for phase noise; :func:`risloc.estimators.ml_core.mismatch_floor`,
:func:`~risloc.estimators.ml_core.coloured_floor`); after stage 3 every order of the path is
re-scored under it and stage 4 selects K-hat on those likelihoods (``_rescore``); with ``init``
it is built before the pruning passes. ``amplitude="scenario"``: the scenario's practical
amplitude model applied to the codes.

Code: the options are the frozen dataclass :class:`MLOptions` (every field documented;
``estimate`` accepts them as keywords too); one batch of the problem is the record
``_Problem`` (normalised y, the maps through H and the codes, the likelihood, the prior box,
the nominal SNR, the options); the likelihoods, their gradients and Fisher matrices are in
:mod:`risloc.estimators.ml_core`, the dictionary in :mod:`risloc.grids`. The stages can run
without reading a device value (a loop over sources runs over all K_max slots where no bound on
K-hat is known on the host; a pass beyond a scene's K-hat changes nothing), so a few scenes on
CUDA replay them as CUDA graphs (:func:`_graphed`, :mod:`risloc.cuda_graphs`): the ``init`` path
as one graph, the search as two (up to K-hat, and after one host read of the largest K-hat the
RELAX cycle, refinement and range decision). Known K and the mismatch-aware likelihood run these
stages eagerly; so does everything off CUDA or beyond a few scenes, where the ``init`` path reads
its largest order once to bound its RELAX passes.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .. import cuda_graphs, grids, physics
from ..metrics import RANGE_TOL_REL
from ..scenario import Scenario
from ..scenes import Estimates, Scenes
from . import register
from .ml_core import (coloured_floor, compile_step, inverse, measure, mismatch_floor, mismatch_level, power_scales,
                      signal_energy, solve, static_eval, stochastic_eval, unit_power)


@dataclass(frozen=True)
class MLOptions:
    """Options of ``ml`` (defaults calibrated on simulated validation scenes, docs/estimators-ml.md).

    ``estimate(scenes, options=MLOptions(...))`` or ``estimate(scenes, top=16, ...)`` (keywords
    override fields of ``options``).
    """

    grid_shape: tuple[int, int, int] = (25, 13, 14)
    """Dictionary atoms (n_phi, n_theta, n_r) of the near-field grid (:mod:`risloc.grids`)."""
    penalty_stochastic: float = 10.0
    """Order penalty tau [nats per source] of K-hat = argmin NLL_K + tau K, stochastic likelihood."""
    penalty_static: float = 14.0
    """Order penalty tau [nats per source], static likelihood."""
    power_margin_db: float | None = 4.0
    """Margin [dB] on the scenario's power spread: orders whose estimated powers spread more are
    excluded (stochastic likelihood); None disables the power rule."""
    greedy_iterations: int = 12
    """Refinement steps after each greedy addition, RELAX re-search and backward drop."""
    final_iterations: int = 25
    """Refinement steps of the selected model (also of the ``init`` path)."""
    backward: bool = True
    """Run the backward pass (stage 3)."""
    relax_cycles: int = 1
    """RELAX re-search cycles on the selected model (stage 5)."""
    relax_at: str | tuple[int, ...] = "last"
    """Forward-pass orders followed by a RELAX cycle: "last" (the largest order searched) or a tuple of orders."""
    range_decision: str = "hit"
    """"hit": the Bayes hit-optimal range under r ~ U[r_min, r_max] (stage 6); "ml": the ML range."""
    range_grid: int = 512
    """Points of the geometric range grid of the range decision."""
    range_var_scale: float = 2.0
    """Inflation of the Fisher variance of rho used by the range decision."""
    top: int = 32
    """Atoms scored exactly after the proxy screening (stochastic greedy step)."""
    init_prune: int = 0
    """``init`` path only: backward pruning passes on the given K-hat (penalised NLL + power rule)."""
    init_grow: int = 0
    """``init`` path only: greedy additions (the forward step of stage 2 on the dictionary, kept
    where the penalised NLL and the power rule prefer them) after refining the given sources,
    before the pruning passes."""
    init_relax: int = 0
    """``init`` path only: RELAX re-search cycles (stage 5) after the greedy additions, then a
    refinement of ``final_iterations`` steps."""
    relax_sources: int = 0
    """Sources re-searched by each RELAX cycle (stage 5, ``init_relax``), weakest first by
    estimated power: 0 re-searches every source; n > 0 only the n weakest (a source the
    refinement left at a wrong position has a low estimated power, so the weakest are the ones
    worth a new search; each re-search costs a dictionary scan and a refinement)."""
    dtype: torch.dtype = torch.complex64
    """Working precision of the likelihood (complex64 or complex128)."""
    compile: bool = False
    """Evaluate the likelihood through ``torch.compile`` in real arithmetic instead of about 600
    operators per evaluation: the stochastic one as three compiled graphs
    (:func:`risloc.estimators.ml_core.stochastic_eval_parts`: the measured steering vectors and
    their derivatives with C; C^-1 and log det C by Gauss-Jordan elimination; the products,
    gradient and Fisher matrix), the static one as two
    (:func:`risloc.estimators.ml_core.static_eval_parts`); and the bookkeeping of every
    Fisher-scoring step (the damped step and its decision, :func:`_lm_propose`,
    :func:`_lm_accept`) fused likewise. The first call in a process compiles (seconds to a
    minute: once per new batch shape and number of sources; needs a C++ compiler on the CPU,
    Triton on CUDA) and answers differ from the eager ones by float rounding; a failed
    compilation raises."""
    mismatch: str | float = "none"
    """Model error of the known channel and codes (CSI error, RIS phase noise) in the stochastic
    likelihood, as a signal-dependent white floor f_l = e~ q_l added to sigma^2
    (:func:`risloc.estimators.ml_core.mismatch_floor`): ``"none"`` the plain likelihood; a number
    e~ >= 0, the known coefficient (:func:`risloc.estimators.ml_core.mismatch_level` from a CSI
    NMSE and a phase-noise level); ``"auto"``, e~ chosen per scene from ``mismatch_levels`` by the
    likelihood of the plain fit; ``"scenario"``, the level of the scenario's impairment fields
    (``csi_nmse_db``, ``ris_phase_noise_deg``) when it has them. The orders of the search path are
    then re-scored and selected under this likelihood (docs/estimators-ml.md). The static likelihood
    ignores it (with unit-modulus codes the floor is the same in every snapshot: sigma^2 absorbs it)."""
    amplitude: str = "given"
    """RIS amplitudes of the codes the likelihood uses: ``"given"``, the codes as they are;
    ``"scenario"``, the scenario's phase-dependent amplitude model applied to them where it is
    ``ris_amplitude = "practical"`` (|c~| = (1 - beta_min) ((sin(theta - mu) + 1) / 2)^kappa + beta_min
    of the commanded phase theta, :func:`risloc.physics.realised_codes`; the given codes must then be
    unit-modulus)."""
    mismatch_levels: tuple[float, ...] = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)
    """Candidate coefficients e~ of ``mismatch="auto"``."""
    mismatch_kinds: tuple[str, ...] = ("white", "coloured")
    """Floors ``mismatch="auto"`` tries at each level: ``"white"`` (CSI error) and/or
    ``"coloured"`` (phase noise)."""
    mismatch_penalty: float = 2.5
    """``mismatch="auto"``: a level e~ > 0 is taken only where it lowers the NLL of the plain fit by
    more than this [nats] (one extra parameter; keeps e~ = 0, the plain likelihood, on scenes
    without model error). 2.5 was chosen on 8 000 validation scenes (seeds 1000 and 2026; ideal,
    CSI NMSE -30 and -15 dB, 10 deg phase noise, 10...20 dB; benchmarks/results/cpu/ml-robust-penalty):
    the smallest threshold that lost no scene to plain ``ml`` on either seed (2 nats lost 2 at
    CSI -30 dB on each)."""

    def __post_init__(self):
        if len(tuple(self.grid_shape)) != 3 or min(int(n) for n in self.grid_shape) < 1:
            raise ValueError(f"ml: grid_shape = {self.grid_shape}: must be three counts >= 1")
        for name in ("greedy_iterations", "final_iterations", "relax_cycles", "init_prune", "init_grow", "init_relax",
                     "relax_sources"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ml: {name} = {getattr(self, name)}: must be >= 0")
        if int(self.top) < 1:
            raise ValueError(f"ml: top = {self.top}: must be >= 1")
        if int(self.range_grid) < 2:
            raise ValueError(f"ml: range_grid = {self.range_grid}: must be >= 2")
        if self.range_decision not in ("hit", "ml"):
            raise ValueError(f"ml: range_decision = {self.range_decision!r}: must be 'hit' or 'ml'")
        if self.relax_at != "last" and isinstance(self.relax_at, str):
            raise ValueError(f"ml: relax_at = {self.relax_at!r}: must be 'last' or a tuple of orders")
        if not isinstance(self.compile, bool):
            raise ValueError(f"ml: compile = {self.compile!r}: must be true or false")
        if self.dtype not in (torch.complex64, torch.complex128):
            raise ValueError(f"ml: dtype = {self.dtype}: must be torch.complex64 or torch.complex128")
        if isinstance(self.mismatch, str):
            if self.mismatch not in ("none", "auto", "scenario"):
                raise ValueError(f"ml: mismatch = {self.mismatch!r}: must be 'none', 'auto', 'scenario' or a number >= 0")
        elif isinstance(self.mismatch, bool) or not (math.isfinite(float(self.mismatch)) and float(self.mismatch) >= 0):
            raise ValueError(f"ml: mismatch = {self.mismatch!r}: must be 'none', 'auto', 'scenario' or a number >= 0")
        if not self.mismatch_kinds or not set(self.mismatch_kinds) <= {"white", "coloured"}:
            raise ValueError(f"ml: mismatch_kinds = {self.mismatch_kinds!r}: must be a non-empty subset of ('white', 'coloured')")
        if self.amplitude not in ("given", "scenario"):
            raise ValueError(f"ml: amplitude = {self.amplitude!r}: must be 'given' or 'scenario'")
        levels = tuple(float(v) for v in self.mismatch_levels)
        if not levels or min(levels) < 0 or not all(math.isfinite(v) for v in levels):
            raise ValueError(f"ml: mismatch_levels = {self.mismatch_levels}: must be finite numbers >= 0")
        if not (self.mismatch_penalty >= 0):
            raise ValueError(f"ml: mismatch_penalty = {self.mismatch_penalty}: must be >= 0")

    def penalty(self, static: bool) -> float:
        """The order penalty tau of the likelihood in use."""
        return self.penalty_static if static else self.penalty_stochastic


DEFAULTS = {f.name: getattr(MLOptions(), f.name) for f in fields(MLOptions) if f.name != "dtype"}
"""The defaults of :class:`MLOptions` as a dict (without ``dtype``)."""

OPTION_TYPES = {f.name: f.type for f in fields(MLOptions) if f.name != "dtype"}
"""The annotations of :class:`MLOptions`'s fields (the registry checks command-line values against them)."""


def _repeat_batch(t: Tensor, n: int) -> Tensor:
    """``n`` copies of the batch ``t`` ``[B, ...]`` stacked along it: ``[n B, ...]``, copy i at i B + b."""
    return t.repeat(n, *[1] * (t.ndim - 1))


@dataclass
class _Problem:
    """One batch of the localisation problem, as the likelihood sees it.

    ``y`` ``[B, L, M]`` snapshots (scaled to unit mean power per scene), the maps
    ``G_l = H diag(c_l)`` through ``H`` ``[B, M, N]`` (unit mean power) and ``codes`` ``[B, L, N]``,
    the likelihood (``static``), the prior ``box`` (lo, hi) on (phi, theta, rho = 1/r), the
    optional nominal SNR (dB) that initialises sigma^2, and the options.
    """

    y: Tensor
    H: Tensor
    codes: Tensor
    scenario: Scenario
    static: bool
    box: tuple[Tensor, Tensor]
    snr_db: Tensor | float | None
    opts: MLOptions
    floor: Tensor | None = None
    """Model-error floor added to the noise of the stochastic likelihood: white f_l ``[B, L]``
    (:func:`risloc.estimators.ml_core.mismatch_floor`) or a matrix F_l ``[B, L, M, M]``
    (:func:`risloc.estimators.ml_core.coloured_floor`); None: the plain likelihood."""
    G: Tensor | None = None
    """The stacked maps G_l = H diag(c_l) ``[B, L M, N]`` (:func:`risloc.grids.maps`),
    made once for the many likelihood evaluations of a batch; None: each evaluation applies H and
    the codes itself (a problem repeated for many models, :meth:`repeat`)."""

    @property
    def tau(self) -> float:
        return self.opts.penalty(self.static)

    def repeat(self, n: int) -> "_Problem":
        """The batch ``n`` times over, stacked along the batch (for evaluating n models of every
        scene in one likelihood call); the nominal SNR is not carried (only the search uses it)."""
        rep = lambda t: None if t is None else _repeat_batch(t, n)  # noqa: E731
        return replace(self, y=rep(self.y), H=rep(self.H), codes=rep(self.codes), floor=rep(self.floor), snr_db=None, G=None)


@dataclass
class _Atoms:
    """The dictionary as the greedy steps see it, without the measured dictionary
    Phi_l = G_l D ``[B, L, M, Q]`` in memory: D ``[N, Q]`` (:func:`risloc.grids.dictionary` on the
    grid ``opts.grid_shape``), the maps (``H``, ``codes``), n2 = |phi_lq|^2 ``[B, L, Q]``
    (:func:`risloc.grids.atom_norms`), c = phi_lq^H y_l ``[B, L, Q]`` and the atoms' (phi, theta, rho).

    Every other product with the atoms goes through the dictionary (:func:`risloc.grids.back_project`):
    v^H phi_lq = (G_l^H v)^H d_q, one product with D for all atoms (:meth:`products`).

    Per-scene atoms (the ``atoms`` option of the ``init`` path, :func:`_candidate_dictionary`):
    D ``[B, N, C]`` and the atoms' (phi, theta, rho) ``[B, C]``.
    """

    D: Tensor
    H: Tensor
    codes: Tensor
    n2: Tensor
    c: Tensor
    atoms: tuple[Tensor, Tensor, Tensor]

    def products(self, v: Tensor) -> Tensor:
        """v_l^H Phi_l = conj(G_l^H v_l)^T D: ``v`` ``[B, L, M]`` -> ``[B, L, Q]``, or J vectors per
        snapshot ``[B, L, J, M]`` -> ``[B, L, J, Q]`` (:func:`risloc.grids.dictionary_product`:
        on the tensor cores on CUDA)."""
        w = grids.back_project(v, self.H, self.codes).conj()
        if self.D.ndim == 2:
            return grids.dictionary_product(w, self.D)
        return w @ (self.D if w.ndim == 3 else self.D.unsqueeze(1))

    def summed_products(self, v: Tensor) -> Tensor:
        """sum_l v_l^H Phi_l = (sum_l conj(G_l^H v_l))^T D (the stacked dictionary
        [Phi_1; ...; Phi_L] against stacked vectors): ``[B, L, M]`` -> ``[B, Q]``,
        ``[B, L, J, M]`` -> ``[B, J, Q]``."""
        w = grids.back_project(v, self.H, self.codes).sum(1).conj()
        if self.D.ndim == 2:
            return grids.dictionary_product(w, self.D)
        if w.ndim == 2:  # per-scene atoms: one row per scene
            return (w.unsqueeze(1) @ self.D).squeeze(1)
        return w @ self.D

    def atom(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(phi, theta, rho) ``[B]`` of atom ``q[b]`` of each scene."""
        gp, gt, gr = self.atoms
        if gp.ndim == 1:
            return gp[q], gt[q], gr[q]
        pick = lambda t: t.gather(1, q.view(-1, 1)).squeeze(1)
        return pick(gp), pick(gt), pick(gr)


_BOXES: dict = cuda_graphs.register_cache({})


def _box(scenario, dtype, device) -> tuple[Tensor, Tensor]:
    """The prior box of (phi, theta, rho = 1/r): lower and upper corners ``[3]`` (read only), cached
    per box, dtype and device, so that a call inside a CUDA-graph capture copies nothing from the host."""
    sc = scenario
    lo = (sc.phi_min, sc.theta_min, 1.0 / sc.r_max)
    hi = (sc.phi_max, sc.theta_max, 1.0 / sc.r_min)
    build = lambda: (torch.tensor(lo, dtype=dtype, device=device), torch.tensor(hi, dtype=dtype, device=device))
    return cuda_graphs.cache_entry(_BOXES, (lo, hi, dtype, str(device)), build)


@dataclass(eq=False)
class _State:
    """Per-scene parameters of a K_max-slot model: phi, theta, rho, logp ``[B, K]``, logs ``[B]``, active ``[B, K]``."""

    phi: Tensor
    theta: Tensor
    rho: Tensor
    logp: Tensor
    logs: Tensor
    active: Tensor

    def vector(self, static: bool) -> Tensor:
        parts = [self.phi, self.theta, self.rho] + ([] if static else [self.logp, self.logs.unsqueeze(-1)])
        return torch.cat(parts, dim=1)

    @staticmethod
    def from_vector(v: Tensor, K: int, like: "_State", static: bool) -> "_State":
        if static:
            return _State(v[:, :K], v[:, K : 2 * K], v[:, 2 * K : 3 * K], like.logp, like.logs, like.active)
        return _State(v[:, :K], v[:, K : 2 * K], v[:, 2 * K : 3 * K], v[:, 3 * K : 4 * K], v[:, 4 * K], like.active)

    def clone(self) -> "_State":
        return _State(*(t.clone() for t in (self.phi, self.theta, self.rho, self.logp, self.logs, self.active)))

    def repeat(self, n: int) -> "_State":
        """``n`` copies of every scene's model, stacked along the batch (copy i of scene b at i B + b)."""
        return _State(*(_repeat_batch(t, n) for t in (self.phi, self.theta, self.rho, self.logp, self.logs, self.active)))


def _init_state(init: Estimates, box, K: int, rd, device) -> _State:
    """The ``K``-slot state of an answer ``init``: its first min(K-hat, K) sources active, their
    positions clipped into the prior ``box`` (a NaN, and every inactive slot, at the middle of the
    box; range as rho = 1 / r); powers and sigma^2 zero (the ``init`` path and
    :func:`risloc.estimators.ml_joint.criterion` set them by least squares)."""
    B = len(init)
    kin = init.K.to(device).clamp(0, K)
    act = torch.arange(K, device=device).view(1, -1) < kin.view(-1, 1)
    lo, hi = box
    mid = (lo + hi) / 2
    z = torch.zeros(B, K, dtype=rd, device=device)

    def take(t, m):  # the given value where the slot is active and the value finite, else m (no host read)
        t = t[:, :K].to(device, rd)
        return torch.where(act & ~torch.isnan(t), t, z + m)

    return _State(
        take(init.phi, mid[0]).clamp(lo[0], hi[0]),
        take(init.theta, mid[1]).clamp(lo[1], hi[1]),
        (1.0 / take(init.r, 1.0 / mid[2])).clamp(lo[2], hi[2]),
        z,
        torch.zeros(B, dtype=rd, device=device),
        act,
    )


def _empty_state(B: int, K: int, box, rd, device) -> _State:
    """The model without sources in ``K`` slots: every slot inactive, at (0, 0) and the middle of
    the range box, log power -30, sigma^2 = 1 (the mean power of y after scaling)."""
    lo, hi = box
    z = torch.zeros(B, K, dtype=rd, device=device)
    return _State(z.clone(), z.clone(), z + (lo[2] + hi[2]) / 2, torch.full_like(z, -30.0),
                  torch.zeros(B, dtype=rd, device=device), torch.zeros(B, K, dtype=torch.bool, device=device))


def _evaluate(state: _State, prob: _Problem, derivatives: bool = True):
    y, H, codes, sc = prob.y, prob.H, prob.codes, prob.scenario
    if prob.static:
        nll, g, F, amp = static_eval(state.phi, state.theta, state.rho, state.active, y, H, codes, sc, derivatives=derivatives,
                                     G=prob.G, compiled=prob.opts.compile)
        return nll, g, F, amp
    nll, g, F = stochastic_eval(
        state.phi, state.theta, state.rho, state.logp, state.logs, state.active, y, H, codes, sc, derivatives=derivatives,
        floor=prob.floor, G=prob.G, compiled=prob.opts.compile,
    )
    return nll, g, F, None


def _graphed(name: str, stage, prob: _Problem, **args):
    """``stage(prob=prob, **args)`` -- a stage that reads no device value -- replayed as a CUDA graph
    for a few scenes on CUDA (:func:`risloc.cuda_graphs.graphed`), else run as it is. The tensors
    of ``args`` (tensors, states, dictionaries, estimates) and of ``prob`` (y, H, codes, floor,
    box, maps) are the graph's inputs; the other arguments (counts, the likelihood, the options, the
    scenario) are baked into the graph and key it. The nominal SNR is not passed (the search's
    first step takes it as ``s2_grid``)."""
    if not cuda_graphs.graphable(prob.y.shape[0], prob.y.device):
        return stage(prob=prob, **args)
    given = {k: v for k, v in args.items() if isinstance(v, (Tensor, _State, _Atoms, Estimates))}
    baked = tuple(sorted((k, v) for k, v in args.items() if k not in given))

    def call(x):
        (y, H, codes, floor, box, G), inputs = x
        return stage(prob=replace(prob, y=y, H=H, codes=codes, floor=floor, box=box, snr_db=None, G=G), **inputs, **dict(baked))

    key = (name, baked, prob.static, repr(prob.opts), prob.scenario.to_json())
    return cuda_graphs.graphed(call, ((prob.y, prob.H, prob.codes, prob.floor, prob.box, prob.G), given), key)


def _refine(state: _State, prob: _Problem, iterations: int):
    """Levenberg-Marquardt-damped Fisher scoring / Gauss-Newton, projected on the prior box.

    Step: (F + lambda diag(F)) delta = -grad; a step is kept (per scene) only when it lowers
    the NLL, and lambda is divided by 3 after a kept step and multiplied by 5 otherwise.
    A fixed number of steps that reads no device value: a few scenes on CUDA replay it as one
    captured graph (:func:`_graphed`). Returns (state, NLL, static amplitudes or None,
    Fisher matrix).
    """
    return _graphed("ml._refine", _refine_steps, prob, state=state, iterations=iterations)


def _refine_steps(state: _State, prob: _Problem, iterations: int):
    """The steps of :func:`_refine`, eagerly."""
    K = state.phi.shape[1]
    lo, hi = prob.box
    static = prob.static
    lo_v = torch.cat([lo[i].expand(K) for i in range(3)])  # the positions' box, then (stochastic) log p and log sigma^2
    hi_v = torch.cat([hi[i].expand(K) for i in range(3)])
    if not static:
        lo_v = torch.cat([lo_v, lo_v.new_full((K,), _LOGP_MIN), lo_v.new_full((1,), _LOGS_MIN)])
        hi_v = torch.cat([hi_v, hi_v.new_full((K,), _LOGP_MAX), hi_v.new_full((1,), _LOGS_MAX)])
    nll, g, F, amp = _evaluate(state, prob)
    x = state.vector(static)
    lam = torch.full_like(nll, 1e-2)
    propose, accept = (compile_step(_lm_propose), compile_step(_lm_accept)) if prob.opts.compile else (_lm_propose, _lm_accept)
    for _ in range(iterations):
        xt = propose(F, g, x, lam, lo_v, hi_v)
        trial = _State.from_vector(xt, K, state, static)
        nll_t, g_t, F_t, amp_t = _evaluate(trial, prob)
        ok, x, nll, g, F, lam = accept(xt, nll_t, g_t, F_t, x, nll, g, F, lam)
        if static:
            amp = torch.where(ok.unsqueeze(-1), amp_t, amp)
        state = _State.from_vector(x, K, state, static)
    return state, nll, amp, F


def _lm_propose(F: Tensor, g: Tensor, x: Tensor, lam: Tensor, lo_v: Tensor, hi_v: Tensor) -> Tensor:
    """The trial point of one step of :func:`_refine`: x - delta with (F + lambda diag(F)) delta = grad
    (plus 1e-9 of F's mean diagonal), projected on the box [lo_v, hi_v]; a step that the solve
    cannot give (singular: NaN) is no step. ``F`` ``[B, P, P]``, ``g``, ``x`` ``[B, P]``, ``lam`` ``[B]``."""
    dF = torch.diagonal(F, dim1=-2, dim2=-1)
    Ad = F + torch.diag_embed(lam.view(-1, 1) * dF + 1e-9 * (dF.mean(-1, keepdim=True) + 1e-12))
    step = torch.nan_to_num(solve(Ad, g.unsqueeze(-1)).squeeze(-1), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.minimum(torch.maximum(x - step, lo_v), hi_v)


def _lm_accept(xt: Tensor, nll_t: Tensor, g_t: Tensor, F_t: Tensor, x: Tensor, nll: Tensor, g: Tensor, F: Tensor,
               lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step's decision, per scene: the trial (point ``xt``, its NLL, gradient and Fisher matrix)
    is kept where its NLL is finite and lower; lambda is divided by 3 after a kept step and
    multiplied by 5 otherwise (within [1e-7, 1e7]). Returns (kept ``[B]``, x, NLL, gradient, Fisher
    matrix, lambda)."""
    ok = torch.isfinite(nll_t) & (nll_t < nll)
    x = torch.where(ok.unsqueeze(-1), xt, x)
    nll = torch.where(ok, nll_t, nll)
    g = torch.where(ok.unsqueeze(-1), g_t, g)
    F = torch.where(ok.view(-1, 1, 1), F_t, F)
    lam = torch.where(ok, lam / 3, lam * 5).clamp(1e-7, 1e7)
    return ok, x, nll, g, F, lam


# ------------------------------------------------------------------------------------------
# greedy additions
# ------------------------------------------------------------------------------------------

_LOGS_MIN = math.log(1e-5)  # sigma^2 floor relative to the mean power of y (float32-safe Cholesky)
_LOGS_MAX = 5.0
_LOGP_MIN, _LOGP_MAX = -25.0, 10.0  # the refinement's bounds on log p (powers relative to the mean power of y)
_P_GRID = torch.linspace(-1.5, 3.0, 8).tolist()  # log10 of p * mean_l(alpha_l): whitened per-snapshot SNR of the new source


def _stochastic_gain(alpha: Tensor, beta: Tensor):
    """min over p >= 0 of f(p) = sum_l [log(1 + p alpha_l) - p beta_l / (1 + p alpha_l)].

    A coarse grid in log p (8 points over 4.5 decades) and one parabolic step in log p
    around the best grid point. alpha, beta ``[B, L, Q]`` -> (min f ``[B, Q]`` (<= 0), argmin p ``[B, Q]``).
    """
    amean = alpha.mean(1).clamp_min(1e-30)  # [B, Q]
    lscale = -torch.log10(amean)

    def f(lx):  # lx = log10(p * amean), [B, Q]
        p = torch.pow(10.0, lx + lscale).unsqueeze(1)
        t = 1 + p * alpha
        return (torch.log(t) - p * beta / t).sum(1)

    grid = torch.stack([torch.full_like(amean, x) for x in _P_GRID], dim=-1)  # [B, Q, G] (filled on the device)
    G = len(_P_GRID)
    vals = torch.stack([f(grid[..., i]) for i in range(G)], dim=-1)  # [B, Q, G]
    h = _P_GRID[1] - _P_GRID[0]
    j = torch.argmin(vals, dim=-1).clamp(1, G - 2)
    f0 = vals.gather(-1, (j - 1).unsqueeze(-1)).squeeze(-1)
    f1 = vals.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    f2 = vals.gather(-1, (j + 1).unsqueeze(-1)).squeeze(-1)
    curv = f0 - 2 * f1 + f2
    off = torch.where(curv > 0, 0.5 * (f0 - f2) / curv.clamp_min(1e-30), torch.zeros_like(curv)).clamp(-1, 1)
    lx = grid.gather(-1, j.unsqueeze(-1)).squeeze(-1) + off * h
    fr = f(lx)
    best_g, jg = vals.min(-1)
    lx_g = grid.gather(-1, jg.unsqueeze(-1)).squeeze(-1)
    use_r = fr < best_g
    best = torch.minimum(torch.where(use_r, fr, best_g), torch.zeros_like(fr))
    lx = torch.where(use_r, lx, lx_g)
    return best, torch.pow(10.0, lx + lscale)


def _proxy_gain(alpha: Tensor, beta: Tensor):
    """f(p) at the moment estimate p = (mean beta - mean alpha) / mean(alpha)^2 (cheap screening)."""
    am = alpha.mean(1).clamp_min(1e-30)
    p = ((beta.mean(1) - am) / am**2).clamp_min(1e-2 / am).unsqueeze(1)
    t = 1 + p * alpha
    return torch.clamp((torch.log(t) - p * beta / t).sum(1), max=0.0)


def _add_stochastic(state: _State, k: int, dico: _Atoms, prob: _Problem, s2_grid: Tensor | None, top: int,
                    slots: int | None = None):
    """Add the best dictionary atom as source slot k (stochastic likelihood).

    alpha_l = phi_l^H C_l^-1 phi_l and beta_l = |phi_l^H C_l^-1 y_l|^2 come from the Woodbury form
    C^-1 = (I - B S^-1 B^H) / sigma^2 with S = sigma^2 P^-1 + B^H B = Lc Lc^H (K x K, Cholesky):

        sigma^2 alpha_l = |phi_l|^2 - |Lc^-1 B_l^H phi_l|^2,
        sigma^2 phi_l^H C_l^-1 y_l = phi_l^H y_l - (Lc^-1 B_l^H phi_l)^H (Lc^-1 B_l^H y_l),

    i.e. the products of the K rows of Lc^-1 B_l^H with every atom: one product with the
    dictionary (:meth:`_Atoms.products`; O(L N K) per atom) and no K x K matrix applied to the
    [K, Q] products. An empty slot adds a zero column to B_l and a unit diagonal entry to S,
    i.e. exactly nothing to the scores: the slots from ``slots`` on (a bound the caller knows:
    default ``k`` for an int ``k``, the search path's, else K_max) are left out; no host read of
    which slots are in use. All atoms are screened with a
    one-point proxy of the gain; the ``top`` best are scored exactly (grid + parabola in log p).
    For the first source sigma^2 is searched on ``s2_grid`` too. From ``dico``:
    n2 = |phi_l|^2 and c = phi_l^H y_l ``[B, L, Q]``.
    """
    y, H, codes, sc = prob.y, prob.H, prob.codes, prob.scenario
    B, L, M = y.shape
    n2, c = dico.n2, dico.c
    Q = n2.shape[-1]
    ar = torch.arange(B, device=y.device)
    if isinstance(k, int) and k == 0:
        c2 = torch.view_as_real(c).square().sum(-1)
        yy = y.abs().square().sum((1, 2))  # [B]
        J = s2_grid.shape[1]
        prox = []
        for j in range(J):
            s2 = s2_grid[:, j].view(B, 1, 1)
            base = (L * M * torch.log(s2_grid[:, j]) + yy / s2_grid[:, j]).unsqueeze(-1)
            prox.append(base + _proxy_gain(n2 / s2, c2 / s2**2))
        prox = torch.stack(prox, -1).min(-1).values  # [B, Q]
        idx = torch.topk(-prox, min(top, Q), dim=1).indices  # [B, T]
        g = lambda t: t.gather(2, idx.unsqueeze(1).expand(B, L, -1))
        n2t, c2t = g(n2), g(c2)
        best = None
        for j in range(J):
            s2 = s2_grid[:, j].view(B, 1, 1)
            base = (L * M * torch.log(s2_grid[:, j]) + yy / s2_grid[:, j]).unsqueeze(-1)
            gain, p = _stochastic_gain(n2t / s2, c2t / s2**2)
            val = base + gain
            if best is None:
                best, best_p, best_s = val, p, s2_grid[:, j : j + 1].expand_as(val)
            else:
                better = val < best
                best = torch.where(better, val, best)
                best_p = torch.where(better, p, best_p)
                best_s = torch.where(better, s2_grid[:, j : j + 1].expand_as(val), best_s)
        t = torch.argmin(best, dim=1)
        q = idx[ar, t]
        logs_new = torch.log(best_s[ar, t])
        pk = best_p[ar, t]
    else:
        cd = y.dtype
        n = _scan_slots(k, state.phi.shape[1], slots)  # slots n.. are empty in every scene
        act = state.active[:, :n]
        s2 = torch.exp(state.logs).view(B, 1)
        if prob.floor is not None:  # white variance per snapshot [B, L]; a matrix floor by its mean eigenvalue
            s2 = s2 + (prob.floor if prob.floor.ndim == 2 else torch.diagonal(prob.floor, dim1=-2, dim2=-1).real.mean(-1))
        A = physics.steering(state.phi[:, :n], state.theta[:, :n], 1.0 / state.rho[:, :n], sc, dtype=cd)
        Bm = measure(H, codes, A, prob.G) * act.to(cd).view(B, 1, 1, -1)  # [B, L, M, n]
        logp = state.logp[:, :n]
        pinv = torch.where(act.unsqueeze(1), s2.unsqueeze(-1) / torch.exp(logp).unsqueeze(1), torch.ones_like(logp).unsqueeze(1))
        S = Bm.mH @ Bm + torch.diag_embed(pinv.to(cd))  # [B, L, n, n]
        Lc, info = torch.linalg.cholesky_ex(S)  # S = Lc Lc^H (no host synchronisation)
        Lc = torch.where(info.ne(0).view(B, L, 1, 1), torch.full_like(Lc, float("nan")), Lc)  # NaN gains, as a singular S
        Bt = torch.linalg.solve_triangular(Lc, Bm.mH, upper=False)  # Lc^-1 B_l^H, [B, L, n, M]
        Et = dico.products(Bt.conj())  # Lc^-1 B_l^H Phi_l, [B, L, n, Q]
        v = Bt @ y.unsqueeze(-1)  # Lc^-1 B_l^H y_l, [B, L, n, 1]
        s2v = s2.view(B, -1, 1)
        quad = grids.sum_abs2(Et, 2)  # |Lc^-1 B_l^H phi_lq|^2 = phi^H B S^-1 B^H phi
        alpha = ((n2 - quad) / s2v).clamp_min(1e-12 * n2 / s2v)
        beta = grids.sum_abs2(c - (Et.mH @ v).squeeze(-1)) / s2v**2  # |phi_lq^H C_l^-1 y_l|^2 (Et^H v = conj(v^H Et))
        del Et
        prox = _proxy_gain(alpha, beta)
        idx = torch.topk(-prox, min(top, Q), dim=1).indices
        g = lambda t: t.gather(2, idx.unsqueeze(1).expand(B, L, -1))
        gain, best_p = _stochastic_gain(g(alpha), g(beta))
        t = torch.argmin(gain, dim=1)
        q = idx[ar, t]
        pk = best_p[ar, t]
    out = _set_slot(state, k, *dico.atom(q), torch.log(pk.clamp_min(1e-12)))
    if isinstance(k, int) and k == 0:
        out.logs = logs_new
    return out


def _scan_slots(k, K: int, slots: int | None) -> int:
    """The source slots :func:`_add_stochastic` scores with (the later ones are empty in every
    scene): ``slots`` when the caller knows that bound, ``k`` for an int ``k`` (the search path),
    else all ``K``."""
    return slots if slots is not None else k if isinstance(k, int) else K


def _add_static(state: _State, k, dico: _Atoms, prob: _Problem):
    """Add the atom with the largest RSS reduction (orthogonal least squares) as slot k (int or ``[B]``).

    With phi_q = [G_1 d_q; ...; G_L d_q] the stacked measured atom, Psi the current (active)
    columns and E = Psi^H [phi_1, ..., phi_Q] = sum_l B_l^H Phi_l (through the dictionary,
    :meth:`_Atoms.summed_products`): residual r = y - Psi G^-1 Psi^H y, G = Psi^H Psi, and
    score_q = |phi_q^H r|^2 / (|phi_q|^2 - Re e_q^H G^-1 e_q) with phi_q^H r = sum_l phi_lq^H r_l.
    """
    y, H, codes, sc = prob.y, prob.H, prob.codes, prob.scenario
    B, L, M = y.shape
    cd = y.dtype
    K = state.phi.shape[1]
    yv = y.reshape(B, L * M, 1)
    n2 = dico.n2.sum(1)  # [B, Q]
    act = state.active.to(cd).view(B, 1, K)
    A = physics.steering(state.phi, state.theta, 1.0 / state.rho, sc, dtype=cd)
    Psi = measure(H, codes, A, prob.G).reshape(B, L * M, K) * act
    Gm = Psi.mH @ Psi
    scale = torch.diagonal(Gm, dim1=-2, dim2=-1).real.mean(-1).clamp_min(1e-30)
    Gm = Gm + torch.diag_embed((1 - act.view(B, K)) + (1e-6 * scale).to(cd).view(B, 1))
    Gi = inverse(Gm)
    res = yv - Psi @ (Gi @ (Psi.mH @ yv))
    E = dico.summed_products(Psi.view(B, L, M, K).transpose(-1, -2))  # Psi^H Pv, [B, K, Q]
    proj2 = (torch.view_as_real(E) * torch.view_as_real(Gi @ E)).sum((1, 3))
    num = torch.view_as_real(dico.summed_products(res.view(B, L, M))).square().sum(-1)  # |r^H phi_q|^2, [B, Q]
    score = num / (n2 - proj2).clamp_min(1e-6 * n2)
    q = torch.argmax(score, dim=1)
    return _set_slot(state, k, *dico.atom(q), None)


def _slots(k, B: int, device) -> Tensor:
    """A slot or order ``k`` (an int or ``[B]``) as an int64 tensor ``[B]`` on ``device`` (an int is
    filled on the device: no copy from the host)."""
    if isinstance(k, int):
        return torch.full((B,), k, dtype=torch.int64, device=device)
    return k.to(device=device, dtype=torch.int64).expand(B)


def _set_slot(state: _State, k, phi, theta, rho, logp) -> _State:
    """Write one source per scene into slot k (int or ``[B]`` tensor) and mark it active."""
    B = state.phi.shape[0]
    kk = _slots(k, B, state.phi.device).view(B, 1)
    put = lambda t, v: t.scatter(1, kk, v.to(t.dtype).view(B, 1))
    return _State(
        put(state.phi, phi), put(state.theta, theta), put(state.rho, rho),
        state.logp if logp is None else put(state.logp, logp), state.logs.clone(),
        put(state.active, torch.ones(B, dtype=torch.bool, device=state.phi.device)),
    )


# ------------------------------------------------------------------------------------------
# initial powers for the init path
# ------------------------------------------------------------------------------------------


def _ls_powers(state: _State, prob: _Problem):
    """Least-squares powers and noise: s_l = B_l^+ y_l, p_k = mean_l |s_lk|^2, sigma^2 from the residual."""
    y, H, codes, sc = prob.y, prob.H, prob.codes, prob.scenario
    B, L, M = y.shape
    K = state.phi.shape[1]
    cd = y.dtype
    A = physics.steering(state.phi, state.theta, 1.0 / state.rho, sc, dtype=cd)
    Bm = measure(H, codes, A, prob.G) * state.active.to(cd).view(B, 1, 1, K)  # [B, L, M, K]
    Gm = Bm.mH @ Bm
    scale = torch.diagonal(Gm, dim1=-2, dim2=-1).real.mean((-1, -2)).clamp_min(1e-30)
    inactive = (~state.active).to(cd).view(B, 1, K)
    Gm = Gm + torch.diag_embed(inactive.expand(B, L, K) + (1e-3 * scale).to(cd).view(B, 1, 1))
    s = solve(Gm, Bm.mH @ y.unsqueeze(-1))  # [B, L, K, 1]
    res = y.unsqueeze(-1) - Bm @ s
    kk = state.active.sum(1).clamp(max=M - 1)
    s2 = res.abs().square().sum((1, 2, 3)) / (L * (M - kk)).to(res.real.dtype)
    s2 = torch.maximum(s2, 1e-4 * y.abs().square().mean((1, 2)))
    p = s.abs().square().mean(1).squeeze(-1).clamp_min(1e-6)
    return torch.log(p), torch.log(s2)


# ------------------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------------------


def _run_batch(scenes: Scenes, k_max: int, model: str, init: Estimates | None, snr_db, opts: MLOptions,
               known: Tensor | None, atoms: Estimates | None = None,
               measured: grids.MeasuredDictionary | None = None) -> Estimates:
    sc = scenes.scenario
    device = scenes.device
    cd = opts.dtype
    rd = physics.real_dtype(cd)
    y, H, codes = scenes.y.to(cd), scenes.H.to(cd), scenes.codes.to(cd)
    if opts.amplitude == "scenario" and getattr(sc, "ris_amplitude", "ideal") != "ideal":
        off = ((codes.abs() - 1).abs() > 1e-3).flatten(1).any(1)
        if bool(off.any()):
            raise ValueError(f"ml: amplitude='scenario' needs unit-modulus commanded codes; scenes.codes of scene "
                             f"{int(torch.nonzero(off)[0])} are not")
        codes = physics.realised_codes(codes, sc)  # the amplitude model only (no phase error, no failures)
    B, L, M = y.shape
    scales = power_scales(y, H)
    y, H, empty = unit_power(y, H, scales)  # scale invariance
    box = _box(sc, rd, device)
    prob = _Problem(y, H, codes, sc, model == "static", box, snr_db, opts, G=grids.maps(H, codes))
    dico = None
    if measured is not None:  # into the unit-power frame: |phi|^2 / P_H, phi^H y / sqrt(P_y P_H)
        ypow, hpow, _ = scales
        dico = _grid_atoms(prob, measured.norms.to(device=device, dtype=rd) / hpow.view(B, 1, 1),
                           measured.y_products.to(device=device, dtype=cd).conj() / torch.sqrt(ypow * hpow).to(cd).view(B, 1, 1))
    K = k_max
    method = "ml" + ("" if init is None else "+init")

    if init is not None:
        kin = init.K.to(device).clamp(0, K)
        st = _init_state(init, box, K, rd, device)
        if _robust(prob) or not cuda_graphs.graphable(B, device):  # eagerly (the floor's levels need host reads)
            # one read bounds the RELAX passes: each growth step adds at most one source to max(k, 1)
            grow = int(opts.init_grow)
            most = min(K, (max(_largest(kin), 1) if grow else _largest(kin)) + grow) if B else 0
            st, kin = _init_path(st, kin, atoms, prob, most=most, dico=dico)
        else:  # reads no device value: one graph for a few scenes on CUDA (RELAX over all K_max slots)
            st, kin = _graphed("ml._init_path", _init_path, prob, st=st, kin=kin, atoms=atoms, most=None, dico=dico)
        # a scene whose measurements are all zero has no source where ml may change the count
        # (init_prune > 0); without pruning (the callers' known K) the given count is kept
        return _output(st, kin, empty & bool(opts.init_prune), K, method)

    s2_grid = _s2_grid(prob)
    if known is None and not _robust(prob):  # two graphs for a few scenes on CUDA, one host read between them
        st, khat, dico, nll = _graphed("ml._search", _search, prob, K=K, s2_grid=s2_grid)
        most = _largest(khat)  # the re-search passes needed
        if cuda_graphs.graphable(B, device):
            _prime_finish(st, khat, dico, nll, K, prob)
        st = _graphed("ml._finish", _finish, prob, st=st, khat=khat, dico=dico, nll=nll, most=most)
        return _output(st, khat, empty, K, method)
    orders = K if known is None else _largest(known)
    states, nll, dico = _path(prob, K, orders, s2_grid, top=known)
    khat = _select(states, nll, prob) if known is None else known
    if _robust(prob):
        states, nll, prob = _rescore(states, nll, khat, prob)
        khat = _select(states, nll, prob) if known is None else known
    st = _gather(states, khat)
    del states
    st = _finish(st, khat, dico, _largest(khat), prob, nll=nll.gather(1, khat.view(-1, 1)).squeeze(1))
    return _output(st, khat, empty if known is None else torch.zeros_like(empty), K, method)


def _largest(k: Tensor) -> int:
    """The largest order ``k`` ``[B]`` of the batch (0 for no scene): one host read."""
    return int(k.max()) if k.numel() else 0


def _init_path(st: _State, kin: Tensor, atoms: Estimates | None, prob: _Problem,
               most: int | None = None, dico: _Atoms | None = None) -> tuple[_State, Tensor]:
    """The ``init`` path from the given sources ``st`` of per-scene order ``kin`` ``[B]``: least-
    squares powers, refinement, ``init_grow`` greedy additions, ``init_relax`` RELAX cycles and a
    refinement, ``init_prune`` pruning passes and the empty-model rule, the range decision.
    ``most``: a bound on the order after the growth, when the caller read one (the RELAX passes
    and slots, :func:`_relax`; None: K_max). ``dico``: the dictionary record the searches read,
    where the caller has it (a measured dictionary, :func:`estimate`'s ``dictionary``); else
    measured here on ``grid_shape`` (or the ``atoms``). Reads no device value unless the
    mismatch-aware likelihood is on. Returns (state, K-hat)."""
    opts = prob.opts
    if not prob.static:
        logp, logs = _ls_powers(st, prob)
        st = replace(st, logp=logp, logs=logs)
    st, nll, _, F = _refine(st, prob, opts.final_iterations)
    if opts.init_grow or opts.init_relax:
        if dico is None:
            dico = _measured_dictionary(prob) if atoms is None else _candidate_dictionary(prob, atoms)
        for _ in range(int(opts.init_grow)):
            st, nll, F, kin = _grow(st, nll, F, kin.clamp(min=1), prob, dico)
        for _ in range(int(opts.init_relax)):
            st, nll = _relax(st, kin, prob, dico, most=most, nll=nll)
        if opts.init_relax:
            st, nll, _, F = _refine(st, prob, opts.final_iterations)
        del dico
    if _robust(prob):  # the floor from the grown model (plain likelihood); the pruning decides under it
        prob, level = _with_floor(st, prob)
        new, nll_r, _, F_r = _refine(st, prob, _MISMATCH_ITERATIONS)
        st, nll, F = _take(level > 0, (new, nll_r, F_r), (st, nll, F))
    for _ in range(int(opts.init_prune)):
        st, nll, F, kin = _prune(st, nll, F, kin, prob)
    if opts.init_prune:
        kin = _none_if_better(st, nll, kin, prob)
    return _decide_range(st, F, prob), kin


def _search(K: int, s2_grid: Tensor, prob: _Problem) -> tuple[_State, Tensor, _Atoms, Tensor]:
    """Stages 2-4 without a known K and with the plain likelihood (reads no device value): the
    candidate path, K-hat by the order rule and the selected model. Returns (state, K-hat, the
    dictionary record, the state's NLL)."""
    states, nll, dico = _path(prob, K, K, s2_grid)
    khat = _select(states, nll, prob)
    return _gather(states, khat), khat, dico, nll.gather(1, khat.view(-1, 1)).squeeze(1)


_PRIMED: set = set()


def _prime_finish(st: _State, khat: Tensor, dico: _Atoms, nll: Tensor, K: int, prob: _Problem) -> None:
    """Capture the graphs of :func:`_finish` for every bound 0..K on K-hat at the first graphed
    call of a batch shape, likelihood, options and scenario (answers discarded), so that a stream
    of single scenes whose K-hat differ pays no further capture."""
    family = (tuple(prob.y.shape), K, prob.static, repr(prob.opts), prob.scenario.to_json(), str(prob.y.device))
    if family in _PRIMED:
        return
    for most in range(K + 1):
        _graphed("ml._finish", _finish, prob, st=st, khat=khat, dico=dico, nll=nll, most=most)
    _PRIMED.add(family)


def _finish(st: _State, khat: Tensor, dico: _Atoms, most: int, prob: _Problem, nll: Tensor | None = None) -> _State:
    """Stages 5-6 on the selected model of order ``khat`` (at most ``most`` in the batch): RELAX
    cycles, the final refinement and the range decision. ``nll``: the selected model's NLL under
    ``prob``'s likelihood, where the caller has it."""
    for _ in range(int(prob.opts.relax_cycles)):
        st, nll = _relax(st, khat, prob, dico, most=most, nll=nll)
    st, _, _, F = _refine(st, prob, prob.opts.final_iterations)
    return _decide_range(st, F, prob)


# ------------------------------------------------------------------------------------------
# model error (option ``mismatch``)
# ------------------------------------------------------------------------------------------

_MISMATCH_ITERATIONS = 4
"""Refinement steps of a model re-scored under the mismatch-aware likelihood (and of each candidate
level of ``mismatch="auto"``)."""


def _robust(prob: _Problem) -> bool:
    """Whether the mismatch-aware likelihood is in use (option ``mismatch``, stochastic only)."""
    return _robust_likelihood(prob.opts, prob.static, prob.scenario)


def _robust_likelihood(opts: MLOptions, static: bool, scenario: Scenario) -> bool:
    """:func:`_robust` from the options, the likelihood (static or not) and the scenario."""
    m = opts.mismatch
    if static or m == "none":
        return False
    if m == "scenario":
        return sum(_scenario_levels(scenario)) > 0
    return m == "auto" or float(m) > 0


def _scenario_levels(sc: Scenario) -> tuple[float, float]:
    """(CSI, phase-noise) coefficients e~ of the scenario's impairment fields (``csi_nmse_db``,
    ``ris_phase_noise_deg``; absent or None: no error of that kind) for ``mismatch="scenario"``."""
    csi = getattr(sc, "csi_nmse_db", None)
    pn = getattr(sc, "ris_phase_noise_deg", None) or 0.0
    return mismatch_level(None if csi is None else float(csi)), mismatch_level(None, float(pn))


def _floor(white: Tensor, coloured: Tensor, omega: Tensor, H: Tensor) -> Tensor:
    """The floor of levels ``white`` (CSI error) and ``coloured`` (phase noise) ``[B]``:
    f_l = e~_w q_l ``[B, L]`` when no scene has phase noise, else the matrices
    e~_w q_l I + e~_c H diag(omega_l) H^H ``[B, L, M, M]`` (q_l = sum_n omega_ln)."""
    white_f = mismatch_floor(white, omega.sum(-1))
    if not bool((coloured > 0).any()):
        return white_f
    eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
    return coloured_floor(coloured, H, omega) + white_f.to(H.dtype).unsqueeze(-1).unsqueeze(-1) * eye


def _with_floor(st: _State, prob: _Problem) -> tuple[_Problem, Tensor]:
    """``prob`` with the model-error floor of option ``mismatch`` (:func:`_floor`): omega_ln the
    posterior signal energies of the fitted model ``st`` (plain likelihood,
    :func:`risloc.estimators.ml_core.signal_energy`), the levels known (a number: CSI-type white
    floor; ``"scenario"``: the scenario's CSI and phase-noise levels) or, for ``"auto"``, per scene
    the candidate of least NLL of ``st`` refined under it (``_MISMATCH_ITERATIONS`` steps) among
    level 0 and each level > 0 of ``mismatch_levels`` as a white (CSI) or as a phase-noise floor,
    a level > 0 only where it gains more than ``mismatch_penalty`` nats. Returns the problem and
    the total level per scene ``[B]`` (0: the plain likelihood)."""
    opts = prob.opts
    omega = signal_energy(st.phi, st.theta, st.rho, st.logp, st.logs, st.active, prob.y, prob.H, prob.codes,
                          prob.scenario, per_element=True)
    B = omega.shape[0]
    full = lambda v: torch.full((B,), float(v), dtype=omega.dtype, device=omega.device)
    if opts.mismatch != "auto":
        w, c = _scenario_levels(prob.scenario) if opts.mismatch == "scenario" else (float(opts.mismatch), 0.0)
        return replace(prob, floor=_floor(full(w), full(c), omega, prob.H)), full(w + c)
    best = _evaluate(st, replace(prob, floor=None), derivatives=False)[0]
    best = torch.nan_to_num(best, nan=float("inf"))
    white, coloured = full(0), full(0)
    for lev in opts.mismatch_levels:
        if lev <= 0:
            continue
        for kind in opts.mismatch_kinds:
            w, c = (full(lev), full(0)) if kind == "white" else (full(0), full(lev))
            _, nll, _, _ = _refine(st, replace(prob, floor=_floor(w, c, omega, prob.H)), _MISMATCH_ITERATIONS)
            crit = torch.nan_to_num(nll, nan=float("inf")) + float(opts.mismatch_penalty)
            better = crit < best
            best = torch.where(better, crit, best)
            white = torch.where(better, w, white)
            coloured = torch.where(better, c, coloured)
    return replace(prob, floor=_floor(white, coloured, omega, prob.H)), white + coloured


def _rescore(states: list, nll_plain: Tensor, khat: Tensor, prob: _Problem):
    """Re-score the search path under the mismatch-aware likelihood: the floor from the plain
    likelihood's choice ``khat`` (:func:`_with_floor`), then every order's model refined under it
    (``_MISMATCH_ITERATIONS`` steps). Scenes whose level is 0 keep the plain path as it is.
    Returns (states, NLLs ``[B, orders + 1]``, the problem with the floor)."""
    prob, level = _with_floor(_gather(states, khat), prob)
    keep = level > 0
    if not bool(keep.any()):  # no floor anywhere in the batch: the plain path as it is
        return states, nll_plain, prob
    out, nlls = [], []
    for k, st in enumerate(states):
        new, nll, _, _ = _refine(st, prob, _MISMATCH_ITERATIONS)
        out.append(_where(keep, new, st))
        nlls.append(torch.where(keep, torch.nan_to_num(nll, nan=float("inf")), nll_plain[:, k]))
    return out, torch.stack(nlls, dim=1), prob


# ------------------------------------------------------------------------------------------
# pruning and order selection
# ------------------------------------------------------------------------------------------


def _remove(st: _State, j: Tensor, k) -> _State:
    """Drop source slot j ``[B]`` of a k-source model (k int or ``[B]``; the others move to slots 0..k-2)."""
    B, K = st.phi.shape
    idx = torch.arange(K, device=j.device).view(1, -1).expand(B, K)
    k = _slots(k, B, j.device).view(B, 1)
    perm = idx + (idx >= j.view(-1, 1)).to(idx.dtype)  # skip slot j
    perm = torch.where(idx >= k - 1, idx, perm).clamp(max=K - 1)
    g = lambda t: t.gather(1, perm)
    act = idx < (k - 1)
    return _State(g(st.phi), g(st.theta), g(st.rho), g(st.logp), st.logs.clone(), act)


def _drop_one(st: _State, k, prob: _Problem, iterations: int) -> tuple[_State, Tensor, Tensor]:
    """THE pruning step: drop the source whose removal costs least likelihood and refine the rest.

    For every source j < k (k an int or per scene ``[B]``) the NLL of the model without it is
    evaluated (no refinement; all removals of all scenes in one likelihood call, for a per-scene
    k every slot j < K_max, those with j >= k at infinite cost); the cheapest
    removal is refined (``iterations`` steps). Returns the
    (k-1)-source state, its NLL (NaN -> inf) and Fisher matrix. Used by the backward pass
    (stage 3) and the ``init`` path's pruning (:func:`_prune`).
    """
    B, K = st.phi.shape
    dev = st.phi.device
    n = k if isinstance(k, int) else K  # per scene: every slot (no host read of the largest k)
    # every removal j < n at once: n copies of the batch, copy j without source j (one evaluation)
    each = _remove(st.repeat(n), torch.arange(n, device=dev).repeat_interleave(B), k if isinstance(k, int) else k.repeat(n))
    vals = _evaluate(each, prob.repeat(n), derivatives=False)[0]
    vals = torch.nan_to_num(vals, nan=float("inf")).view(n, B).T  # [B, n]
    if not isinstance(k, int):
        vals = torch.where(torch.arange(n, device=dev).view(1, -1) < k.view(-1, 1), vals, torch.full_like(vals, float("inf")))
    j = torch.argmin(vals, dim=1)
    cand, nll, _, F = _refine(_remove(st, j, k), prob, iterations)
    return cand, torch.nan_to_num(nll, nan=float("inf")), F


def _power_spread_db(st: _State) -> Tensor:
    """Spread [dB] of the estimated powers over the active sources ``[B]`` (-inf without sources)."""
    lp_max = torch.where(st.active, st.logp, torch.full_like(st.logp, -math.inf)).max(1).values
    lp_min = torch.where(st.active, st.logp, torch.full_like(st.logp, math.inf)).min(1).values
    return (lp_max - lp_min) * (10 / math.log(10))


def _power_limit_db(prob: _Problem) -> float | None:
    """The power rule: a model whose powers spread more than this is refused (stochastic only)."""
    if prob.static or prob.opts.power_margin_db is None:
        return None
    return prob.scenario.power_spread_db + prob.opts.power_margin_db


def _select(states, nll: Tensor, prob: _Problem) -> Tensor:
    """K-hat = argmin_K NLL_K + tau K over the orders allowed by the power rule (stage 4)."""
    B, K1 = nll.shape
    crit = nll + prob.tau * torch.arange(K1, dtype=nll.dtype, device=nll.device)
    limit = _power_limit_db(prob)
    if limit is not None:
        ok = [torch.ones(B, dtype=torch.bool, device=nll.device)]
        ok += [_power_spread_db(states[k]) <= limit for k in range(1, K1)]
        crit = torch.where(torch.stack(ok, dim=1), crit, torch.full_like(crit, float("inf")))
    return torch.argmin(crit, dim=1)


def _prune(st: _State, nll: Tensor, F: Tensor, k: Tensor, prob: _Problem):
    """One pruning pass on models of per-scene order ``k`` ``[B]`` (the ``init`` path).

    :func:`_drop_one` with ``final_iterations``; the (k-1)-source model replaces the k-source
    model when the order rule of :func:`_select` prefers it: lower penalised NLL (NLL + tau K),
    or (stochastic) k-source powers spread beyond the power rule. Returns the updated
    (state, NLL, Fisher matrix, k)."""
    nll = torch.nan_to_num(nll, nan=float("inf"))
    cand, nll_c, F_c = _drop_one(st, k, prob, prob.opts.final_iterations)
    better = nll_c + prob.tau * (k - 1) < nll + prob.tau * k
    limit = _power_limit_db(prob)
    if limit is not None:
        better = better | (_power_spread_db(st) > limit)
    take = better & (k >= 2)
    st, nll, F = _take(take, (cand, nll_c, F_c), (st, nll, F))
    return st, nll, F, k - take.to(k.dtype)


def _empty_nll(like: _State, prob: _Problem) -> Tensor:
    """NLL ``[B]`` of the model without sources (in the slots of ``like``). With the plain
    likelihood in closed form: y is scaled to unit mean power, so sigma^2 = 1 and NLL_0 = L M
    (stochastic; the static NLL L M log(RSS) has RSS = L M). Under a mismatch floor sigma^2 is
    refined (``final_iterations`` steps)."""
    B, K = like.phi.shape
    if prob.floor is not None:
        empty = _empty_state(B, K, prob.box, like.phi.dtype, like.phi.device)
        return torch.nan_to_num(_refine(empty, prob, prob.opts.final_iterations)[1], nan=float("inf"))
    LM = float(prob.y.shape[1] * prob.y.shape[2])
    return torch.full((B,), LM * math.log(LM) if prob.static else LM, dtype=like.phi.dtype, device=like.phi.device)


def _none_if_better(st: _State, nll: Tensor, k: Tensor, prob: _Problem) -> Tensor:
    """The order rule of :func:`_select` between a scene's model of order ``k`` ``[B]`` and the
    model without sources (:func:`_empty_nll`): K-hat = 0 where NLL_0 <= NLL_k + tau k (ties go to
    the smaller order, as in :func:`_select`). The ``init`` path's pruning passes drop one source
    each and stop at one; this is its last step, so that noise alone is answered with no source,
    as the search path answers it."""
    nll0 = _empty_nll(st, prob)
    none = nll0 <= torch.nan_to_num(nll, nan=float("inf")) + prob.tau * k
    return torch.where(none, torch.zeros_like(k), k)


# ------------------------------------------------------------------------------------------
# the candidate path
# ------------------------------------------------------------------------------------------


def _grid_atoms(prob: _Problem, n2: Tensor | None = None, c: Tensor | None = None) -> _Atoms:
    """The :class:`_Atoms` record of the grid ``opts.grid_shape`` with the given |phi_l|^2 and
    phi_l^H y_l ``[B, L, Q]`` (in ``prob``'s unit-power frame; None: not yet measured)."""
    grid = grids.dictionary(prob.scenario, prob.opts.grid_shape, device=prob.y.device, dtype=prob.y.dtype)
    return _Atoms(grid.D, prob.H, prob.codes, n2, c, (grid.phi, grid.theta, grid.rho))


def _measured_dictionary(prob: _Problem) -> _Atoms:
    """The dictionary on the grid ``opts.grid_shape`` as an :class:`_Atoms` record: |phi_l|^2
    (:func:`risloc.grids.atom_norms`) and phi_l^H y_l = conj(y_l^H Phi_l) ``[B, L, Q]``, no Phi."""
    dico = _grid_atoms(prob)
    dico.n2 = grids.atom_norms(prob.H, prob.codes, dico.D)  # |phi_l|^2, [B, L, Q]
    dico.c = dico.products(prob.y).conj().resolve_conj()  # phi_l^H y_l, [B, L, Q]
    return dico


def _candidate_dictionary(prob: _Problem, atoms: Estimates) -> _Atoms:
    """Per-scene atoms as an :class:`_Atoms` record: the positions of ``atoms`` ``[B, C]`` (clipped
    into the prior box), D = their steering vectors ``[B, N, C]``, |phi_l|^2 and phi_l^H y_l from
    the explicit measured atoms (C is small)."""
    lo, hi = prob.box
    rd = lo.dtype
    dev = prob.y.device
    phi = atoms.phi.to(dev, rd).clamp(lo[0], hi[0])
    theta = atoms.theta.to(dev, rd).clamp(lo[1], hi[1])
    rho = (1.0 / atoms.r.to(dev, rd)).clamp(lo[2], hi[2])
    A = physics.steering(phi, theta, 1.0 / rho, prob.scenario, dtype=prob.y.dtype)  # [B, C, N]
    Phi = measure(prob.H, prob.codes, A)  # [B, L, M, C]
    dico = _Atoms(A.transpose(1, 2), prob.H, prob.codes, None, None, (phi, theta, rho))
    dico.n2 = Phi.real.square().sum(2) + Phi.imag.square().sum(2)  # |phi_l|^2, [B, L, C]
    dico.c = (Phi.conj() * prob.y.unsqueeze(-1)).sum(2)  # phi_l^H y_l, [B, L, C]
    return dico


def _grow(st: _State, nll: Tensor, F: Tensor, k: Tensor, prob: _Problem, dico: _Atoms):
    """One greedy addition on models of per-scene order ``k`` ``[B]`` (>= 1; the ``init`` path).

    The dictionary atom of largest likelihood gain given the current sources (the forward step
    of stage 2, :func:`_add_stochastic` / :func:`_add_static`) becomes source k + 1 and all are
    refined (``greedy_iterations``); the (k+1)-source model replaces the k-source one where the
    order rule of :func:`_select` prefers it (lower penalised NLL, powers within the power
    rule) and k < K_max. Returns the updated (state, NLL, Fisher matrix, k)."""
    K = st.phi.shape[1]
    slot = k.clamp(max=K - 1)
    if prob.static:
        cand = _add_static(st, slot, dico, prob)
    else:
        cand = _add_stochastic(st, slot, dico, prob, None, prob.opts.top)
    cand, nll_c, _, F_c = _refine(cand, prob, prob.opts.greedy_iterations)
    nll = torch.nan_to_num(nll, nan=float("inf"))
    nll_c = torch.nan_to_num(nll_c, nan=float("inf"))
    better = (k < K) & (nll_c + prob.tau * (k + 1) < nll + prob.tau * k)
    limit = _power_limit_db(prob)
    if limit is not None:
        better = better & (_power_spread_db(cand) <= limit)
    st, nll, F = _take(better, (cand, nll_c, F_c), (st, nll, F))
    return st, nll, F, k + better.to(k.dtype)


def _s2_grid(prob: _Problem) -> Tensor:
    """The noise variances ``[B, J]`` the first greedy step tries (y has unit mean power): 1 / (1 +
    SNR) from the nominal SNR, or five values from 0.7 to 0.01 without one."""
    B, device = prob.y.shape[0], prob.y.device
    rd = physics.real_dtype(prob.y.dtype)
    if prob.snr_db is not None:
        snr = torch.as_tensor(prob.snr_db, dtype=rd, device=device).expand(B)
        return (1.0 / (1.0 + 10 ** (snr / 10))).view(B, 1)
    return torch.stack([torch.full((B,), v, dtype=rd, device=device) for v in (0.7, 0.3, 0.1, 0.03, 0.01)], dim=1)


def _path(prob: _Problem, K: int, orders: int, s2_grid: Tensor, top: Tensor | None = None):
    """Candidate models for orders 0..``orders`` in ``K`` slots: a forward greedy pass, then a
    backward pass. ``s2_grid``: :func:`_s2_grid`.

    Forward: add the best dictionary atom, refine all sources. Backward (from ``orders`` down):
    :func:`_drop_one`, and keep the result as the (k-1)-source candidate when its NLL beats the
    forward one. ``top`` ``[B]`` (a known K): each scene's own largest order; the "last" RELAX
    cycle and the backward pass start there, so a scene's path does not depend on the largest
    K of its batch. Returns the list of states, the NLLs ``[B, orders + 1]`` and the dictionary
    record (:class:`_Atoms`).
    """
    y, opts, static = prob.y, prob.opts, prob.static
    B, device = y.shape[0], y.device
    rd = physics.real_dtype(y.dtype)
    dico = _measured_dictionary(prob)
    st = _empty_state(B, K, prob.box, rd, device)
    nlls = [_empty_nll(st, prob)]
    states = [st.clone()]
    relax_at = (orders,) if opts.relax_at == "last" else tuple(opts.relax_at)
    for k in range(orders):
        if static:
            st = _add_static(st, k, dico, prob)
        else:
            st = _add_stochastic(st, k, dico, prob, s2_grid, opts.top)
        st, nll, _, _ = _refine(st, prob, opts.greedy_iterations)
        if top is not None and opts.relax_at == "last":  # the scenes whose own last order this is
            kk = torch.where(top == k + 1, k + 1, 0).to(device=device, dtype=torch.int64)
            if bool(kk.any()):
                st, nll = _relax(st, kk, prob, dico, most=k + 1, nll=nll)
        elif k + 1 in relax_at:
            kk = torch.full((B,), k + 1, dtype=torch.int64, device=device)
            st, nll = _relax(st, kk, prob, dico, most=k + 1, nll=nll)
        nlls.append(torch.nan_to_num(nll, nan=float("inf")))
        states.append(st.clone())
    if opts.backward:
        cur = states[orders]
        for k in range(orders, 1, -1):
            cand, nll, _ = _drop_one(cur, k, prob, opts.greedy_iterations)
            better = nll < nlls[k - 1]
            if top is not None:
                better = better & (k <= top.to(device))
            states[k - 1] = _where(better, cand, states[k - 1])
            nlls[k - 1] = torch.where(better, nll, nlls[k - 1])
            cur = states[k - 1]
    return states, torch.stack(nlls, dim=1), dico


def _relax(st: _State, khat: Tensor, prob: _Problem, dico: _Atoms, most: int | None = None,
           nll: Tensor | None = None) -> tuple[_State, Tensor]:
    """One cycle of RELAX-style re-search (Li & Stoica 1996) on the selected model.

    For each source j in turn (weakest first by estimated power; only the
    ``opts.relax_sources`` weakest when that is > 0): remove it, add the best dictionary atom
    given the other sources (same greedy rule), refine all, and keep the new model if its NLL
    is lower. ``most``: an upper bound on K-hat in the batch, when the caller knows one: the
    number of passes (a pass beyond a scene's K-hat changes nothing) and of slots the greedy
    step scores with (default K_max for both, which reads no device value). ``nll``: the NLL
    ``[B]`` of ``st`` where the caller has it (from the refinement or growth step that made
    ``st``), else it is evaluated. Returns (state, NLL).
    """
    B, K = st.phi.shape
    if nll is None:
        nll = _evaluate(st, prob, derivatives=False)[0]
    nll = torch.nan_to_num(nll, nan=float("inf"))
    slot = (khat - 1).clamp_min(0)
    most = K if most is None else min(int(most), K)
    n = min(int(prob.opts.relax_sources) or K, most)  # passes
    bound = max(1, most)  # slots bound.. are empty in every scene
    power = torch.where(st.active, st.logp, torch.full_like(st.logp, math.inf))
    order = torch.argsort(power, dim=1, stable=True)  # weakest active source first, inactive slots last
    for i in range(n):
        valid = i < khat
        j = order[:, i]
        cand = _remove(st, j, khat)
        if prob.static:
            cand = _add_static(cand, slot, dico, prob)
        else:
            cand = _add_stochastic(cand, slot, dico, prob, None, prob.opts.top, slots=bound)
        cand.active = st.active.clone()
        cand, nll_c, _, _ = _refine(cand, prob, prob.opts.greedy_iterations)
        better = valid & torch.isfinite(nll_c) & (nll_c < nll - 1e-3)
        st = _where(better, cand, st)
        nll = torch.where(better, nll_c, nll)
        # the slots move when a source is removed: renumber the remaining order past slot j
        order = order - (order > j.view(-1, 1)).to(order.dtype) * better.view(-1, 1).to(order.dtype)
    return st, nll


def _take(cond: Tensor, new: tuple[_State, Tensor, Tensor], old: tuple[_State, Tensor, Tensor]):
    """Per scene ``[B]``: the model ``new`` = (state, NLL, Fisher matrix) where ``cond``, else ``old``
    (the acceptance step of :func:`_grow` and :func:`_prune`)."""
    (st_n, nll_n, F_n), (st_o, nll_o, F_o) = new, old
    return _where(cond, st_n, st_o), torch.where(cond, nll_n, nll_o), torch.where(cond.view(-1, 1, 1), F_n, F_o)


def _where(cond: Tensor, a: _State, b: _State) -> _State:
    w = lambda x, y: torch.where(cond.view(-1, *([1] * (x.ndim - 1))), x, y)
    return _State(*(w(x, y) for x, y in zip(
        (a.phi, a.theta, a.rho, a.logp, a.logs, a.active), (b.phi, b.theta, b.rho, b.logp, b.logs, b.active))))


def _gather(states, khat: Tensor) -> _State:
    B, K = states[0].phi.shape
    ar = torch.arange(B, device=khat.device)
    sel = lambda name: torch.stack([getattr(s, name) for s in states], dim=1)[ar, khat]
    idx = torch.arange(K, device=khat.device)
    return _State(sel("phi"), sel("theta"), sel("rho"), sel("logp"), sel("logs"), idx.view(1, -1) < khat.view(-1, 1))


def _decide_range(st: _State, F: Tensor, prob: _Problem) -> _State:
    """Hit-optimal range decision under the scenario's prior r ~ U[r_min, r_max] (``range_decision="hit"``).

    The likelihood of rho = 1/r is approximated by N(rho-hat, [F^-1]_rho,rho) (F: Fisher matrix
    at the ML estimate, marginal over the other parameters). With the uniform prior in r the
    posterior density in r is proportional to exp(-(1/r - rho-hat)^2 / (2 var)) on [r_min, r_max];
    the reported range maximises the posterior probability of a hit, P(|r-hat - r| <= 0.1 r),
    i.e. of r in [r-hat/1.1, r-hat/0.9]. (A Bayes decision for the scoring rule of docs/metrics.md;
    ``range_decision="ml"`` keeps the ML range.)
    """
    opts, sc = prob.opts, prob.scenario
    if opts.range_decision != "hit":
        return st
    B, K = st.phi.shape
    rd = st.phi.dtype
    P = F.shape[-1]
    eye = torch.eye(P, dtype=F.dtype, device=F.device)
    scale = torch.diagonal(F, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
    Fn = F / (scale.unsqueeze(-1) * scale.unsqueeze(-2)) + 1e-6 * eye
    cov_diag = torch.diagonal(inverse(Fn), dim1=-2, dim2=-1) / scale**2
    var = cov_diag[:, 2 * K : 3 * K].clamp_min(1e-12) * float(opts.range_var_scale)  # [B, K]
    G = int(opts.range_grid)
    lr0, lr1 = math.log(sc.r_min), math.log(sc.r_max)
    h = (lr1 - lr0) / (G - 1)
    r = torch.exp(torch.linspace(lr0, lr1, G, dtype=rd, device=st.phi.device))  # geometric grid [G]
    # posterior mass per log-r cell: likelihood(1/r) x prior density in r (uniform) x dr/dlog r = r
    logd = -0.5 * (1.0 / r - st.rho.unsqueeze(-1)) ** 2 / var.unsqueeze(-1) + torch.log(r)
    dens = torch.exp(logd - logd.max(-1, keepdim=True).values)  # [B, K, G]
    cdf = torch.cumsum(dens, -1)
    cdf = cdf / cdf[..., -1:].clamp_min(1e-30)

    def cdf_at(x):  # linear interpolation (in log r) of the cdf at ranges x [G]
        pos = ((torch.log(x) - lr0) / h).clamp(0, G - 1)
        i0 = pos.floor().long().clamp(max=G - 2)
        w = (pos - i0).to(rd)
        c0 = cdf.gather(-1, i0.expand_as(cdf))
        c1 = cdf.gather(-1, (i0 + 1).expand_as(cdf))
        val = c0 + w * (c1 - c0)
        return torch.where(x <= sc.r_min, torch.zeros_like(val), val)

    hit = cdf_at(r / (1 - RANGE_TOL_REL)) - cdf_at(r / (1 + RANGE_TOL_REL))  # [B, K, G]
    # among (near-)maximal hit probabilities take the range closest to the ML one
    near = hit >= hit.max(-1, keepdim=True).values - 1e-3
    dist = (torch.log(r) + torch.log(st.rho).unsqueeze(-1)).abs()
    best = r[torch.argmin(torch.where(near, dist, torch.full_like(dist, float("inf"))), dim=-1)]  # [B, K]
    ok = st.active & torch.isfinite(var)
    rho = torch.where(ok, 1.0 / best, st.rho)
    return _State(st.phi, st.theta, rho, st.logp, st.logs, st.active)


def _output(st: _State, khat: Tensor, empty: Tensor, K: int, method: str) -> Estimates:
    khat = torch.where(empty, torch.zeros_like(khat), khat).to(torch.int64)
    act = torch.arange(K, device=khat.device).view(1, -1) < khat.view(-1, 1)
    f = lambda t: torch.where(act, t.float(), float("nan"))
    return Estimates(khat, f(st.phi), f(st.theta), f(1.0 / st.rho), method)


@register("ml")
def estimate(
    scenes: Scenes,
    *,
    k_max: int | None = None,
    K: int | Tensor | None = None,
    snr_db=None,
    init: Estimates | None = None,
    atoms: Estimates | None = None,
    dictionary: grids.MeasuredDictionary | None = None,
    iterations: int | None = None,
    model: str | None = None,
    options: MLOptions | None = None,
    **overrides,
) -> Estimates:
    """Maximum-likelihood localisation of up to ``k_max`` near-field sources (module docstring).

    One batch, in one pass: its working memory grows with the batch (about 2.5 kB x grid atoms
    per scene, ~11 MiB with the default grid, measured on the CPU), so large scene sets go through the registry
    (``risloc.locate(scenes, "ml", batch=...)``), which runs them in batches of 16 scenes on the
    CPU and 1024 on CUDA by default.

    Args:
        scenes: the batch (y ``[S, L, M]``, H ``[S, M, N]``, codes ``[S, L, N]``, finite: the registry
            checks them); any device.
        k_max: largest K considered (default ``scenes.scenario.k_max``).
        K: known number of sources, an int or an integer tensor ``[S]`` with values in 0..k_max:
            the greedy path runs up to max(K) sources and the order rule (stage 4) is skipped,
            so the returned K-hat equals K. Not with ``init`` (which carries its own K-hat).
        snr_db: optional nominal SNR (dB; scalar, ``[S]`` tensor, or ``True`` for ``scenes.snr_db``);
            used only to initialise sigma^2 of the first greedy step. Default: not used.
        init: optional :class:`Estimates`; skips the grid/greedy stage and the order rule and
            refines its K-hat sources with the same likelihood.
        atoms: ``init`` path only: per-scene candidate positions (an :class:`Estimates` whose
            ``[S, C]`` phi, theta, r are all finite, e.g. a network's ranked detections) that the
            growth and RELAX searches (``init_grow``, ``init_relax``) score instead of the
            dictionary of ``grid_shape``: C atoms per scene instead of the grid's.
        dictionary: ``init`` path only: the dictionary of the grid ``dictionary.shape`` already
            measured through these scenes (:class:`risloc.grids.MeasuredDictionary`, e.g. by the
            spectrum network's front end), which the growth and RELAX searches then read instead
            of measuring ``grid_shape``'s (the grid is ``dictionary.shape``; its precision is the
            record's). Not with ``atoms``.
        iterations: refinement steps of the final model (``options.final_iterations``).
        model: ``"stochastic"`` or ``"static"`` likelihood (default: ``scenes.scenario.signal``).
        options: :class:`MLOptions` (default ``MLOptions()``).
        **overrides: fields of :class:`MLOptions` that replace those of ``options``
            (``grid_shape``, ``penalty_stochastic``, ``top``, ``init_prune``, ``dtype``, ...).

    Returns:
        :class:`Estimates` with K-hat ``[S]`` and NaN-padded phi, theta [rad], r [m] ``[S, k_max]``.
    """
    sc = scenes.scenario
    k_max = int(k_max if k_max is not None else sc.k_max)
    if k_max < 1:
        raise ValueError(f"ml: k_max must be >= 1, got {k_max}")
    model = model or sc.signal
    if model not in ("stochastic", "static"):
        raise ValueError(f"ml: model must be 'stochastic' or 'static', not {model!r}")
    opts = _options(options, iterations, overrides)
    S = len(scenes)
    if atoms is not None:
        if init is None:
            raise ValueError("ml: atoms (per-scene candidate positions) need init (they serve its growth and RELAX searches)")
        shape = tuple(atoms.phi.shape)
        for name in ("phi", "theta", "r"):
            t = getattr(atoms, name)
            if tuple(t.shape) != shape or len(shape) != 2 or shape[0] != S or shape[1] < 1:
                raise ValueError(f"ml: atoms.{name} has shape {list(t.shape)}, expected [{S}, C] with C >= 1 (like atoms.phi)")
            bad = ~torch.isfinite(t).all(1)
            if bool(bad.any()):
                raise ValueError(f"ml: atoms.{name} of scene {int(torch.nonzero(bad)[0])} has non-finite values")
    if dictionary is not None:
        _check_dictionary(dictionary, scenes, init, atoms)
        if opts.amplitude != "given" and getattr(sc, "ris_amplitude", "ideal") != "ideal":
            raise ValueError("ml: dictionary was measured with the codes as given; amplitude='scenario' changes them "
                             "(measure the dictionary with the realised codes, or leave dictionary out)")
        opts = replace(opts, grid_shape=tuple(dictionary.shape))
    known = _known_K(K, S, k_max, init, scenes.device)
    if snr_db is True:
        snr_db = scenes.snr_db
    with torch.no_grad():
        return _run_batch(scenes, k_max, model, init, snr_db, opts, known, atoms, dictionary)


def _check_dictionary(dictionary: grids.MeasuredDictionary, scenes: Scenes, init, atoms) -> None:
    """ValueErrors for a measured dictionary :func:`estimate` cannot use (naming the field)."""
    if init is None or atoms is not None:
        raise ValueError("ml: dictionary (a measured dictionary) serves the init path's searches: it needs init and no atoms")
    shape = tuple(int(n) for n in dictionary.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"ml: dictionary.shape = {dictionary.shape}: expected (n_phi, n_theta, n_r), each >= 1")
    want = (len(scenes), scenes.scenario.snapshots, math.prod(shape))
    for name in ("norms", "y_products"):
        t = getattr(dictionary, name)
        if tuple(t.shape) != want:
            raise ValueError(f"ml: dictionary.{name} has shape {list(t.shape)}, expected {list(want)} "
                             f"(scenes, snapshots, atoms of the grid {shape})")
    if dictionary.norms.is_complex() or not dictionary.y_products.is_complex():
        raise ValueError("ml: dictionary.norms must be real and dictionary.y_products complex")


def _options(options: MLOptions | None, iterations: int | None, overrides: dict) -> MLOptions:
    """``options`` (default ``MLOptions()``) with the field ``overrides`` (a ValueError names an
    unknown one) and ``iterations`` as ``final_iterations``: :func:`estimate`'s options."""
    names = [f.name for f in fields(MLOptions)]
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"ml: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    opts = replace(options if options is not None else MLOptions(), **overrides)
    if iterations is not None:
        if int(iterations) < 0:
            raise ValueError(f"ml: iterations = {iterations}: must be >= 0 (the final refinement's steps)")
        opts = replace(opts, final_iterations=int(iterations))
    return opts


def init_path_reads(scenario: Scenario, *, model: str | None = None, options: MLOptions | None = None,
                    iterations: int | None = None, **keywords) -> bool:
    """Whether :func:`estimate` with ``init`` (and neither ``atoms`` nor ``K``) and these keywords
    reads device values on scenes of ``scenario``: the mismatch-aware likelihood does (its
    levels, option ``mismatch``), and so does the amplitude model's check of the codes
    (``amplitude = "scenario"`` on a scenario with RIS amplitudes); otherwise the call reads none,
    so that a caller may capture it inside its own CUDA graph (:mod:`risloc.cuda_graphs`;
    ``learned``). Keywords that are not fields of :class:`MLOptions` do not bear on it (and are
    left to :func:`estimate` to accept or refuse)."""
    names = {f.name for f in fields(MLOptions)}
    opts = _options(options, iterations, {k: v for k, v in keywords.items() if k in names})
    static = (model or scenario.signal) == "static"
    amplitude = opts.amplitude == "scenario" and getattr(scenario, "ris_amplitude", "ideal") != "ideal"
    return amplitude or _robust_likelihood(opts, static, scenario)


def _known_K(K, S: int, k_max: int, init, device) -> Tensor | None:
    """``K`` (int or ``[S]`` integer tensor) as a ``[S]`` int64 tensor on ``device``, validated
    (:func:`risloc.estimators.known_k`)."""
    if K is None:
        return None
    if init is not None:
        raise ValueError("ml: K and init cannot both be given (init carries its own K-hat)")
    from . import known_k

    return known_k(K, S, k_max, device=device)
