"""Estimators by name: ``get("music")(scenes, **options) -> Estimates``.

Every estimator is registered under a name with its metadata (:class:`EstimatorInfo`): the
scenes per call, whether it accepts a known K and under which keyword, whether it is learned
and which packaged weights it reads, and which options are per-scene (sliced with the
scenes). The registered function handles ONE batch: ``fn(batch_of_scenes, **options) ->
Estimates`` on the scenes' device, K-hat and NaN-padded (phi, theta, r) in radians and metres.
The registry does the rest once for every estimator (:meth:`Estimator.__call__`):

* chunks the scenes into batches of ``batch`` scenes (default :attr:`EstimatorInfo.batch`,
  or :attr:`EstimatorInfo.batch_cuda` on CUDA), slices the per-scene options with them, shows
  one tqdm bar over the batches when ``progress`` and concatenates the results;
* refuses scenes whose measurements ``y``, channel ``H`` or codes hold a non-finite value
  (:func:`check_finite`: a ValueError naming the method, the field and the scene), so no
  estimator answers NaN input with NaN, a linear-algebra traceback or a silent K-hat;
* routes a known ``K`` (an int, or a per-scene integer tensor ``[S]``, each in
  ``0..scenario.k_max``) to the estimator's K keyword, refuses it for an estimator that does
  not accept it, and checks that the answer has ``K_hat == K`` in every scene (an estimate
  with a given K never returns another K: a violation raises ``RuntimeError``).

Modules register their function with :func:`register`; :func:`get` imports the module that
owns a name on first use, so optional pieces (the networks) cost nothing until asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from .._devices import cuda_factorisations
from ..scenes import Estimates, Scenes

__all__ = ["EstimatorInfo", "Estimator", "BatchEstimator", "register", "get", "info", "available", "locate", "known_k",
           "check_finite"]


class BatchEstimator(Protocol):
    """The function a module registers: one batch of scenes in, its estimates out."""

    def __call__(self, scenes: Scenes, **options) -> Estimates: ...


@dataclass(frozen=True)
class EstimatorInfo:
    """What the registry knows about an estimator before running it.

    Attributes:
        name: the registered name (``risloc locate --method NAME``).
        module: the module that registers it (imported on first use).
        batch: scenes per call on the CPU (bounds memory; also the bench's default unit).
        batch_cuda: scenes per call on CUDA.
        k_option: the estimator's keyword for a known K (``"K"``; ``"n_sources"`` for ramezani);
            None: the estimator does not accept a known K.
        learned: whether it runs a trained network (reads a checkpoint, option ``checkpoint``).
        default_weights: its packaged checkpoint, relative to the ``risloc`` package folder
            (learned estimators only); None: no packaged weights.
        per_scene: options holding one entry per scene (sliced with the scenes' batches).
        summary: one line for listings.
        inference_mode: whether the registry runs it in ``torch.inference_mode()`` off CUDA (faster
            on one scene; :meth:`Estimator.__call__`): only for estimators that need no autograd.
            True for the package's own; False by default, so that an estimator registered by a user
            may use autograd inside.
    """

    name: str
    module: str
    batch: int = 1024
    batch_cuda: int = 1024
    k_option: str | None = None
    learned: bool = False
    default_weights: str | None = None
    per_scene: tuple[str, ...] = ()
    summary: str = ""
    inference_mode: bool = False

    @property
    def accepts_k(self) -> bool:
        """Whether a known K can be given (``K=`` in Python, ``--k`` / ``--oracle-k`` on the command line)."""
        return self.k_option is not None

    def default_weights_path(self) -> Path | None:
        """The packaged checkpoint's path (it may be absent from an installation), or None."""
        if self.default_weights is None:
            return None
        return Path(__file__).resolve().parent.parent / self.default_weights

    def batch_for(self, device: torch.device | str) -> int:
        """Scenes per call on ``device``."""
        return self.batch_cuda if torch.device(device).type == "cuda" else self.batch


# The estimators of this package, by name (none of them uses autograd: all run in inference mode off CUDA).
_INFO: dict[str, EstimatorInfo] = {
    i.name: dataclasses.replace(i, inference_mode=True)
    for i in (
        EstimatorInfo("music", "risloc.estimators.music", k_option="K", per_scene=("init",),
                      summary="MUSIC on the effective covariance, RAP peak search (K from an order rule)"),
        EstimatorInfo("music+ml", "risloc.estimators.music", batch=16, batch_cuda=1024, k_option="K", per_scene=("init",),
                      summary="MUSIC, then ml's likelihood refinement and penalised pruning from its sources"),
        EstimatorInfo("mvdr", "risloc.estimators.mvdr", k_option="K",
                      summary="MVDR / Capon spectrum, peaks over its floor (or the K strongest)"),
        EstimatorInfo("ramezani", "risloc.estimators.ramezani", batch=256, batch_cuda=256, k_option="n_sources",
                      per_scene=("covariance",), summary="modified MUSIC with sub-RIS smoothing (Ramezani et al.)"),
        EstimatorInfo("ml", "risloc.estimators.ml", batch=16, batch_cuda=1024, k_option="K", per_scene=("init", "snr_db", "atoms"),
                      summary="maximum likelihood: greedy grid start, joint refinement, penalised K"),
        EstimatorInfo("ml-robust", "risloc.estimators.ml_robust", batch=16, batch_cuda=1024, k_option="K",
                      per_scene=("init", "snr_db", "atoms"),
                      summary="ml with a model-error floor (CSI error, RIS phase noise) of a level estimated per scene"),
        EstimatorInfo("ml-joint", "risloc.estimators.ml_joint", batch=16, batch_cuda=1024, k_option="K", per_scene=("snr_db",),
                      summary="ml-robust, then the RIS hardware (per-level amplitudes, failed elements) and the positions estimated jointly where the likelihood gains"),
        EstimatorInfo("sbl", "risloc.estimators.sbl", batch=16, batch_cuda=256, k_option="K",
                      summary="sparse Bayesian learning on a near-field dictionary, off-grid refinement"),
        # learned / learned+ml: 2 048 scenes per CUDA call (peak 7.7 / 12.3 GiB on an H100; 1.2 x the
        # scenes/s of 1 024, benchmarks/results/h100/learned-stage/batch_memory.json)
        EstimatorInfo("learned", "risloc.nn.inference", batch_cuda=2048, k_option="K", learned=True, default_weights="weights/mixed.pt",
                      summary="the learned pipeline: network detections (K head + 1) -> likelihood refinement, a new search of the weakest source, two pruning passes"),
        EstimatorInfo("learned+ml", "risloc.nn.inference", batch_cuda=2048, k_option="K", learned=True, default_weights="weights/mixed.pt",
                      summary="the network's detections (K head + 1), then ml's refinement, one further source, a RELAX cycle of every source and two pruning passes"),
        EstimatorInfo("subspacenet", "risloc.nn.subspacenet", k_option="K", learned=True, default_weights="weights/subspacenet.pt",
                      summary="SubspaceNet-style surrogate covariance -> MUSIC"),
    )
}
_REGISTRY: dict[str, "Estimator"] = {}


_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "tuple": tuple, "list": tuple, "Mapping": dict}


def _list_of(default) -> str:
    """What a list option whose default is ``default`` holds: "texts" (a tuple of texts), "shape"
    (a tuple of ints, e.g. ``grid_shape``: as many), "numbers" (a tuple of other numbers) or ""
    (anything: the default is no tuple, or an empty one)."""
    if not isinstance(default, tuple) or not default:
        return ""
    if all(isinstance(d, str) for d in default):
        return "texts"
    return "shape" if all(isinstance(d, int) and not isinstance(d, bool) for d in default) else "numbers"


def _like(value, default) -> bool:
    """Whether the list ``value`` is of the kind of the tuple ``default`` (:func:`_list_of`)."""
    kind = _list_of(default)
    if kind == "texts":
        return all(isinstance(v, str) for v in value)
    numeric = all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in value)
    return not kind or (numeric and (kind == "numbers" or len(value) == len(default)))


def _list_kind(default) -> str:
    """How :meth:`Estimator.check_option` names the list a tuple option takes (:func:`_list_of`)."""
    kind = _list_of(default)
    return f"a list of {len(default)} integers" if kind == "shape" else f"a list of {kind}" if kind else "a list"


def _option_annotation(fn: Callable, option: str) -> str | None:
    """The annotation of an option: its parameter's in ``fn``'s signature, else its entry in the
    module's ``OPTION_TYPES`` (for options taken through ``**options``, e.g. ``ml``'s fields of
    :class:`~risloc.estimators.ml.MLOptions`); None when neither has one."""
    try:
        param = inspect.signature(fn).parameters.get(option)
    except (TypeError, ValueError):
        param = None
    if param is not None and param.annotation is not inspect.Parameter.empty:
        return str(param.annotation)
    types = getattr(sys.modules.get(getattr(fn, "__module__", ""), None), "OPTION_TYPES", None)
    return str(types[option]) if isinstance(types, dict) and option in types else None


def _option_kinds(fn: Callable, option: str, default: Any) -> tuple[tuple[type, ...], bool]:
    """``(kinds, nullable)`` of an option (:meth:`Estimator.check_option`): the builtin names in its
    annotation (``int | None`` -> (int,), nullable; a class of its own, e.g. a tensor or a path, leaves
    the option unchecked: ()), else the kind of its default (nullable when the default is None)."""
    annotation = _option_annotation(fn, option)
    if annotation is not None:
        words = [w.strip().split("[")[0] for w in annotation.replace("typing.", "").replace("Optional", "").split("|")]
        nullable = any(w in ("None", "NoneType") for w in words) or default is None
        words = [w for w in words if w not in ("None", "NoneType")]
        if words and all(w in _KINDS for w in words):
            return tuple(dict.fromkeys(_KINDS[w] for w in words)), nullable
        return (), nullable
    if isinstance(default, bool):
        return (bool,), False
    for kind in (int, float, str, dict, tuple):
        if isinstance(default, kind):
            return (kind,), False
    return (), default is None


def _keyword_defaults(fn: Callable) -> dict[str, Any]:
    """The options of ``fn`` with their defaults, read once at registration: its keyword
    arguments, plus its module's documented ``DEFAULTS`` dict when it has one (options that
    the function takes through ``**options``, e.g. ``ml``'s)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    out = {p.name: p.default for p in list(params)[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}
    extra = getattr(sys.modules.get(getattr(fn, "__module__", ""), None), "DEFAULTS", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


def known_k(K: int | Tensor, n_scenes: int, k_max: int, *, device=None) -> Tensor:
    """A known K as a per-scene int64 tensor ``[S]`` (an int is broadcast), the one validation of
    a known K: ValueError naming the first scene whose K is outside ``0..k_max``, a tensor of the
    wrong length, or a value that is not an integer."""
    if isinstance(K, bool) or not (isinstance(K, numbers.Integral) or torch.is_tensor(K)):
        raise ValueError(f"K: expected an int or an integer tensor [S], not {type(K).__name__}")
    t = torch.as_tensor(K, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"K: expected integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.ndim == 0:
        t = t.expand(n_scenes)
    if t.ndim != 1:
        raise ValueError(f"K: expected an int or a tensor of shape [{n_scenes}], got shape {list(t.shape)}")
    if t.shape[0] != n_scenes:
        raise ValueError(f"K has shape [{t.shape[0]}] ({t.shape[0]} values) for {n_scenes} scenes: "
                         "expected an int or one value per scene")
    bad = (t < 0) | (t > k_max)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"K[{i}] = {int(t[i])} (scene {i}): outside 0..{k_max} (k_max)")
    return t.contiguous()


def check_finite(scenes: Scenes, who: str) -> None:
    """ValueError naming ``who``, the field and the first scene whose ``y``, ``H`` or ``codes`` hold a
    non-finite value: the registry's input check of every estimator (:meth:`Estimator.__call__`).
    One host read for the three fields (a wait for the device only where they are on CUDA); the
    scenes are scanned 4 096 at a time, so the check's working memory stays small."""
    fields_ = ("y", "H", "codes")
    step = 4096
    finite = lambda t: torch.isfinite(torch.view_as_real(t) if t.is_complex() else t).flatten(1).all(1)  # noqa: E731
    bad = ~torch.cat([torch.stack([finite(getattr(scenes, name)[a : a + step]) for name in fields_])
                      for a in range(0, len(scenes), step)], dim=1)  # [3, S]
    if bool(bad.any()):
        f, i = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"{who}: scenes.{fields_[f]} of scene {i} has non-finite values")


def _slice(v: Any, a: int, b: int) -> Any:
    """Scenes ``[a, b)`` of a per-scene option (a tensor, Estimates, a covariance; scalars pass)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if torch.is_tensor(v):
        return v if v.ndim == 0 else v[a:b]
    if dataclasses.is_dataclass(v) and hasattr(v, "factor") and hasattr(v, "diag"):  # LowRankCovariance
        return dataclasses.replace(v, factor=v.factor[a:b], diag=v.diag[a:b])
    return v[a:b]


class Estimator:
    """A registered estimator: its metadata (:attr:`info`), its keyword defaults
    (:attr:`options`) and the batch function (:attr:`fn`); calling it runs any number of scenes."""

    def __init__(self, info: EstimatorInfo, fn: BatchEstimator):
        self.info = info
        self.fn = fn
        self.options: Mapping[str, Any] = _keyword_defaults(fn)
        self.__doc__ = fn.__doc__
        self.__module__ = getattr(fn, "__module__", __name__)
        self.__name__ = getattr(fn, "__name__", info.name)
        self.__wrapped__ = fn  # inspect.unwrap(get(name)) is the registered function

    def __repr__(self) -> str:
        return f"<estimator {self.info.name!r} ({self.info.module})>"

    def accepts(self, option: str) -> bool:
        """Whether the estimator takes the keyword ``option``."""
        return option in self.options

    def check_option(self, option: str, value: Any) -> Any:
        """``value`` for the keyword ``option`` as the estimator takes it, or a ValueError naming
        both: the kind is read from the option's annotation (``int | None``, ``dict | None``) or,
        where it has none, from its default (``12`` an int, ``(25, 13, 14)`` a list of as many
        ints). None (null) passes where the annotation admits None or the default is None; an int
        passes for a float; a dict of field values builds an option whose default is a dataclass
        (``music``'s ``options``). For values
        typed on a command line, so that a wrong kind is refused before any work instead of
        failing inside the estimator."""
        name = self.info.name
        default = self.options[option]
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            if isinstance(value, dict):
                fields = {f.name for f in dataclasses.fields(default)}
                unknown = sorted(set(value) - fields)
                if unknown:
                    raise ValueError(f"{name}: option {option}: no field(s) {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}")
                try:
                    return dataclasses.replace(default, **value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{name}: option {option} = {value!r}: {exc}") from None
            raise ValueError(f"{name}: option {option} = {value!r}: expected an object of its fields, e.g. {{\"beta\": 0.5}}")
        kinds, nullable = _option_kinds(self.fn, option, default)
        if value is None:
            if nullable:
                return None
            raise ValueError(f"{name}: option {option} = null: it takes no null (default {default!r})")
        if not kinds:  # a class of its own (a tensor, estimates, MLOptions) or nothing to read a kind from
            if isinstance(value, (dict, list)):
                raise ValueError(f"{name}: option {option} takes a Python object, not {value!r}"
                                 + ("; set its fields as options of their own" if isinstance(value, dict) else ""))
            return value
        ok = (
            (bool in kinds and isinstance(value, bool))
            or (int in kinds and isinstance(value, int) and not isinstance(value, bool))
            or (float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (str in kinds and isinstance(value, str))
            or (dict in kinds and isinstance(value, dict))
            or (tuple in kinds and isinstance(value, (list, tuple)) and _like(value, default))
        )
        if not ok:
            want = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a text", dict: "an object",
                                tuple: _list_kind(default)}[k] for k in kinds)
            raise ValueError(f"{name}: option {option} = {value!r}: expected {want}")
        return tuple(value) if isinstance(value, list) else value

    def __call__(self, scenes: Scenes, *, K: int | Tensor | None = None, batch: int | None = None,
                 progress: bool = False, device=None, **options) -> Estimates:
        """Estimates of all ``scenes``: batches of ``batch`` scenes through :attr:`fn`, concatenated.

        ``K``: known source counts (int or ``[S]``); ``device``: where to run (default: the
        scenes' device; the estimates come back on it). Other keywords go to the estimator.

        Off CUDA an estimator whose :attr:`EstimatorInfo.inference_mode` is set (the package's
        own) runs in inference mode (``torch.inference_mode``), which skips autograd's bookkeeping
        on every operation: one scene through ``learned``, ``ml`` or ``music`` on a 2-core CPU
        takes 6-22 % less time than under ``torch.no_grad``. The estimates come back as ordinary
        tensors (copied out of inference mode), and the module caches are filled outside it
        (:func:`risloc.cuda_graphs.cache_entry`), so autograd can use both afterwards. On CUDA it
        is off: small batches there replay CUDA graphs, which are captured outside inference mode.
        On CUDA torch's batched factorisations and solves go through cuSOLVER and cuBLAS during the
        call, not MAGMA (:func:`risloc._devices.cuda_factorisations`: the same answers, faster).
        """
        info = self.info
        device = torch.device(device) if device is not None else scenes.device
        batch = info.batch_for(device) if batch is None else int(batch)
        if batch < 1:
            raise ValueError(f"{info.name}: batch = {batch}: must be >= 1")
        unknown = [k for k in options if k not in self.options and not self._takes_var_keywords()]
        if unknown:
            raise ValueError(f"{info.name}: unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        S = len(scenes)
        if S:
            check_finite(scenes, info.name)
        Ks = None
        if K is not None:
            if not info.accepts_k:
                raise ValueError(f"{info.name}: this estimator does not accept a known K")
            Ks = known_k(K, S, scenes.scenario.k_max, device=device)
        starts = range(0, S, batch)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=info.name, unit="batch")
        parts = []
        with torch.inference_mode(info.inference_mode and uses_inference_mode(device)), cuda_factorisations(device):
            for a in starts:
                b = min(a + batch, S)
                sub = scenes[a:b].to(device)
                opts = {k: (_slice(v, a, b) if k in info.per_scene else v) for k, v in options.items()}
                if Ks is not None:
                    opts[info.k_option] = Ks[a:b]
                est = self.fn(sub, **opts)
                if len(est) != b - a:
                    raise RuntimeError(f"{info.name}: returned {len(est)} estimates for a batch of {b - a} scenes")
                if Ks is not None:
                    bad = est.K.to(device=Ks.device, dtype=torch.int64) != Ks[a:b]
                    if bool(bad.any()):
                        i = int(torch.nonzero(bad)[0])
                        raise RuntimeError(f"{info.name}: given K = {int(Ks[a + i])} for scene {a + i}, "
                                           f"it returned K_hat = {int(est.K[i])}")
                parts.append(est)
        if not parts:  # an empty batch is answered here, so no estimator needs a case for it
            return Estimates.empty(0, scenes.scenario.k_max, method=info.name, device=scenes.device)
        out = Estimates.cat(parts) if len(parts) > 1 else parts[0]
        out = out.to(scenes.device, copy=out.K.is_inference())  # made in inference mode: copied into ordinary tensors
        out.method = parts[0].method or info.name
        return out

    def _takes_var_keywords(self) -> bool:
        try:
            return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            return True


def uses_inference_mode(device: torch.device) -> bool:
    """Whether the registry runs an estimator that allows it (:attr:`EstimatorInfo.inference_mode`)
    in inference mode on ``device``: everywhere but on CUDA, where small batches replay CUDA
    graphs, which are captured outside it (:meth:`Estimator.__call__`)."""
    return device.type != "cuda"


def register(name: str, **meta) -> Callable[[BatchEstimator], BatchEstimator]:
    """Decorator: make the batch function ``fn`` available as ``get(name)``.

    The metadata of the package's own names is in this module's table; another name takes
    ``EstimatorInfo`` fields as keywords (``batch=``, ``k_option=``, ...)."""

    def deco(fn: BatchEstimator) -> BatchEstimator:
        base = _INFO.get(name) or EstimatorInfo(name, getattr(fn, "__module__", ""))
        info_ = dataclasses.replace(base, **meta) if meta else base
        _INFO[name] = info_
        _REGISTRY[name] = Estimator(info_, fn)
        return fn

    return deco


def get(name: str) -> Estimator:
    """The estimator registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _REGISTRY and name in _INFO:
        module = _INFO[name].module
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available()}")
    return _REGISTRY[name]


def info(name: str) -> EstimatorInfo:
    """The metadata of ``name`` without importing its module (ValueError for an unknown name)."""
    if name not in _INFO:
        raise ValueError(f"unknown method {name!r}; available: {available()}")
    return _INFO[name]


def available() -> list[str]:
    """Names of the estimators present in this installation."""
    names = [n for n, i in _INFO.items() if n in _REGISTRY or importlib.util.find_spec(i.module) is not None]
    return names + sorted(set(_REGISTRY) - set(names))


def locate(scenes: Scenes, method: str = "learned", *, K: int | Tensor | None = None, batch: int | None = None,
           progress: bool = False, device=None, **options) -> Estimates:
    """Run the estimator ``method`` on ``scenes`` (see :meth:`Estimator.__call__`)."""
    return get(method)(scenes, K=K, batch=batch, progress=progress, device=device, **options)
