"""The SubspaceNet-style peer: MUSIC null-spectrum loss, gradients, trainer hook, estimator, default kind."""


import pytest
import torch

import risloc
from risloc.estimators import get
from risloc.nn.checkpoint import file_sha256, load_checkpoint
from risloc.nn.config import ModelConfig, TrainConfig, apply_overrides
from risloc.nn.loss import music_null_loss
from risloc.nn.model import RisCovarianceNet, build_model, effective, prepare_inputs
from risloc.nn.subspacenet import SubspaceNet
from risloc.nn.train import train
from risloc.scenario import Scenario
from risloc.simulate import simulate, source_factor


@pytest.fixture(scope="module")
def batch():
    sc = Scenario()
    s = simulate(sc, 8, seed=11)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-2)
    return sc, s, inputs


def test_music_null_loss_is_zero_at_the_truth_and_larger_when_perturbed(batch):
    sc, s, inputs = batch
    opts = TrainConfig().covariance_options(0.0)
    F = source_factor(s.truth, sc)
    exact = music_null_loss(effective(F, inputs, opts), s.truth, sc)
    assert exact.shape == (8,) and float(exact.max()) < 1e-9
    g = torch.Generator().manual_seed(0)
    noise = torch.complex(torch.randn(F.shape, generator=g), torch.randn(F.shape, generator=g)) * F.abs().mean()
    worse = music_null_loss(effective(F + 0.3 * noise, inputs, opts), s.truth, sc)
    assert bool((worse > 1e-3).all()) and bool((worse <= 1).all())
    # the sample covariance's principal subspace (what MUSIC uses) is far from the truth
    assert float(music_null_loss(effective(None, inputs, opts), s.truth, sc).mean()) > 0.3
    # with hard negatives: still ~0 at the truth, larger than without them for the perturbed one
    assert float(music_null_loss(effective(F, inputs, opts), s.truth, sc, negatives=4).max()) < 1e-4
    assert bool((music_null_loss(effective(F + 0.3 * noise, inputs, opts), s.truth, sc, negatives=4) > worse).all())


def test_subspacenet_gradients_are_finite(batch):
    sc, s, inputs = batch
    cfg = apply_overrides(TrainConfig(), {"model.kind": "subspacenet", "model.width": 8, "model.k_hidden": 8, "model.residual": False})
    torch.manual_seed(0)
    model = build_model(sc, cfg.model)
    assert isinstance(model, SubspaceNet)
    opts = cfg.covariance_options(0.0)
    pred = model(inputs, opts)
    assert pred.factor.shape == (8, sc.n_elements, sc.k_max) and pred.k_logits.shape == (8, sc.k_max)
    loss = music_null_loss(pred.covariance, s.truth, sc, negatives=4).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_default_kind_is_the_covariance_network():
    assert ModelConfig().kind == "covariance" and TrainConfig().loss.main == "cov"
    assert isinstance(build_model(Scenario(), ModelConfig(width=16, depth=1, heads=2, patch=4, k_hidden=16)), RisCovarianceNet)
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="nope")
    with pytest.raises(ValueError, match="main"):
        apply_overrides(TrainConfig(), {"loss.main": "nope"})


def test_two_step_training_then_estimator(tmp_path):
    cfg = TrainConfig.load("configs/subspacenet-cpu-quick.toml")
    cfg = apply_overrides(cfg, {
        "epochs": 1, "steps_per_epoch": 2, "batch": 8, "val_scenes": 16, "val_batch": 16, "warmup_steps": 1, "log_every": 1,
        "model.width": 8, "model.k_hidden": 8, "loss.k_start": 0.0, "calibrate": True,
    })
    lines = []
    train(cfg, tmp_path, log=lines.append)
    assert any("music=" in ln for ln in lines)
    ckpt = tmp_path / "best.pt"
    state = torch.load(ckpt, weights_only=True)  # loads without arbitrary pickles
    assert TrainConfig.from_toml(load_checkpoint(ckpt)["config"]).model.kind == "subspacenet" and state["format"]
    sc = Scenario()
    scenes = simulate(sc, 6, seed=2000003)
    inside = lambda e: torch.arange(sc.k_max).view(1, -1) < e.K.view(-1, 1)
    for rule in ("head", "mdl"):
        est = get("subspacenet")(scenes, checkpoint=ckpt, k_rule=rule)
        assert est.method == "subspacenet:" + file_sha256(ckpt)[:12]  # names the weights it used
        assert bool(((est.K >= 0) & (est.K <= sc.k_max)).all())
        for t in (est.phi, est.theta, est.r):
            assert torch.isfinite(t[inside(est)]).all() and torch.isnan(t[~inside(est)]).all()
    import risloc.nn.subspacenet as peer

    packaged = get("subspacenet")(scenes)  # the packaged weights
    assert packaged.method == "subspacenet:" + file_sha256(peer.DEFAULT_WEIGHTS)[:12]
    real = peer.DEFAULT_WEIGHTS
    peer.DEFAULT_WEIGHTS = tmp_path / "no-such-file.pt"  # as if the package shipped none
    try:
        with pytest.raises(ValueError, match="checkpoint"):
            get("subspacenet")(scenes)
    finally:
        peer.DEFAULT_WEIGHTS = real
