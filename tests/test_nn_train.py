"""The trainer: gradient gate, resume == uninterrupted, calibration, safe checkpoints, config (the overfit probe: tests/test_overfit.py)."""

import json
import math
import pickle

import pytest
import torch

import risloc
from risloc.nn import calibrate
from risloc.nn.checkpoint import FORMAT, VERSION, file_sha256, load_checkpoint, save_checkpoint
from risloc.nn.config import TrainConfig, apply_overrides
from risloc.nn.train import gated_step, train


COVARIANCE_KIND = {
    "model.kind": "covariance", "model.pursuit": 0, "model.channels_last": False, "loss.main": "cov", "loss.beta": 0.25,
    "loss.k_weight": 0.1, "loss.gap_weight": 0.05, "loss.sub_weight": 0.05, "loss.peak_weight": 0.05, "loss.balance": True,
    "min_lr": 1e-5,
}
"""The ``covariance`` network with the curriculum its configs use (the code defaults are the shipped spectrum model's)."""


def tiny_config(**changes) -> TrainConfig:
    """A run of seconds of the ``covariance`` kind: 64-scene pool, 16-wide single-layer network, 4 x 4 element patches."""
    base = {**COVARIANCE_KIND,
        "device": "cpu", "amp": "none", "threads": 1, "epochs": 3, "steps_per_epoch": 3, "batch": 8, "train_scenes": 64,
        "val_scenes": 16, "val_batch": 16, "val_locate": False, "calibrate": False, "lr": 1e-3, "warmup_steps": 2,
        "ema": 0.9, "log_every": 2, "val_primary": "loss",
        "model.width": 16, "model.depth": 1, "model.heads": 2, "model.patch": 4, "model.k_hidden": 16,
        "loss.beta_start": 1.0, "loss.k_start": 1.0, "loss.gap_start": 1.5, "loss.sub_start": 2.0, "loss.peak_start": 2.0,
        "loss.snr_drop": 0.25, "loss.snr_noise_db": 1.0,
    }
    base.update(changes)
    return apply_overrides(TrainConfig(), base)


def test_nonfinite_gradient_is_skipped_on_the_device():
    """The gate decides on the device (fused AdamW found_inf): no parameter, moment or step-count change."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    finite, norm = gated_step([p], opt, grad_clip=1.0)
    assert torch.is_tensor(finite) and not bool(finite) and not math.isfinite(float(norm))
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    st = opt.state[p]
    assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    p.grad = torch.tensor([10.0, 0.0, 0.0])
    finite, norm = gated_step([p], opt, grad_clip=1.0)
    assert bool(finite) and float(opt.state[p]["step"]) == 1 and float(norm) == pytest.approx(10.0)
    assert p[0] < 1.0
    # clipped: Adam's first moment holds (1 - beta1) x the clipped gradient (norm 1, not 10)
    assert float(opt.state[p]["exp_avg"][0]) == pytest.approx(0.1 * 1.0, rel=1e-4)
    # the EMA does not move on a skipped step
    from risloc.nn.train import ema_update

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [q.detach().clone() for q in a.parameters()]
    ema_update(a, b, 0.9, 5, torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(before, a.parameters()))
    ema_update(a, b, 0.9, 5, torch.tensor(True))
    assert not all(torch.equal(x, y) for x, y in zip(before, a.parameters()))


def _state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not _state_equal(x, y):
                return False
        elif torch.is_tensor(x):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, list):
            if len(x) != len(y) or any(not (_state_equal({0: u}, {0: v})) for u, v in zip(x, y)):
                return False
        elif x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config()
    quiet = lambda s: None  # noqa: E731
    train(cfg, tmp_path / "full", log=quiet)
    train(cfg, tmp_path / "cut", log=quiet, stop_after_epoch=0)  # "killed" after epoch 0
    train(cfg, tmp_path / "cut", log=quiet, resume=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for key in ("model", "ema", "objective", "optimizer", "scheduler", "progress", "metrics"):
        assert _state_equal(a[key], b[key]), key
    la = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lb] == [0, 1, 2]
    assert [x["val_nmse"] for x in la] == [x["val_nmse"] for x in lb]


def test_calibration_lowers_nll_on_held_out_data():
    g = torch.Generator().manual_seed(0)
    n, k = 4000, 5
    K = torch.randint(1, k + 1, (n,), generator=g)
    # an over-confident head: right 60 % of the time, logits scaled far too high
    guess = torch.where(torch.rand(n, generator=g) < 0.6, K, torch.randint(1, k + 1, (n,), generator=g))
    logits = 8.0 * torch.nn.functional.one_hot(guess - 1, k).float() + torch.randn(n, k, generator=g)
    fit, held = slice(0, n // 2), slice(n // 2, n)
    T = calibrate.fit_temperature(logits[fit], K[fit])
    assert T > 1.5
    assert calibrate.nll(logits[held], K[held], T) < calibrate.nll(logits[held], K[held], 1.0) - 0.5
    # the fall-back threshold only helps: perfect fall-back K -> some threshold > 0
    tau = calibrate.tune_threshold(logits[fit], K[fit], T, K[fit])
    assert tau > 0
    Kh, _ = calibrate.decide_k(logits[held], T, tau, K[held])
    assert (Kh == K[held]).float().mean() > ((logits[held].argmax(-1) + 1) == K[held]).float().mean()


class _Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "payload": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="refused to load"):
        load_checkpoint(path)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"format": FORMAT, "version": VERSION, "x": torch.ones(2), "cfg": "a = 1", "n": [1, 2.5]})
    assert load_checkpoint(good)["n"] == [1, 2.5]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_config_toml_round_trip_and_flags():
    cfg = tiny_config(**{"model.width": 24, "loss.k_weight": 0.3, "scenario.k_max": 3, "betas": "0.8,0.95"})
    back = TrainConfig.from_toml(cfg.to_toml())
    assert back == cfg and back.scenario.k_max == 3 and back.betas == (0.8, 0.95)
    from risloc.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--lr", "0.01", "--model.width", "8", "--set", "loss.beta=0.2"])
    from risloc.nn.config import config_from_args

    got = config_from_args(args)
    assert got.lr == 0.01 and got.model.width == 8 and got.loss.beta == 0.2
    with pytest.raises(ValueError, match="unknown option"):
        apply_overrides(cfg, {"model.nope": 1})


def test_learned_estimator_and_missing_default(tmp_path):
    from risloc.estimators import get

    cfg = tiny_config(epochs=1, steps_per_epoch=2)
    train(cfg, tmp_path / "run", log=lambda s: None)
    sc = risloc.Scenario()
    scenes = risloc.simulate(sc, 6, seed=3)
    ckpt = tmp_path / "run" / "best.pt"
    opts = {"checkpoint": ckpt, "music_options": {"refine_iterations": 2}}
    est = get("learned")(scenes, **opts)
    assert est.method == "learned:" + file_sha256(ckpt)[:12]  # names the weights it used
    assert est.K.shape == (6,) and ((est.K >= 0) & (est.K <= sc.k_max)).all()
    inside = torch.arange(sc.k_max).view(1, -1) < est.K.view(-1, 1)
    for t in (est.phi, est.theta, est.r):
        assert torch.isfinite(t[inside]).all() and torch.isnan(t[~inside]).all()
    again = get("learned")(scenes, **opts)  # deterministic
    assert torch.equal(again.K, est.K) and torch.allclose(again.phi, est.phi, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="search = 'network' needs a network with candidates"):  # a covariance network has none
        get("learned")(scenes, search="network", **opts)
    # use_snr=False is "the scenes carry no SNR label": the same computation on the same numbers. Compared at
    # 1e-4 (rad, m), far below any hit window, not bit for bit: once, in a whole-suite run with the AVX2
    # kernels on an AMD CPU, the two calls differed in the last digits (not reproduced in isolation; MKL's
    # kernels may round differently with the alignment of their buffers)
    no_snr = get("learned")(scenes, use_snr=False, **opts)
    unlabelled = risloc.Scenes(scenes.y, scenes.H, scenes.codes, sc)
    blind = get("learned")(unlabelled, **opts)
    assert torch.equal(no_snr.K, blind.K)
    for q in ("phi", "theta", "r"):
        torch.testing.assert_close(getattr(no_snr, q), getattr(blind, q), rtol=0, atol=1e-4, equal_nan=True,
                                   msg=lambda m, q=q: f"use_snr=False against unlabelled scenes, {q}: {m}")
    import risloc.nn.inference as inference

    real = inference.DEFAULT_WEIGHTS
    inference.DEFAULT_WEIGHTS = tmp_path / "no-such-file.pt"  # as if the package shipped no weights
    try:
        with pytest.raises(ValueError, match="--checkpoint"):
            get("learned")(scenes)
    finally:
        inference.DEFAULT_WEIGHTS = real


def test_init_starts_from_a_checkpoints_weights(tmp_path):
    """``init`` (fine-tuning): the run starts from the checkpoint's EMA weights (at lr = 0 they
    are its final weights); another [model] is refused naming the field."""
    quiet = lambda s: None  # noqa: E731
    train(tiny_config(epochs=1), tmp_path / "a", log=quiet)
    source = load_checkpoint(tmp_path / "a" / "last.pt")["ema"]
    fresh = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    assert not _state_equal(source, fresh)  # the EMA weights, not the raw ones, are what init takes
    lines = []
    train(tiny_config(epochs=1, lr=0.0, min_lr=0.0, weight_decay=0.0, init=str(tmp_path / "a" / "last.pt")),
          tmp_path / "b", log=lines.append)
    assert any(line.startswith("[INIT]") for line in lines)
    assert _state_equal(load_checkpoint(tmp_path / "b" / "last.pt")["model"], source)
    with pytest.raises(ValueError, match=r"TrainConfig.init .*\['width'\]"):
        train(tiny_config(epochs=1, init=str(tmp_path / "a" / "last.pt"), **{"model.width": 8}), tmp_path / "c", log=quiet)
    with pytest.raises(ValueError, match="TrainConfig.init.*neither a file nor a packaged model"):
        train(tiny_config(epochs=1, init="no-such-model"), tmp_path / "d", log=quiet)


def test_second_look_view_cancels_the_found_sources_and_keeps_the_rest():
    """TrainConfig.second_look: each second-look scene's cancel rows are steering vectors close to
    the true sources it no longer has as targets (strongest first, at most one spurious row after
    them, zeros after), its truth keeps the 0-2 sources left; fraction 0 changes nothing; the
    union over two ranks' slices is the single-process batch."""
    from risloc import physics
    from risloc.nn.inputs import prepare_inputs
    from risloc.nn.train import SECOND_LOOK_LEFT, second_look_view

    sc = risloc.Scenario()
    s = risloc.simulate(sc, 64, seed=21)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-3)
    gen = lambda: torch.Generator().manual_seed(5)
    same, truth0 = second_look_view(inputs, s.truth, sc, 0.0, gen())
    assert torch.equal(same.cancel, torch.zeros_like(same.cancel)) and torch.equal(truth0.K, s.truth.K)
    assert torch.equal(truth0.phi.nan_to_num(9.0), s.truth.phi.nan_to_num(9.0))
    view, rest = second_look_view(inputs, s.truth, sc, 1.0, gen())
    assert view.cancel.shape == (64, sc.k_max + 1, sc.n_elements)
    a_true = physics.steering(s.truth.phi.nan_to_num(0.0), s.truth.theta.nan_to_num(0.0), s.truth.r.nan_to_num(1.0), sc,
                              dtype=torch.complex64)  # [64, K, N]
    n_rows = (view.cancel.abs().sum(-1) > 0).sum(1)
    for b in range(64):
        K, left, n = int(s.truth.K[b]), int(rest.K[b]), int(n_rows[b])
        assert 0 <= left <= min(K, SECOND_LOOK_LEFT - 1)
        assert bool((view.cancel[b, n:] == 0).all())  # contiguous rows, then the front end's own picks
        assert K - left <= n <= K - left + 1  # the found sources, and at most one spurious
        kept = [k for k in range(K) if any(math.isclose(float(s.truth.phi[b, k]), float(p)) for p in rest.phi[b, :left])]
        assert len(kept) == left and bool(torch.isnan(rest.phi[b, left:]).all())
        found = [k for k in range(K) if k not in kept]
        if found:  # row j is close to the j-th strongest found source
            match = (view.cancel[b, : len(found)].conj() @ a_true[b, found].T).abs() / sc.n_elements  # [rows, found]
            assert bool((match.max(1).values > 0.5).all())
            order = [found[int(match[j].argmax())] for j in range(len(found))]
            assert sorted(order) == found
            p = s.truth.power[b, order]
            assert bool((p[:-1] >= p[1:]).all())
    # two ranks, each its half of the same global batch: the single-process rows
    half = lambda a, b: prepare_inputs(s.y[a:b], s.H[a:b], s.codes[a:b], s.snr_db[a:b], regularisation=1e-3)
    lo = second_look_view(half(0, 32), s.truth[:32], sc, 1.0, gen(), start=0, total=64)
    hi = second_look_view(half(32, 64), s.truth[32:], sc, 1.0, gen(), start=32, total=64)
    torch.testing.assert_close(torch.cat([lo[0].cancel, hi[0].cancel]), view.cancel)
    assert torch.equal(torch.cat([lo[1].K, hi[1].K]), rest.K)


def test_the_k_head_is_not_trained_on_second_looks():
    """The objective's K term is the cross-entropy averaged over the first looks of a batch only
    (a scene with a non-zero cancel row is a second look, whose truth is what is left)."""
    import dataclasses

    from risloc import covariance as cv
    from risloc.nn.config import LossConfig
    from risloc.nn.inputs import Prediction, effective, prepare_inputs
    from risloc.nn.loss import Objective
    from risloc.nn.networks import get_network
    from risloc.simulate import source_factor

    sc = risloc.Scenario()
    s = risloc.simulate(sc, 4, seed=22)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-3)
    cancel = torch.zeros(4, sc.k_max + 1, sc.n_elements, dtype=torch.complex64)
    cancel[1, 0, 0] = cancel[3, 2, 5] = 1.0  # scenes 1 and 3: second looks
    logits = torch.randn(4, sc.k_max, generator=torch.Generator().manual_seed(0))
    F = source_factor(s.truth, sc)
    options = cv.CovarianceOptions()
    obj = Objective(LossConfig(main="cov", k_weight=1.0, k_start=0.0), sc, get_network("covariance"))
    ce = torch.nn.functional.cross_entropy(logits, (s.truth.K - 1).clamp(0, sc.k_max - 1), reduction="none")
    for c, scenes in ((None, [0, 1, 2, 3]), (cancel, [0, 2])):
        x = dataclasses.replace(inputs, cancel=c)
        pred = Prediction(F, effective(F, x, options), logits, kind="covariance")
        _, parts = obj(pred, x, options, s.truth, F, 5.0)
        assert math.isclose(float(parts["k"]), float(ce[scenes].mean()), rel_tol=1e-5)


def test_a_second_look_run_trains(tmp_path):
    """A spectrum run with second looks in its batches trains and writes a usable checkpoint."""
    cfg = apply_overrides(TrainConfig(), {
        "device": "cpu", "amp": "none", "threads": 1, "epochs": 1, "steps_per_epoch": 2, "batch": 8, "train_scenes": 16,
        "val_scenes": 8, "val_batch": 8, "val_locate": False, "calibrate": False, "val_primary": "loss", "second_look": 0.5,
        "model.width": 8, "model.depth": 1, "model.k_hidden": 16,
    })
    train(cfg, tmp_path / "run", log=lambda s: None)
    scenes = risloc.simulate(risloc.Scenario(), 2, seed=23)
    est = risloc.locate(scenes, "learned", checkpoint=tmp_path / "run" / "best.pt", search="network")
    assert est.K.shape == (2,)
    assert TrainConfig.from_toml(load_checkpoint(tmp_path / "run" / "best.pt")["config"]).second_look == 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="TrainConfig.second_look"):
            apply_overrides(TrainConfig(), {"second_look": bad})
