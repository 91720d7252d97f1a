"""Scoring of estimates against the truth: the definitions every report uses.

Implements the scoring defined in docs/metrics.md, which states every
formula and every convention. In short, with the symbols of docs/model.md
and errors taken as estimate minus truth (Delta phi wrapped to (-pi, pi]):

* Matching, per scene, by the Hungarian algorithm (Kuhn 1955; Munkres 1957) on

      c_ij = (Delta phi_ij / 2 deg)^2 + (Delta theta_ij / 2 deg)^2 + (Delta r_ij / (0.1 r_i))^2

  with r_i the TRUE range; min(K, K-hat) pairs are formed.
* Hit: |Delta phi| <= 2 deg, |Delta theta| <= 2 deg, |Delta r| <= 0.1 r.
* K_acc / K_under / K_over: fractions of scenes with K-hat = K, < K, > K.
* RMSE of phi, theta (degrees), r (metres) and Delta r / r over the matched pairs of the
  scenes with K-hat = K (count reported as ``n_pairs``).
* precision = sum hits / sum K-hat, recall = sum hits / sum K, F1 = 2 sum hits / (sum K + sum K-hat),
  over all scenes of a group.
* success: fraction of scenes with K-hat = K and every source a hit.
* With a CRB: RMSE / RMS(sqrt CRB) over the same pairs, and the CRB-efficient success
  mean_s prod_k erf(2 deg / (sqrt2 sigma_phi)) erf(2 deg / (sqrt2 sigma_theta)) erf(0.1 r / (sqrt2 sigma_r)).

Everything is reported overall, per SNR bin of ``bins_db`` (edges at multiples of ``bins_db``)
and per true K; :meth:`Score.subset` gives any SNR range. Scoring runs on CPU in float64
(inputs on any device are copied there); 10^5 scenes of K_max = 5 take about a second.

>>> s = score(scenes.truth, est, snr_db=scenes.snr_db)      # doctest: +SKIP
>>> print(s.format_table()); s.subset(10, 20).overall.success  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import erf

from ._files import nan_to_none

ANGLE_TOL = math.radians(2.0)
"""Hit tolerance on |Delta phi| and |Delta theta| [rad] (2 degrees), also the angle scale of the matching cost."""

RANGE_TOL_REL = 0.1
"""Hit tolerance on |Delta r| / r (10 % of the true range), also the range scale of the matching cost."""

MAX_ENUMERATED = 720
"""Largest number of candidate assignments per scene solved by vectorised enumeration;
groups of scenes with more (e.g. K = K-hat = 7) fall back to scipy's linear_sum_assignment."""

_CHUNK_ELEMENTS = 1 << 22  # float64 elements per enumeration chunk (32 MB)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def wrap_angle(x):
    """Wrap angles [rad] to (-pi, pi]: ``x - 2 pi ceil((x - pi) / (2 pi))``.

    Works on floats, numpy arrays and torch tensors (same type and device back).
    """
    two_pi = 2 * math.pi
    if isinstance(x, torch.Tensor):
        return x - two_pi * torch.ceil((x - math.pi) / two_pi)
    if isinstance(x, np.ndarray):
        return x - two_pi * np.ceil((x - math.pi) / two_pi)
    return float(x - two_pi * math.ceil((x - math.pi) / two_pi))


def _np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.is_complex():
            raise ValueError("metrics: complex tensor where a real one was expected")
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _positions(obj, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(K [S] int64, phi, theta, r [S, K_max] float64) of a Truth/Estimates-like object, validated."""
    for name in ("K", "phi", "theta", "r"):
        if not hasattr(obj, name):
            raise ValueError(f"{what} has no field {name!r}")
    K = _np(obj.K, np.float64)
    if K.ndim != 1:
        raise ValueError(f"{what}.K must have shape [S], got {list(K.shape)}")
    S = K.shape[0]
    bad = ~np.isfinite(K) | (K < 0) | (K != np.round(K))
    cols = []
    for name in ("phi", "theta", "r"):
        a = _np(getattr(obj, name))
        if a.ndim != 2 or a.shape[0] != S:
            raise ValueError(f"{what}.{name} must have shape [S={S}, K_max], got {list(a.shape)}")
        cols.append(a)
    if not (cols[0].shape == cols[1].shape == cols[2].shape):
        raise ValueError(f"{what}.phi/theta/r shapes differ: {[list(c.shape) for c in cols]}")
    if bad.any():
        s = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}.K must be a non-negative integer; scene {s} has {K[s]}")
    K = K.astype(np.int64)
    k_cols = cols[0].shape[1]
    if (K > k_cols).any():
        s = int(np.flatnonzero(K > k_cols)[0])
        raise ValueError(f"{what}.K of scene {s} is {K[s]} but {what}.phi has only {k_cols} columns")
    return K, cols[0], cols[1], cols[2]


def _truth_of(truth):
    """Accept a Truth, or a Scenes carrying one (then also return its snr_db)."""
    if hasattr(truth, "truth") and not hasattr(truth, "K"):
        if truth.truth is None:
            raise ValueError("scenes have no truth; cannot score")
        return truth.truth, getattr(truth, "snr_db", None)
    return truth, None


def _validated_truth(truth):
    K, phi, theta, r = _positions(truth, "truth")
    active = np.arange(phi.shape[1])[None, :] < K[:, None]
    for name, a in (("phi", phi), ("theta", theta), ("r", r)):
        bad = active & ~np.isfinite(a)
        if name == "r":
            bad |= active & np.isfinite(a) & (a <= 0)
        if bad.any():
            s, k = np.argwhere(bad)[0]
            raise ValueError(f"truth.{name} of scene {s}, source {k} is {a[s, k]} (must be finite{', > 0' if name == 'r' else ''})")
    return K, phi, theta, r


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------
@dataclass
class Matching:
    """Matched (truth, estimate) pairs of every scene, as flat numpy arrays over pairs.

    Errors are estimate minus truth: ``dphi`` wrapped to (-pi, pi] [rad], ``dtheta`` [rad],
    ``dr`` [m]; ``r_true`` is the true range of the pair. Pairs are sorted by scene, then
    truth index. ``K`` and ``K_hat`` are per scene.
    """

    scene: np.ndarray
    truth_index: np.ndarray
    est_index: np.ndarray
    dphi: np.ndarray
    dtheta: np.ndarray
    dr: np.ndarray
    r_true: np.ndarray
    hit: np.ndarray
    K: np.ndarray
    K_hat: np.ndarray

    def __len__(self) -> int:
        return self.scene.shape[0]

    @property
    def n_scenes(self) -> int:
        return self.K.shape[0]

    @property
    def rel_r(self) -> np.ndarray:
        """Delta r / r (true range) per pair."""
        return self.dr / self.r_true

    def hits_per_scene(self) -> np.ndarray:
        return np.bincount(self.scene, weights=self.hit, minlength=self.n_scenes).astype(np.int64)

    def success(self) -> np.ndarray:
        """Per scene: K-hat = K and every true source a hit."""
        return (self.K == self.K_hat) & (self.hits_per_scene() == self.K)


def _deltas(t, e) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise errors [S, Kt, Ke] and the matching cost (NaN/inf where an estimate is not finite)."""
    _, phi_t, theta_t, r_t = t
    _, phi_e, theta_e, r_e = e
    dphi = wrap_angle(phi_e[:, None, :] - phi_t[:, :, None])
    dtheta = theta_e[:, None, :] - theta_t[:, :, None]
    dr = r_e[:, None, :] - r_t[:, :, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        cost = (dphi / ANGLE_TOL) ** 2 + (dtheta / ANGLE_TOL) ** 2 + (dr / (RANGE_TOL_REL * r_t[:, :, None])) ** 2
    return dphi, dtheta, dr, cost


def _enumerate_group(cost: np.ndarray, k: int, kh: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact min-cost assignment for a group of scenes that all have K = k, K-hat = kh.

    All injections of the smaller side into the larger are enumerated and their costs summed
    in one vectorised gather. Non-finite entries (an estimate with NaN/inf inside its first
    K-hat) are handled lexicographically: fewest non-finite pairs first, then least cost, so a
    broken estimate is left unmatched whenever K-hat > K allows it and never disturbs the others.
    Returns (truth index, est index) arrays of shape [G, min(k, kh)].
    """
    G = cost.shape[0]
    n = min(k, kh)
    if k <= kh:
        perms = np.array(list(itertools.permutations(range(kh), k)), dtype=np.int64)  # [P, k] est indices
        rows = np.broadcast_to(np.arange(k), perms.shape)
        cols = perms
    else:
        perms = np.array(list(itertools.permutations(range(k), kh)), dtype=np.int64)  # [P, kh] truth indices
        rows = perms
        cols = np.broadcast_to(np.arange(kh), perms.shape)
    P = perms.shape[0]
    ti = np.empty((G, n), dtype=np.int64)
    ei = np.empty((G, n), dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // (P * n))
    for a in range(0, G, chunk):
        c = cost[a : a + chunk]
        vals = c[:, rows, cols]  # [g, P, n]
        bad = ~np.isfinite(vals)
        tot = np.where(bad, 0.0, vals).sum(-1)
        if bad.any():
            nbad = bad.sum(-1)
            tot = np.where(nbad > nbad.min(1, keepdims=True), np.inf, tot)
        best = np.argmin(tot, axis=1)
        ti[a : a + chunk] = rows[best]
        ei[a : a + chunk] = cols[best]
    return ti, ei


def _scipy_group(cost: np.ndarray, k: int, kh: int) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`_enumerate_group` with one scipy call per scene (large K)."""
    G = cost.shape[0]
    n = min(k, kh)
    ti = np.empty((G, n), dtype=np.int64)
    ei = np.empty((G, n), dtype=np.int64)
    for g in range(G):
        c = cost[g]
        bad = ~np.isfinite(c)
        if bad.any():
            # a non-finite pair costs more than any assignment of finite pairs (lexicographic order)
            big = 2.0 * (np.abs(c[~bad]).sum() + 1.0)
            c = np.where(bad, big, c)
        r, q = linear_sum_assignment(c)
        ti[g], ei[g] = r, q
    return ti, ei


def match(truth, est) -> Matching:
    """Hungarian matching of estimated to true sources, scene by scene.

    ``truth`` is a :class:`~risloc.scenes.Truth` (or a Scenes carrying one) and ``est`` an
    :class:`~risloc.scenes.Estimates` (any objects with ``K [S]`` and ``phi/theta/r [S, K_max]``,
    NaN after the first K; the two K_max may differ). Per scene the min(K, K-hat) pairs minimise
    sum c_ij with c_ij = (Delta phi/2 deg)^2 + (Delta theta/2 deg)^2 + (Delta r/(0.1 r_i))^2, r_i the
    true range, Delta phi wrapped to (-pi, pi] (the scoring rule of docs/metrics.md; Kuhn 1955).

    The cost tensor of all scenes is built at once; the assignment is exact: scenes are grouped
    by (K, K-hat) and, while a group has at most :data:`MAX_ENUMERATED` candidate assignments,
    every assignment is enumerated vectorised; larger groups call scipy's linear_sum_assignment
    per scene. Ties between equal-cost assignments may be broken differently from scipy.
    Estimates with NaN/inf among their first K-hat entries never crash: such an estimate is
    matched only when it must be (K-hat <= K) and is never a hit. Bad truth raises ValueError.
    """
    truth, _ = _truth_of(truth)
    t = _validated_truth(truth)
    e = _positions(est, "est")
    K, Kh = t[0], e[0]
    if K.shape[0] != Kh.shape[0]:
        raise ValueError(f"truth has {K.shape[0]} scenes but est has {Kh.shape[0]}")
    S = K.shape[0]
    dphi, dtheta, dr, cost = _deltas(t, e)

    n_per = np.minimum(K, Kh)
    offsets = np.concatenate([[0], np.cumsum(n_per)])
    n_pairs = int(offsets[-1])
    scene = np.repeat(np.arange(S, dtype=np.int64), n_per)
    ti = np.empty(n_pairs, dtype=np.int64)
    ei = np.empty(n_pairs, dtype=np.int64)
    key = K * (Kh.max(initial=0) + 1) + Kh
    for kk in np.unique(key[n_per > 0]):
        idx = np.flatnonzero(key == kk)
        k, kh = int(K[idx[0]]), int(Kh[idx[0]])
        n_assign = math.perm(max(k, kh), min(k, kh))
        c = cost[idx][:, :k, :kh]
        solver = _enumerate_group if n_assign <= MAX_ENUMERATED else _scipy_group
        gti, gei = solver(c, k, kh)
        # sort each scene's pairs by truth index
        order = np.argsort(gti, axis=1, kind="stable")
        gti = np.take_along_axis(gti, order, 1)
        gei = np.take_along_axis(gei, order, 1)
        dest = offsets[idx][:, None] + np.arange(min(k, kh))[None, :]
        ti[dest] = gti
        ei[dest] = gei
    dp, dt, d_r = dphi[scene, ti, ei], dtheta[scene, ti, ei], dr[scene, ti, ei]
    r_true = t[3][scene, ti]
    with np.errstate(invalid="ignore"):
        hit = (np.abs(dp) <= ANGLE_TOL) & (np.abs(dt) <= ANGLE_TOL) & (np.abs(d_r) <= RANGE_TOL_REL * r_true)
    return Matching(scene, ti, ei, dp, dt, d_r, r_true, hit, K, Kh)


def success_mask(truth, est):
    """Per scene: K-hat = K and every true source matched to a hit.

    A torch bool tensor ``[S]`` on the device of ``truth.K`` when that is a tensor, else numpy.
    """
    truth, _ = _truth_of(truth)
    ok = match(truth, est).success()
    if isinstance(truth.K, torch.Tensor):
        return torch.from_numpy(ok).to(truth.K.device)
    return ok


def k_confusion(truth, est, k_max: int | None = None) -> np.ndarray:
    """Confusion matrix of the source count: ``C[K, K_hat]`` = number of scenes, int64.

    Shape ``[k_max + 1, k_max + 1]`` (rows true K = 0..k_max, columns K-hat = 0..k_max);
    counts beyond ``k_max`` are clipped into the last row/column. ``k_max`` defaults to the
    largest K or K-hat present.
    """
    truth, _ = _truth_of(truth)
    K = _np(truth.K, np.int64)
    Kh = _np(est.K, np.int64)
    if K.shape != Kh.shape:
        raise ValueError(f"truth has {K.shape[0]} scenes but est has {Kh.shape[0]}")
    if k_max is None:
        k_max = int(max(K.max(initial=0), Kh.max(initial=0)))
    if (K < 0).any() or (Kh < 0).any():
        raise ValueError("K and K_hat must be non-negative")
    K = np.minimum(K, k_max)
    Kh = np.minimum(Kh, k_max)
    return np.bincount(K * (k_max + 1) + Kh, minlength=(k_max + 1) ** 2).reshape(k_max + 1, k_max + 1)


# ------------------------------------------------------------------------------------------
# CRB
# ------------------------------------------------------------------------------------------
def _crb_arrays(crb, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigma_phi, sigma_theta, sigma_r) ``[S, K_max]`` from a CRB result, dict or object.

    Accepted names: ``phi/theta/r`` or ``crb_phi/crb_theta/crb_r`` (attributes or keys);
    values are standard deviations (square roots of the CRB diagonal) in rad / m, NaN padded.
    """
    out = []
    for name in ("phi", "theta", "r"):
        val = None
        for key in (name, f"crb_{name}"):
            if isinstance(crb, Mapping) and key in crb:
                val = crb[key]
                break
            if not isinstance(crb, Mapping) and hasattr(crb, key):
                val = getattr(crb, key)
                break
        if val is None:
            raise ValueError(f"crb has no {name!r} (or 'crb_{name}') field")
        a = _np(val)
        if a.ndim != 2 or a.shape[0] != S:
            raise ValueError(f"crb.{name} must have shape [S={S}, K_max], got {list(a.shape)}")
        out.append(a)
    return out[0], out[1], out[2]


def crb_success_probability(truth, crb) -> np.ndarray:
    """Per scene, the success probability of an unbiased estimator at the bound with the right K.

        P_s = prod_{k<K} erf(2 deg / (sqrt2 sigma_phi,k)) erf(2 deg / (sqrt2 sigma_theta,k)) erf(0.1 r_k / (sqrt2 sigma_r,k))

    i.e. errors e ~ N(0, sigma^2) independent per coordinate and source (cross-correlations of
    the CRB are ignored; phi errors are not wrapped, exact while sigma_phi << pi). sigma = 0 gives
    1, sigma = inf gives 0, a NaN sigma of an active source gives NaN for that scene.
    """
    truth, _ = _truth_of(truth)
    K, _, _, r = _validated_truth(truth)
    sp, st, sr = _crb_arrays(crb, K.shape[0])
    kc = min(r.shape[1], sp.shape[1])
    if (K > sp.shape[1]).any():
        raise ValueError(f"crb has {sp.shape[1]} columns but a scene has K = {int(K.max())}")
    active = np.arange(kc)[None, :] < K[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (
            erf(ANGLE_TOL / (math.sqrt(2) * sp[:, :kc]))
            * erf(ANGLE_TOL / (math.sqrt(2) * st[:, :kc]))
            * erf(RANGE_TOL_REL * r[:, :kc] / (math.sqrt(2) * sr[:, :kc]))
        )
    p = np.where(active, p, 1.0)
    return np.prod(p, axis=1)


# ------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------
@dataclass
class Metrics:
    """The scores of one group of scenes (see the module docstring / docs/metrics.md).

    Fractions in [0, 1]; ``rmse_*_deg`` in degrees, ``rmse_r_m`` in metres, ``rmse_rel_r``
    dimensionless. NaN where undefined (no scenes, no pairs, 0/0). The ``crb_*`` fields are
    None when no CRB was given.
    """

    n_scenes: int
    K_acc: float
    K_under: float
    K_over: float
    success: float
    precision: float
    recall: float
    f1: float
    n_hits: int
    n_true: int
    n_est: int
    rmse_phi_deg: float
    rmse_theta_deg: float
    rmse_r_m: float
    rmse_rel_r: float
    n_pairs: int
    n_pairs_nonfinite: int
    crb_ratio_phi: float | None = None
    crb_ratio_theta: float | None = None
    crb_ratio_r: float | None = None
    crb_ratio_rel_r: float | None = None
    n_crb_pairs: int | None = None
    success_crb: float | None = None
    n_crb_scenes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _div(a, b) -> float:
    return float(a) / float(b) if b else float("nan")


def _rms(ss, n) -> float:
    return math.sqrt(ss / n) if n else float("nan")


def _metrics(d: dict[str, np.ndarray], mask: np.ndarray, has_crb: bool) -> Metrics:
    """Aggregate per-scene sums over the scenes selected by ``mask``."""
    s = {k: v[mask] for k, v in d.items() if k != "snr"}
    n = int(mask.sum())
    K, Kh = s["K"], s["K_hat"]
    hits, n_true, n_est = int(s["hits"].sum()), int(K.sum()), int(Kh.sum())
    n_pairs = int(s["n_pairs"].sum())
    m = Metrics(
        n_scenes=n,
        K_acc=_div((K == Kh).sum(), n),
        K_under=_div((Kh < K).sum(), n),
        K_over=_div((Kh > K).sum(), n),
        success=_div(s["success"].sum(), n),
        precision=_div(hits, n_est),
        recall=_div(hits, n_true),
        f1=_div(2 * hits, n_true + n_est),
        n_hits=hits,
        n_true=n_true,
        n_est=n_est,
        rmse_phi_deg=math.degrees(_rms(s["ss_phi"].sum(), n_pairs)),
        rmse_theta_deg=math.degrees(_rms(s["ss_theta"].sum(), n_pairs)),
        rmse_r_m=_rms(s["ss_r"].sum(), n_pairs),
        rmse_rel_r=_rms(s["ss_rel"].sum(), n_pairs),
        n_pairs=n_pairs,
        n_pairs_nonfinite=int(s["n_nonfinite"].sum()),
    )
    if has_crb:
        nc = int(s["n_crb"].sum())
        m.n_crb_pairs = nc
        for c in ("phi", "theta", "r", "rel"):
            num, den = s[f"se_{c}"].sum(), s[f"sc_{c}"].sum()
            ratio = math.sqrt(num / den) if den > 0 else (float("inf") if num > 0 else float("nan"))
            setattr(m, f"crb_ratio_{'rel_r' if c == 'rel' else c}", ratio)
        p = s["p_crb"]
        ok = np.isfinite(p)
        m.n_crb_scenes = int(ok.sum())
        m.success_crb = float(p[ok].mean()) if ok.any() else float("nan")
    return m


def _snr_label(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}) dB"


@dataclass
class Score:
    """Scores overall, per SNR bin and per true K, plus the per-scene sums to regroup them.

    ``by_snr`` maps ``(lo, hi)`` (dB, bin [lo, hi)) to :class:`Metrics`; ``by_k`` maps the true K.
    :meth:`subset` / :meth:`select` return a new :class:`Score` over fewer scenes.
    ``str(score)`` is :meth:`format_table`.
    """

    overall: Metrics
    by_snr: dict[tuple[float, float], Metrics]
    by_k: dict[int, Metrics]
    bins_db: float
    has_crb: bool
    per_scene: dict[str, np.ndarray] = field(repr=False)
    """Per-scene arrays: K, K_hat, hits, success, snr (NaN if unknown) and the sums behind the RMSEs."""

    # -- regrouping --------------------------------------------------------------------------
    @classmethod
    def _build(cls, d: dict[str, np.ndarray], bins_db: float, has_crb: bool) -> "Score":
        S = d["K"].shape[0]
        overall = _metrics(d, np.ones(S, dtype=bool), has_crb)
        by_snr: dict[tuple[float, float], Metrics] = {}
        snr = d["snr"]
        fin = np.isfinite(snr)
        if fin.any():
            lo_idx = np.full(S, np.iinfo(np.int64).min)
            lo_idx[fin] = np.floor(snr[fin] / bins_db).astype(np.int64)
            for b in np.unique(lo_idx[fin]):
                by_snr[(float(b * bins_db), float((b + 1) * bins_db))] = _metrics(d, lo_idx == b, has_crb)
        by_k = {int(k): _metrics(d, d["K"] == k, has_crb) for k in np.unique(d["K"])}
        return cls(overall, by_snr, by_k, bins_db, has_crb, d)

    def select(self, mask) -> "Score":
        """The scores of the scenes where ``mask`` [S] (bool array/tensor) is true."""
        mask = _np(mask, bool)
        S = self.per_scene["K"].shape[0]
        if mask.shape != (S,):
            raise ValueError(f"mask must have shape [{S}], got {list(mask.shape)}")
        return Score._build({k: v[mask] for k, v in self.per_scene.items()}, self.bins_db, self.has_crb)

    def subset(self, snr_lo: float = -math.inf, snr_hi: float = math.inf, *, include_hi: bool = True) -> "Score":
        """The scores of the scenes with snr_lo <= SNR <= snr_hi (``include_hi=False``: < snr_hi).

        E.g. ``score.subset(10, 20).overall.success``; scenes without SNR are never included.
        """
        snr = self.per_scene["snr"]
        if not np.isfinite(snr).any():
            raise ValueError("no SNR known for these scenes: pass snr_db to score()")
        with np.errstate(invalid="ignore"):
            mask = (snr >= snr_lo) & ((snr <= snr_hi) if include_hi else (snr < snr_hi))
        return self.select(mask)

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict: overall, by_snr (list with snr_lo/snr_hi), by_k (list with K)."""
        return {
            "bins_db": self.bins_db,
            "overall": self.overall.to_dict(),
            "by_snr": [{"snr_lo": lo, "snr_hi": hi, **m.to_dict()} for (lo, hi), m in self.by_snr.items()],
            "by_k": [{"K": k, **m.to_dict()} for k, m in self.by_k.items()],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON (NaN and inf written as null)."""
        return json.dumps(nan_to_none(self.to_dict()), indent=indent, allow_nan=False)

    def format_table(self) -> str:
        """Markdown tables (overall, per SNR bin, per true K); angles in degrees, 3 significant digits."""
        cols = [
            ("scenes", "n_scenes"), ("K acc", "K_acc"), ("K under", "K_under"), ("K over", "K_over"),
            ("success", "success"), ("precision", "precision"), ("recall", "recall"), ("F1", "f1"),
            ("RMSE φ (°)", "rmse_phi_deg"), ("RMSE θ (°)", "rmse_theta_deg"), ("RMSE r (m)", "rmse_r_m"),
            ("RMSE Δr/r", "rmse_rel_r"), ("pairs", "n_pairs"),
        ]
        if self.has_crb:
            cols += [
                ("φ RMSE/√CRB", "crb_ratio_phi"), ("θ RMSE/√CRB", "crb_ratio_theta"),
                ("r RMSE/√CRB", "crb_ratio_r"), ("success at CRB", "success_crb"),
            ]

        def table(first: str, rows: list[tuple[str, Metrics]]) -> str:
            head = "| " + " | ".join([first] + [c[0] for c in cols]) + " |"
            sep = "| " + " | ".join(["---"] + ["---:"] * len(cols)) + " |"
            body = ["| " + " | ".join([label] + [format_number(getattr(m, a)) for _, a in cols]) + " |" for label, m in rows]
            return "\n".join([head, sep, *body])

        parts = ["### Overall", "", table("", [("all", self.overall)])]
        if self.by_snr:
            parts += ["", f"### Per SNR bin ({self.bins_db:g} dB)", "",
                      table("SNR", [(_snr_label(lo, hi), m) for (lo, hi), m in self.by_snr.items()])]
        parts += ["", "### Per true K", "", table("K", [(str(k), m) for k, m in self.by_k.items()])]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format_table()


def format_number(x) -> str:
    """3 significant digits (integers as they are, NaN as 'NaN', None as '–')."""
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    if e < -3 or e >= 5:
        return f"{x:.2e}"
    x = round(x, 2 - e)  # 3 significant digits (rounding may carry into the next decade)
    e = math.floor(math.log10(abs(x))) if x else 0
    return f"{x:.{max(0, 2 - e)}f}"


def score(truth, est, *, snr_db=None, crb=None, bins_db: float = 5.0) -> Score:
    """Score ``est`` against ``truth`` by the rules of docs/metrics.md, overall, per SNR bin and per true K.

    Parameters
    ----------
    truth : Truth (or Scenes with a truth; then its ``snr_db`` is used unless given).
    est : Estimates.
    snr_db : ``[S]`` SNR per scene [dB] for the SNR bins (NaN: scene in no bin). Optional.
    crb : optional CRB standard deviations ``[S, K_max]`` per TRUE source (rad, rad, m), as a
        ``risloc.crb`` result or any object/dict with ``phi, theta, r`` (or ``crb_phi`` ...).
        Adds RMSE/RMS(sqrt CRB) over the same matched pairs (pairs with a finite CRB) and the
        CRB-efficient success (:func:`crb_success_probability`, averaged over scenes whose
        bound is finite or infinite, i.e. not NaN).
    bins_db : SNR bin width; bins are [j b, (j+1) b) for integer j.
    """
    truth, snr_from_scenes = _truth_of(truth)
    if snr_db is None:
        snr_db = snr_from_scenes
    if not (bins_db > 0):
        raise ValueError(f"bins_db must be > 0, got {bins_db}")
    m = match(truth, est)
    S = m.n_scenes
    if snr_db is None:
        snr = np.full(S, np.nan)
    else:
        snr = _np(snr_db).reshape(-1)
        if snr.shape[0] != S:
            raise ValueError(f"snr_db has {snr.shape[0]} entries but there are {S} scenes")

    def per_scene_sum(values, sel):
        return np.bincount(m.scene[sel], weights=values[sel], minlength=S)

    hits = m.hits_per_scene()
    eq = (m.K == m.K_hat)[m.scene]
    rel = m.rel_r
    finite = np.isfinite(m.dphi) & np.isfinite(m.dtheta) & np.isfinite(m.dr)
    use = eq & finite
    ones = np.ones(len(m))
    d = {
        "K": m.K,
        "K_hat": m.K_hat,
        "hits": hits,
        "success": (m.K == m.K_hat) & (hits == m.K),
        "snr": snr,
        "n_pairs": per_scene_sum(ones, use).astype(np.int64),
        "n_nonfinite": per_scene_sum(ones, eq & ~finite).astype(np.int64),
        "ss_phi": per_scene_sum(m.dphi**2, use),
        "ss_theta": per_scene_sum(m.dtheta**2, use),
        "ss_r": per_scene_sum(m.dr**2, use),
        "ss_rel": per_scene_sum(rel**2, use),
    }
    has_crb = crb is not None
    if has_crb:
        sp, st, sr = _crb_arrays(crb, S)
        if (m.truth_index >= sp.shape[1]).any() or (m.K > sp.shape[1]).any():
            raise ValueError(f"crb has {sp.shape[1]} columns but a scene has K = {int(m.K.max())}")
        cp, ct, cr = sp[m.scene, m.truth_index], st[m.scene, m.truth_index], sr[m.scene, m.truth_index]
        crel = cr / m.r_true
        # each ratio over the RMSE pairs whose bound of that coordinate is finite (a CRB computed
        # for a subset of parameters is NaN elsewhere; inf = unidentifiable is left out of ratios)
        d["n_crb"] = per_scene_sum(ones, use & np.isfinite(cp) & np.isfinite(ct) & np.isfinite(cr)).astype(np.int64)
        for c, err, bound in (("phi", m.dphi, cp), ("theta", m.dtheta, ct), ("r", m.dr, cr), ("rel", rel, crel)):
            use_c = use & np.isfinite(bound)
            d[f"se_{c}"] = per_scene_sum(err**2, use_c)
            d[f"sc_{c}"] = per_scene_sum(bound**2, use_c)
        d["p_crb"] = crb_success_probability(truth, crb)
    return Score._build(d, float(bins_db), has_crb)


def evaluate(scenes, est, *, crb=None, bins_db: float = 5.0) -> Score:
    """``score(scenes.truth, est, snr_db=scenes.snr_db, crb=crb)``; ``print()`` it for the tables."""
    return score(scenes, est, crb=crb, bins_db=bins_db)


def agreement(a, b) -> dict:
    """How far two sets of estimates of the same scenes (Estimates ``a``, ``b``, e.g. one estimator
    under two settings) are apart: the fraction of scenes with the same K-hat
    (``"same_K_fraction"``) and, over the source slots finite in both, the largest absolute
    difference of each coordinate (``"max_difference"``: phi and theta in radians, r in metres;
    0 where no slot is finite in both). Slots are compared in order, unmatched."""
    if tuple(a.phi.shape) != tuple(b.phi.shape):
        raise ValueError(f"agreement: estimates of shape {tuple(a.phi.shape)} against {tuple(b.phi.shape)} "
                         "([scenes, source slots]; both must be answers for the same scenes and K_max)")
    both = torch.isfinite(a.phi) & torch.isfinite(b.phi.to(a.phi.device))
    diff = {q: (getattr(a, q) - getattr(b, q).to(a.phi.device))[both].abs() for q in ("phi", "theta", "r")}
    return {"same_K_fraction": float((a.K == b.K.to(a.K.device)).float().mean()) if len(a) else 1.0,
            "max_difference": {q: float(d.max()) if d.numel() else 0.0 for q, d in diff.items()}}


__all__ = [
    "ANGLE_TOL",
    "RANGE_TOL_REL",
    "Matching",
    "Metrics",
    "Score",
    "agreement",
    "crb_success_probability",
    "evaluate",
    "format_number",
    "k_confusion",
    "match",
    "score",
    "success_mask",
    "wrap_angle",
]
