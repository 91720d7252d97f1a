"""Former home of the network inputs and the ``covariance`` network; kept so that existing imports
keep working. New code imports :mod:`risloc.nn.inputs` (inputs, prediction, effective covariance)
and :mod:`risloc.nn.networks` (the kinds)."""

from .inputs import ModelInputs, Prediction, effective, prepare_inputs, principal_factor  # noqa: F401
from .networks import build_model  # noqa: F401
