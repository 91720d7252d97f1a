"""The estimator registry: metadata, chunking once, per-scene options, known K routed and checked."""

from __future__ import annotations

import math
import re

import pytest
import torch

import risloc
from risloc import estimators
from risloc.estimators import EstimatorInfo, known_k, register
from risloc.scenes import Estimates
from helpers import assert_same_positions

SC = risloc.Scenario()


@pytest.fixture(scope="module")
def scenes():
    return risloc.simulate(SC, 7, seed=21)


_CALLS: list = []


@register("registry-test-echo", k_option="K", per_scene=("tag",), batch=3)
def _echo(scenes, *, K=None, tag=None, answer_k: int | None = None):
    """Returns K-hat = K (or ``answer_k``, to break the contract), remembers each batch."""
    _CALLS.append((len(scenes), None if tag is None else tag.tolist()))
    n = len(scenes)
    Kh = torch.full((n,), 1, dtype=torch.int64) if K is None else K.clone()
    if answer_k is not None:
        Kh = torch.full((n,), answer_k, dtype=torch.int64)
    nan = torch.full((n, SC.k_max), math.nan)
    return Estimates(Kh, nan.clone(), nan.clone(), nan.clone(), method="echo")


@register("registry-test-nok")
def _no_k(scenes):
    return Estimates.empty(len(scenes), SC.k_max)


def test_metadata_of_every_estimator():
    for name in _PACKAGE:
        info = estimators.info(name)
        est = estimators.get(name)
        assert isinstance(info, EstimatorInfo) and info.name == name and info.batch >= 1 and info.batch_cuda >= 1
        assert est.info is info and est.__module__ == info.module and info.summary, name
        assert info.learned == (info.default_weights is not None)
        assert info.learned == est.accepts("checkpoint"), name  # a learned estimator reads a checkpoint
        if info.learned:
            assert info.default_weights_path().is_file(), name  # the packaged weights ship
        if info.accepts_k:
            assert est.accepts(info.k_option), name  # the K keyword is one of its options
        assert set(info.per_scene) <= set(est.options) or est._takes_var_keywords(), name  # its per-scene options reach it
    assert estimators.info("music").accepts_k and estimators.info("mvdr").accepts_k
    assert estimators.info("ramezani").k_option == "n_sources"
    assert estimators.info("ml").batch_for("cpu") == 16 and estimators.info("ml").batch_for("cuda") == 1024
    music = estimators.get("music")
    assert music.accepts("order_rule") and not music.accepts("checkpoint") and music.options["order_rule"] == "mdl"
    with pytest.raises(ValueError, match="unknown method"):
        estimators.info("nope")


def test_chunking_and_per_scene_options(scenes):
    _CALLS.clear()
    tag = torch.arange(len(scenes))
    est = risloc.locate(scenes, "registry-test-echo", tag=tag)
    assert len(est) == 7 and est.method == "echo"
    assert _CALLS == [(3, [0, 1, 2]), (3, [3, 4, 5]), (1, [6])]  # the registered batch, sliced options
    _CALLS.clear()
    risloc.locate(scenes, "registry-test-echo", batch=5, tag=tag)
    assert [c[0] for c in _CALLS] == [5, 2]
    assert len(risloc.locate(scenes[:0], "registry-test-echo")) == 0
    with pytest.raises(ValueError, match="batch"):
        risloc.locate(scenes, "registry-test-echo", batch=0)
    with pytest.raises(ValueError, match="unknown option"):
        risloc.locate(scenes, "registry-test-echo", nonsense=1)


def test_known_k_checked(scenes):
    est = risloc.locate(scenes, "registry-test-echo", K=torch.tensor([1, 2, 3, 4, 5, 1, 2]))
    assert est.K.tolist() == [1, 2, 3, 4, 5, 1, 2]
    with pytest.raises(RuntimeError, match="given K = 2 for scene 0"):
        risloc.locate(scenes, "registry-test-echo", K=2, answer_k=3)
    with pytest.raises(ValueError, match=r"K\[4\] = 6 \(scene 4\)"):
        known_k(torch.tensor([1, 1, 1, 1, 6, 1, 1]), 7, SC.k_max)
    with pytest.raises(ValueError, match="2 values"):
        known_k(torch.tensor([1, 2]), 7, SC.k_max)
    with pytest.raises(ValueError, match="integers"):
        known_k(torch.tensor([1.0] * 7), 7, SC.k_max)
    with pytest.raises(ValueError, match="does not accept a known K"):
        risloc.locate(scenes, "registry-test-nok", K=1)


_PACKAGE = tuple(n for n in estimators.available() if estimators.get(n).__module__.startswith("risloc."))
"""The package's estimators, from the registry (tests register their own names too)."""
ACCEPTS_K = [n for n in _PACKAGE if estimators.info(n).accepts_k]


def test_every_estimator_of_the_package_accepts_k():
    assert {"music", "music+ml", "mvdr", "ramezani", "ml", "sbl", "learned", "learned+ml", "subspacenet"} <= set(_PACKAGE)
    for name in _PACKAGE:  # every estimator of the package takes a known K, under its registered keyword
        info = estimators.info(name)
        assert info.accepts_k and estimators.get(name).accepts(info.k_option), name


@pytest.mark.parametrize("method", ACCEPTS_K)
def test_known_k_honoured(method, scenes):
    """K-hat == K in every scene, int and per-scene tensor forms (split over two batches of the
    registry), sources finite, padding NaN."""
    scenes = scenes[:5]
    for K in (2, torch.tensor([5, 1, 3, 2, 4])):
        est = risloc.locate(scenes, method, K=K, batch=3)
        want = torch.as_tensor(K).expand(len(scenes))
        assert torch.equal(est.K, want), (method, K)
        active = torch.arange(SC.k_max).view(1, -1) < want.view(-1, 1)
        assert torch.isfinite(est.phi[active]).all() and torch.isfinite(est.r[active]).all()
        assert torch.isnan(est.phi[~active]).all()


@pytest.mark.parametrize("method", _PACKAGE)
def test_the_registry_is_the_only_place_that_chunks(method, scenes, monkeypatch):
    """Every estimator of the package takes one batch: no batch/progress/device option of its
    own, one call per registry batch, and the registry's answer is those calls' answers."""
    est = estimators.get(method)
    assert not {"batch", "progress", "device"} & set(est.options), method
    calls, fn = [], est.fn

    def spy(s, **options):
        calls.append(fn(s, **options))
        return calls[-1]

    monkeypatch.setattr(est, "fn", spy)
    out = risloc.locate(scenes[:4], method, batch=3)
    assert [len(c) for c in calls] == [3, 1], method
    want = Estimates.cat(calls)
    assert torch.equal(out.K, want.K), method
    for name in ("phi", "theta", "r"):
        assert torch.equal(getattr(out, name).nan_to_num(-9.0), getattr(want, name).nan_to_num(-9.0)), (method, name)


@pytest.mark.parametrize("method", _PACKAGE)
def test_non_finite_scenes_refused_at_the_edge(method, scenes, monkeypatch):
    """A NaN or an infinity in y, H or the codes of one scene: every estimator of the package
    refuses the call before running any batch, naming itself, the field and the scene (its index
    in the whole set, not in its batch); NaN SNR labels are no error (they mean "no label")."""
    est = estimators.get(method)
    calls = []
    monkeypatch.setattr(est, "fn", lambda s, **options: calls.append(len(s)) or Estimates.empty(len(s), SC.k_max))
    for name, value in (("y", complex(math.nan, 0)), ("H", complex(0, math.inf)), ("codes", complex(math.nan, math.nan))):
        bad = scenes[:5]
        bad = type(bad)(**{**bad.__dict__, name: getattr(bad, name).clone()})
        getattr(bad, name)[3, 0, 1] = value
        with pytest.raises(ValueError, match=rf"^{re.escape(method)}: scenes\.{name} of scene 3 has non-finite values$"):
            risloc.locate(bad, method, batch=2)
    assert calls == []
    labels = scenes[:2]
    labels = type(labels)(**{**labels.__dict__, "snr_db": torch.tensor([math.nan, 10.0])})
    risloc.locate(labels, method, batch=2)
    assert calls == [2]


def test_chunking_does_not_change_music(scenes):
    """Same K-hat and positions within a hundredth of sqrt(CRB) in batches of 3 and of 64 (not a
    float32 rounding bound: another CPU rounds differently)."""
    a = risloc.locate(scenes, "music", batch=3)
    b = risloc.locate(scenes, "music", batch=64)
    assert_same_positions(a, b, scenes, 0.01)


def test_cpu_calls_leave_ordinary_tensors_for_autograd(tmp_path):
    """Off CUDA the registry runs estimators in inference mode. Their estimates come back as
    ordinary tensors (changed in place, used by autograd), and the module caches they fill hold
    ordinary tensors: a training run after the calls, in the same process, trains. (Cached
    inference tensors made such a run fail: autograd refuses to save them for backward.)"""
    from risloc import cuda_graphs
    from risloc.nn import inference
    from risloc.nn.config import TrainConfig, apply_overrides
    from risloc.nn.train import train

    for cache in cuda_graphs._CACHES:  # so that the calls below fill them
        cache.clear()
    inference._CACHE.clear()
    scenes = risloc.simulate(SC, 2, seed=5)
    for method in ("learned", "ml", "music"):
        est = risloc.locate(scenes, method)
        assert not any(t.is_inference() for t in (est.K, est.phi, est.theta, est.r)), method
        est.phi.mul_(1.0)  # in place, outside inference mode
    cached = [t for cache in cuda_graphs._CACHES for entry in cache.values() for t in cuda_graphs.tree_tensors(entry)]
    assert cached and not any(t.is_inference() for t in cached)
    assert not any(p.is_inference() for entry in inference._CACHE.values() for p in entry.model.parameters())
    cfg = apply_overrides(TrainConfig(), {
        "device": "cpu", "amp": "none", "threads": 1, "epochs": 1, "steps_per_epoch": 2, "batch": 4, "train_scenes": 8,
        "val_scenes": 4, "val_batch": 4, "calibrate": False, "val_primary": "loss",
        "model.width": 8, "model.depth": 1, "model.k_hidden": 16,
    })
    train(cfg, tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "best.pt").is_file()


@register("registry-test-autograd")
def _gradient_steps(scenes):
    """A user's estimator that uses autograd inside: a few gradient steps towards phi = 0.1 (a test double)."""
    phi = torch.zeros(len(scenes), 1, requires_grad=True)
    for _ in range(3):
        loss = ((phi - 0.1) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, phi)
        phi = (phi - 0.5 * grad).detach().requires_grad_(True)
    n = len(scenes)
    nan = torch.full((n, 1), math.nan)
    return Estimates(torch.ones(n, dtype=torch.int64), phi.detach(), nan.clone(), nan.clone(), method="autograd")


def test_inference_mode_only_for_the_package_estimators(scenes):
    """The package's estimators run in inference mode off CUDA; one registered by a user does not
    (its EstimatorInfo says so), so autograd works inside it through the registry."""
    own = [name for name in estimators.available() if estimators.info(name).module.startswith("risloc.")]
    assert len(own) >= 10 and all(estimators.info(name).inference_mode for name in own)
    assert not estimators.info("registry-test-autograd").inference_mode
    est = risloc.locate(scenes, "registry-test-autograd")
    assert torch.allclose(est.phi[:, 0], torch.full((len(scenes),), 0.1))
