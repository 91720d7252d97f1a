"""``ml-robust``: ``ml`` with its model-error option ``mismatch="auto"`` (docs/estimators-ml.md,
"Model error").

The receiver's channel and codes may be wrong (CSI error, RIS phase noise): ``ml``'s stochastic
likelihood then gains a signal-dependent floor, C_l = B_l P B_l^H + sigma^2 I + F_l, with F_l the
error covariance given the fitted signals (white e~ q_l I for CSI error, coloured
e~ H diag(omega_l) H^H for phase noise), its level chosen per scene from the data; the orders of
the search path are re-scored and K-hat selected under it. Where no floor gains more than
``mismatch_penalty`` nats (scenes without model error) the answer is plain ``ml``'s, exactly.
Every ``ml`` option applies (``mismatch`` too: ``mismatch="none"`` is ``ml``).
"""

from __future__ import annotations

import inspect

from ..scenes import Estimates, Scenes
from . import ml, register

DEFAULTS = {**ml.DEFAULTS, "mismatch": "auto"}
"""``ml``'s option defaults with ``mismatch="auto"``."""
OPTION_TYPES = ml.OPTION_TYPES
"""``ml``'s option annotations."""


def _signature() -> inspect.Signature:
    """``ml.estimate``'s signature with the keyword ``mismatch="auto"`` before its ``**overrides``
    (so the registry sees every keyword of ``ml``, the known ``K`` among them)."""
    params = list(inspect.signature(ml.estimate).parameters.values())
    mismatch = inspect.Parameter("mismatch", inspect.Parameter.KEYWORD_ONLY, default="auto")
    return inspect.signature(ml.estimate).replace(parameters=params[:-1] + [mismatch, params[-1]])


def estimate(scenes: Scenes, *, mismatch: str | float = "auto", **options) -> Estimates:
    """:func:`risloc.estimators.ml.estimate` with ``mismatch="auto"`` by default (module docstring);
    the same arguments, options and output (``method`` "ml-robust")."""
    est = ml.estimate(scenes, mismatch=mismatch, **options)
    est.method = "ml-robust" + est.method[len("ml"):]
    return est


estimate.__signature__ = _signature()
estimate = register("ml-robust")(estimate)
