"""The learned pipeline (docs/learned.md): network, loss, trainer, calibration, inference.

>>> from risloc.nn.config import TrainConfig                      # doctest: +SKIP
>>> from risloc.nn.train import train                             # doctest: +SKIP
>>> train(TrainConfig.load("configs/cpu-quick.toml"), "runs/quick")  # doctest: +SKIP
>>> risloc.estimators.locate(scenes, "learned", checkpoint="runs/quick/best.pt")  # doctest: +SKIP
"""

from .config import LossConfig, ModelConfig, TrainConfig

__all__ = ["TrainConfig", "ModelConfig", "LossConfig"]
