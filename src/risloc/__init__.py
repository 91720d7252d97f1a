"""risloc: near-field multi-source localisation through a reconfigurable intelligent surface.

A first session::

    import risloc

    sc = risloc.Scenario()                           # every number of docs/model.md
    scenes = risloc.simulate(sc, 2_000, seed=0)       # device="cuda" on a GPU
    est = risloc.locate(scenes, method="ml")          # or "music", "mvdr", "ramezani", "learned"
    print(risloc.evaluate(scenes, est))               # the scoring tables of docs/metrics.md
    risloc.save(scenes, "scenes.h5"); scenes = risloc.load("scenes.h5")

Heavier modules (estimators, metrics, files) are imported on first use.
"""

from .scenario import Scenario
from .scenes import Estimates, Scenes, Truth
from .simulate import simulate, simulate_chunks, source_covariance, source_factor

__version__ = "0.1.0"


def locate(scenes: Scenes, method: str = "learned", *, K=None, batch: int | None = None, progress: bool = False,
           device=None, **options) -> Estimates:
    """Run the estimator registered as ``method`` (see :func:`risloc.estimators.available`; default
    ``learned``, the packaged network and a short likelihood stage) in batches of ``batch`` scenes
    (default: the estimator's own). ``K``: known source counts (an
    int or a per-scene integer tensor) for estimators that accept them; the answer then has
    exactly K sources per scene. Other keywords are the estimator's options."""
    from .estimators import locate as _locate

    return _locate(scenes, method, K=K, batch=batch, progress=progress, device=device, **options)


def evaluate(scenes: Scenes, est: Estimates, *, crb=None):
    """Score estimates against the scenes' truth (:func:`risloc.metrics.score`); ``print`` it for tables."""
    from .metrics import score

    return score(scenes, est, crb=crb)


def save(scenes: Scenes, path) -> None:
    """Write scenes to an HDF5 scene file (atomic; :func:`risloc.io.save_scenes`)."""
    from .io import save_scenes

    save_scenes(scenes, path)


def load(path, start: int = 0, stop: int | None = None, *, device="cpu") -> Scenes:
    """Read (and validate) scenes ``[start, stop)`` of a scene file (:func:`risloc.io.load_scenes`)."""
    from .io import load_scenes

    return load_scenes(path, start, stop, device=device)


__all__ = [
    "Scenario",
    "Scenes",
    "Truth",
    "Estimates",
    "simulate",
    "simulate_chunks",
    "source_covariance",
    "source_factor",
    "locate",
    "evaluate",
    "save",
    "load",
    "__version__",
]
