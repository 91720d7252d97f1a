"""learned+ml: the learned estimate refined by ml's likelihood, with the learned K-hat kept."""

import torch

import risloc
from risloc.estimators import get
from risloc.nn.config import TrainConfig, apply_overrides
from risloc.nn.train import train


def test_learned_ml_is_ml_started_from_learned(tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        {
            "device": "cpu", "amp": "none", "threads": 1, "epochs": 1, "steps_per_epoch": 2, "batch": 8, "train_scenes": 16,
            "val_scenes": 8, "val_batch": 8, "val_locate": False, "calibrate": False, "val_primary": "loss",
            "model.width": 16, "model.depth": 1, "model.heads": 2, "model.patch": 4, "model.k_hidden": 16,
        },
    )
    train(cfg, tmp_path / "run", log=lambda s: None)
    ckpt = tmp_path / "run" / "best.pt"
    scenes = risloc.simulate(risloc.Scenario(), 4, seed=5)
    music = {"refine_iterations": 2}
    first = get("learned")(scenes, checkpoint=ckpt, music_options=music)
    both = get("learned+ml")(scenes, checkpoint=ckpt, music_options=music, ml_options={"iterations": 3})
    again = get("ml")(scenes, init=first, iterations=3, init_prune=1)
    assert both.method.startswith("learned+ml:") and both.method[len("learned+ml:"):] == first.method[len("learned:"):]
    assert torch.equal(both.K, again.K) and bool(((both.K == first.K) | (both.K == first.K - 1)).all())  # at most one pruned
    kept = get("learned+ml")(scenes, checkpoint=ckpt, music_options=music, ml_options={"iterations": 3, "init_prune": 0})
    assert torch.equal(kept.K, first.K)
    for name in ("phi", "theta", "r"):
        assert torch.allclose(getattr(both, name), getattr(again, name), equal_nan=True)
        got = getattr(both, name)
        for s in range(4):
            assert torch.isfinite(got[s, : int(both.K[s])]).all()
    assert "learned+ml" in risloc.estimators.available()


def test_learned_refuses_a_checkpoint_of_another_kind(tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        {
            "device": "cpu", "amp": "none", "threads": 1, "epochs": 1, "steps_per_epoch": 1, "batch": 4, "train_scenes": 8,
            "val_scenes": 4, "val_batch": 4, "val_locate": False, "calibrate": False, "val_primary": "loss",
            "model.kind": "subspacenet", "model.width": 8, "model.k_hidden": 8, "loss.main": "music",
        },
    )
    train(cfg, tmp_path / "run", log=lambda s: None)
    scenes = risloc.simulate(risloc.Scenario(), 2, seed=5)
    import pytest

    with pytest.raises(ValueError, match="model.kind = 'subspacenet'"):
        get("learned")(scenes, checkpoint=tmp_path / "run" / "best.pt")


def test_grow_init_adds_the_next_detection():
    from risloc.nn.inference import grow_init

    nan = float("nan")
    first = risloc.Estimates(torch.tensor([1, 3, 0]), torch.tensor([[0.1, nan, nan], [0.1, 0.2, 0.3], [nan, nan, nan]]),
                             torch.tensor([[0.0, nan, nan], [0.0, 0.0, 0.0], [nan, nan, nan]]),
                             torch.tensor([[1.0, nan, nan], [1.0, 2.0, 3.0], [nan, nan, nan]]))
    cand = risloc.Estimates(torch.tensor([3, 3, 3]), torch.tensor([[0.11, 0.5, 0.6], [0.1, 0.2, 0.3], [0.7, 0.8, 0.9]]),
                            torch.full((3, 3), 0.05), torch.full((3, 3), 4.0))
    g = grow_init(first, cand)
    assert g.K.tolist() == [2, 3, 1]  # the full scene (K-hat = K_max) is unchanged
    assert torch.equal(g.phi[0, :2], torch.tensor([0.1, 0.5])) and g.theta[0, 1] == cand.theta[0, 1] and g.r[0, 1] == 4.0
    assert torch.equal(g.phi[1], first.phi[1])
    assert g.phi[2, 0] == cand.phi[2, 0] and torch.isnan(g.phi[2, 1:]).all()
