"""Test-session settings.

Tests are correctness checks on small batches: one intra-op thread is both faster and
steadier for them on a 2-core machine (with two threads a LAPACK eigendecomposition of
the 144 x 144 test covariances took ~17 s instead of 0.02 s on the CI-sized VM).

The ``numerical`` marker (registered in pyproject.toml) goes on every test of the files that
compare numbers across code paths (a gain, a batch split, a device, the CPU's kernels): the
physics, the CRB, the covariances, the estimators and their contract, and the rounding checks.
``.ci/run`` runs ``pytest -m numerical`` once more with ``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` (other kernels, other summation
orders than AVX-512, for PyTorch's own kernels, MKL's matrix products and oneDNN's convolutions
and atom norms), so a tolerance that only holds for one CPU's rounding fails in CI.
"""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

NUMERICAL_FILES = frozenset({
    "test_physics.py", "test_grids.py", "test_crb.py", "test_covariance.py", "test_music.py", "test_ml.py",
    "test_registry.py", "test_estimators_contract.py", "test_estimator_contract.py", "test_rounding.py",
})
"""Test files whose tests carry the ``numerical`` marker."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in NUMERICAL_FILES:
            item.add_marker(pytest.mark.numerical)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, restored afterwards (a test elsewhere may have
    changed the count): faster on the shared 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
