"""Test-session settings.

Tests are correctness checks on small batches: one intra-op thread is both faster and
steadier for them on a 2-core machine (with two threads a LAPACK eigendecomposition of
the 144 x 144 test covariances took ~17 s instead of 0.02 s on the CI-sized VM).
"""

import torch

torch.set_num_threads(1)
