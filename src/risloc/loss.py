"""The learned pipeline's loss, under the name of the design note (home: :mod:`risloc.nn.loss`)."""

from .nn.loss import (  # noqa: F401
    Objective,
    covariance_nmse,
    eigengap_loss,
    format_selftest,
    frobenius_sq_diff,
    orthogonality_loss,
    peak_contrast_loss,
    ramp,
    raw_nmse,
    selftest,
    subspace_loss,
)
