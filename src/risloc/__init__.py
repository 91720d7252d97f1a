"""risloc: near-field multi-source localisation through a reconfigurable intelligent surface.

>>> import risloc
>>> scenes = risloc.simulate(risloc.Scenario(), 100, seed=0)
"""

from .scenario import Scenario
from .scenes import Estimates, Scenes, Truth
from .simulate import simulate, simulate_chunks, source_covariance, source_factor

__version__ = "0.1.0"

__all__ = [
    "Scenario",
    "Scenes",
    "Truth",
    "Estimates",
    "simulate",
    "simulate_chunks",
    "source_covariance",
    "source_factor",
    "__version__",
]
