"""The ``subspacenet`` estimator: the SubspaceNet-style peer of ``learned`` (network:
:mod:`risloc.nn.networks.subspacenet`; docs/learned-peer.md). Surrogate E(Z) -> MUSIC with the
calibrated K head, an order rule, or a given K.
"""

from __future__ import annotations

from pathlib import Path

from ..estimators import register
from ..scenes import Estimates, Scenes

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "subspacenet.pt"
"""The packaged weights of the peer (trained on the default model's budget, docs/learned-peer.md)."""


# ----------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------
@register("subspacenet")
def estimate(
    scenes: Scenes,
    *,
    checkpoint: str | Path | None = None,
    K=None,
    beta: float | None = None,
    use_snr: bool = True,
    k_rule: str = "head",
    music_options: dict | None = None,
) -> Estimates:
    """The SubspaceNet-style peer: surrogate E(Z) -> MUSIC.

    ``checkpoint``: a file written by ``risloc train`` with ``model.kind = "subspacenet"``;
    ``None`` uses the packaged ``src/risloc/weights/subspacenet.pt`` (docs/learned-peer.md).
    ``K``: the number of sources when it is known (an int or a per-scene ``[S]`` tensor, each in
    1..K_max); every scene then gets exactly that K and ``k_rule`` is not used. ``k_rule``: 'head'
    (the calibrated K head, as in validation) or an order rule ('mdl', 'aic', 'eigengap') on
    E(Z)'s eigenvalues (:func:`risloc.estimators.music.order_from_covariance`). ``beta``
    overrides the checkpoint's blend weight; ``use_snr=False`` ignores the SNR labels. One batch,
    on the scenes' device (the registry, ``risloc.locate(scenes, "subspacenet", batch=...)``, runs
    large scene sets in batches of 1024). Returns Estimates with
    ``method = "subspacenet:<first 12 hex of the checkpoint's SHA-256>"``.
    """
    from .inference import known_k, packaged_or_given, prepare_checkpoint, run_model

    checkpoint = packaged_or_given("subspacenet", checkpoint, DEFAULT_WEIGHTS,
                                   "train one with `risloc train --config configs/subspacenet-cpu-quick.toml`")
    if k_rule not in ("head", "mdl", "aic", "eigengap"):
        raise ValueError(f"subspacenet: k_rule = {k_rule!r}: must be 'head', 'mdl', 'aic' or 'eigengap'")
    K = known_k("subspacenet", K, scenes)
    loaded, options, music = prepare_checkpoint("subspacenet", "subspacenet", checkpoint, scenes, beta, music_options)
    est, _ = run_model(loaded.model, scenes, options=options, calibration=loaded.calibration, music_options=music,
                       use_snr=use_snr, K=K, order_rule=None if k_rule == "head" else k_rule)
    est.method = f"subspacenet:{loaded.sha256[:12]}"
    return est
