"""The project's seeds, in one place, so that defaults are chosen on one set of scenes and
reported on another that nothing was tuned on.

Every seed names a scene stream of :func:`risloc.simulate` (``SeedSequence([seed, block])``
per block of 1024 scenes), so distinct seeds never share a scene.

* :data:`TRAINING_SEED` (0) and :data:`TRAINING_VALIDATION_SEED` (1 000 003): the training
  stream and the validation stream the trainer selects checkpoints and calibrates on
  (``risloc.nn.config.TrainConfig.seed`` / ``val_seed``; a test checks they agree).
* :data:`VALIDATION_SEEDS`: scenes for choosing defaults (thresholds, refinement steps, option
  values) by hand or by sweeps, e.g. ``risloc bench --seed 1000``; 1000 is the default of the
  diagnosis and tuning scripts in ``benchmarks/``. 2026 was ``risloc bench``'s earlier default
  and the stream on which the defaults of ``learned+ml`` were chosen.
* :data:`HELD_OUT_SEED`: the stream ``risloc bench`` reports on by default. Nothing is tuned
  on it: a number measured on it is an honest estimate of what a user gets.
"""

from __future__ import annotations

TRAINING_SEED = 0
"""Seed of the training scene stream (``TrainConfig.seed``)."""

TRAINING_VALIDATION_SEED = 1_000_003
"""Seed of the trainer's validation stream (``TrainConfig.val_seed``): checkpoint selection, calibration."""

VALIDATION_SEEDS = (1000, 2026)
"""Seeds on which defaults are chosen (sweeps, thresholds, options)."""

HELD_OUT_SEED = 7_000_003
"""Seed of the held-out scenes that results are reported on (``risloc bench``'s default)."""

__all__ = ["TRAINING_SEED", "TRAINING_VALIDATION_SEED", "VALIDATION_SEEDS", "HELD_OUT_SEED", "role"]


def role(seed: int) -> str:
    """What a seed is for: 'held-out', 'validation', 'training', 'training validation' or 'other'."""
    if seed == HELD_OUT_SEED:
        return "held-out"
    if seed in VALIDATION_SEEDS:
        return "validation"
    if seed == TRAINING_SEED:
        return "training"
    if seed == TRAINING_VALIDATION_SEED:
        return "training validation"
    return "other"
