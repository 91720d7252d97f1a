"""Estimators by name: ``get("music")(scenes, **options) -> Estimates``.

Every estimator is a callable ``estimate(scenes: Scenes, **options) -> Estimates`` that is
batched over scenes, runs on the scenes' device, and returns K-hat and NaN-padded
(phi, theta, r) in radians and metres. Modules register themselves with
:func:`register`; :func:`get` imports the module that owns a name on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable, Protocol

from ..scenes import Estimates, Scenes


class Estimator(Protocol):
    def __call__(self, scenes: Scenes, **options) -> Estimates: ...


# name -> module that registers it (imported lazily, so optional pieces cost nothing).
_MODULES = {
    "music": "risloc.estimators.music",
    "mvdr": "risloc.estimators.mvdr",
    "ramezani": "risloc.estimators.ramezani",
    "ml": "risloc.estimators.ml",
    "sbl": "risloc.estimators.sbl",
    "learned": "risloc.nn.inference",
    "learned+ml": "risloc.nn.inference",
    "subspacenet": "risloc.nn.subspacenet",
}
_REGISTRY: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make ``fn`` available as ``get(name)``.

    The registered callable answers an empty batch (0 scenes) itself, with 0 rows on the
    scenes' device, so that no estimator needs a case for it."""

    def deco(fn: Estimator) -> Estimator:
        @functools.wraps(fn)
        def estimate(scenes: Scenes, **options) -> Estimates:
            if len(scenes) == 0:
                return Estimates.empty(0, scenes.scenario.k_max, method=name, device=scenes.y.device)
            return fn(scenes, **options)

        _REGISTRY[name] = estimate
        return fn

    return deco


def get(name: str) -> Estimator:
    """The estimator registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _REGISTRY and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as exc:
            if exc.name != _MODULES[name]:
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available()}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the estimators present in this installation."""
    names = []
    for name, module in _MODULES.items():
        if name in _REGISTRY or importlib.util.find_spec(module) is not None:
            names.append(name)
    return names + sorted(set(_REGISTRY) - set(names))


def locate(scenes: Scenes, method: str = "music", **options) -> Estimates:
    """Run the estimator ``method`` on ``scenes``."""
    return get(method)(scenes, **options)
