"""learned and learned+ml: the network's detections refined by ml's likelihood, grown and (learned+ml) pruned."""

import pytest
import torch

import risloc
from risloc.estimators import get
from risloc.nn.config import TrainConfig, apply_overrides
from risloc.nn.train import train


def test_learned_and_learned_ml_are_ml_refinements_of_the_network(tmp_path, monkeypatch):
    from risloc.estimators import ml as ml_module
    from risloc.nn.inference import (LEARNED_CANDIDATES, LEARNED_DEFAULTS, LEARNED_GRID, LEARNED_GROW, LEARNED_ML_DEFAULTS, LEARNED_ML_GROW,
                                     LEARNED_ML_PRUNE, LEARNED_OVER, LEARNED_OVER_DFT,
                                     LEARNED_PRUNE, LEARNED_RELAX, LEARNED_RELAX_SOURCES, LEARNED_SEARCH, _learned, default_over,
                                     k_confidence, load_model, over_init, reuses_dictionary, run_model, second_look)

    cfg = apply_overrides(
        TrainConfig(),
        {
            "device": "cpu", "amp": "none", "threads": 1, "epochs": 1, "steps_per_epoch": 2, "batch": 8, "train_scenes": 16,
            "val_scenes": 8, "val_batch": 8, "val_locate": False, "calibrate": False, "val_primary": "loss",
            "model.width": 8, "model.depth": 1, "model.k_hidden": 16,
        },
    )
    train(cfg, tmp_path / "run", log=lambda s: None)
    ckpt = tmp_path / "run" / "best.pt"
    scenes = risloc.simulate(risloc.Scenario(), 4, seed=5)
    music = {"refine_iterations": 2}
    network = get("learned")(scenes, checkpoint=ckpt, music_options=music, refine="music")
    first, cand, _ = _learned(scenes, ckpt, None, True, music, candidates=True, stage="detections")
    assert torch.equal(first.K, network.K)  # the K-hat of the K head either way
    assert torch.equal(first.phi[:, :1], cand.phi[:, :1])  # the K-hat strongest detections themselves
    loaded = load_model(ckpt)
    _, pred = run_model(loaded.model, scenes, options=loaded.options, calibration=loaded.calibration, stage="detections")
    conf = k_confidence(pred, loaded.calibration)  # the calibrated K head's confidence
    assert conf.shape == (4,) and bool(((conf > 0) & (conf <= 1)).all())
    # learned = ml's init path from the network's K-hat + over detections: refine, grow, RELAX of the weakest, over + prune pruning passes
    # (stochastic signals: no growth, the weakest source re-searched; static: three growth steps, every source); the growth and
    # RELAX steps search a dictionary (default; static signals: ml's own) or the network's second look
    assert LEARNED_SEARCH == "dictionary"
    assert (default_over(risloc.Scenario()), default_over(risloc.Scenario(codebook="dft"))) == (LEARNED_OVER, LEARNED_OVER_DFT) == (1, 2)
    assert loaded.model.shape == (24, 12, 12)  # the network's grid: the stochastic stage reads what its front end measured
    for signal, (grow, relax_sources, grid) in {"stochastic": (0, 1, (24, 12, 12)), "static": (3, 0, (25, 13, 14))}.items():
        assert (LEARNED_GROW[signal], LEARNED_RELAX_SOURCES[signal], LEARNED_GRID[signal]) == (grow, relax_sources, grid)
        these = scenes if signal == "stochastic" else risloc.simulate(risloc.Scenario(signal="static"), 4, seed=5)
        f, c, _ = _learned(these, ckpt, None, True, music, candidates=True, stage="detections")
        counts = dict(**LEARNED_DEFAULTS, grid_shape=grid, relax_sources=relax_sources)
        stage = dict(init_grow=grow, init_relax=LEARNED_RELAX, init_prune=LEARNED_OVER + LEARNED_PRUNE[signal])
        start = over_init(c, f.K, LEARNED_OVER)
        on_grid = get("ml")(these, init=start, **counts, **stage)
        found = get("ml")(these, init=start, **counts, init_grow=0, init_relax=0, init_prune=0)  # the start, refined
        atoms = second_look(loaded.model, these, found, LEARNED_CANDIDATES, options=loaded.options)
        assert atoms.phi.shape == (4, LEARNED_CANDIDATES) and bool(torch.isfinite(atoms.phi).all())
        on_network = get("ml")(these, init=found, atoms=atoms, **counts, **stage)
        for search, again in (("dictionary", on_grid), ("network", on_network), (None, on_grid)):
            learned = get("learned")(these, checkpoint=ckpt, music_options=music, **({} if search is None else {"search": search}))
            assert learned.method == network.method and torch.equal(learned.K, again.K), (signal, search)
            assert bool(((learned.K >= f.K - LEARNED_PRUNE[signal]) & (learned.K <= f.K + LEARNED_OVER + grow)).all()), signal
            for name in ("phi", "theta", "r"):  # the stochastic stage reads the network's measured dictionary: float32 rounding
                assert torch.allclose(getattr(learned, name), getattr(again, name), rtol=1e-4, atol=1e-5, equal_nan=True), \
                    (signal, search, name)
    # dft codes: two extra detections (and three pruning passes) by default
    dft = risloc.simulate(risloc.Scenario(codebook="dft"), 4, seed=5)
    by_default, two = (get("learned")(dft, checkpoint=ckpt, music_options=music, **o) for o in ({}, {"over": 2}))
    assert torch.equal(by_default.K, two.K) and torch.allclose(by_default.phi, two.phi, equal_nan=True)
    # the second look builds no dictionary: its searches score the network's candidates only; the dictionary search on
    # the network's own grid (the default) reads what the front end measured; on another grid, or in batches, it measures its own
    built, measured = [], ml_module._measured_dictionary
    monkeypatch.setattr(ml_module, "_measured_dictionary", lambda *a, **k: built.append(1) or measured(*a, **k))
    get("learned")(scenes, checkpoint=ckpt, music_options=music, search="network")
    assert built == []
    reused = get("learned")(scenes, checkpoint=ckpt, music_options=music)
    assert built == []
    own = get("learned")(scenes, checkpoint=ckpt, music_options=music, ml_options={"batch": 2})
    assert built == [1, 1] and torch.equal(reused.K, own.K)
    for name in ("phi", "theta", "r"):  # float32 rounding of the same products
        assert torch.allclose(getattr(reused, name), getattr(own, name), rtol=1e-4, atol=1e-5, equal_nan=True), name
    get("learned")(scenes, checkpoint=ckpt, music_options=music, ml_options={"grid_shape": (21, 11, 12)})
    assert built == [1, 1, 1]
    on_net = {"grid_shape": (24, 12, 12)}
    assert reuses_dictionary(on_net, loaded.model)
    for other in ({"grid_shape": (21, 11, 12)}, {"batch": 2}, {"amplitude": "scenario"}, {"dtype": torch.complex128}):
        assert not reuses_dictionary({**on_net, **other}, loaded.model), other
    with pytest.raises(ValueError, match="learned: search"):
        get("learned")(scenes, checkpoint=ckpt, search="grid")
    # the counts and ml_options reach ml; with a known K no growth or pruning
    plain = get("learned")(scenes, checkpoint=ckpt, music_options=music, over=0, grow=1, relax=0, prune=0, ml_options={"iterations": 2},
                           search="dictionary")
    ref = get("ml")(scenes, init=first, **{**LEARNED_DEFAULTS, "iterations": 2}, grid_shape=LEARNED_GRID["stochastic"], init_grow=1)
    assert torch.equal(plain.K, ref.K) and torch.allclose(plain.phi, ref.phi, equal_nan=True)
    known = get("learned")(scenes, checkpoint=ckpt, music_options=music, K=2)
    assert bool((known.K == 2).all()) and bool(torch.isfinite(known.phi[:, :2]).all())
    kept_k = get("learned")(scenes, checkpoint=ckpt, music_options=music, over=0, grow=0, prune=0)
    assert torch.equal(kept_k.K, first.K)  # no extra detection, growth or pruning: K-hat is the K head's
    # learned+ml = ml from the over-proposal of the network's detections, grow, relax, over + prune pruning passes
    both = get("learned+ml")(scenes, checkpoint=ckpt, music_options=music, ml_options={"iterations": 3}, over=1, grow=1, relax=1, prune=2)
    ref = get("ml")(scenes, init=over_init(cand, first.K, 1), **{**LEARNED_ML_DEFAULTS, "iterations": 3}, init_grow=1, init_relax=1,
                    init_prune=3)
    assert both.method.startswith("learned+ml:") and both.method[len("learned+ml:"):] == network.method[len("learned:"):]
    assert torch.equal(both.K, ref.K) and bool(((both.K >= first.K - 2) & (both.K <= first.K + 2)).all())
    for name in ("phi", "theta", "r"):
        assert torch.allclose(getattr(both, name), getattr(ref, name), equal_nan=True)
        got = getattr(both, name)
        for s in range(4):
            assert torch.isfinite(got[s, : int(both.K[s])]).all()
    kept = get("learned+ml")(scenes, checkpoint=ckpt, music_options=music, ml_options={"iterations": 3}, over=0, grow=0, prune=0)
    assert torch.equal(kept.K, first.K)
    # learned+ml's growth and pruning defaults follow the signal model (LEARNED_ML_GROW, LEARNED_ML_PRUNE)
    assert (LEARNED_ML_GROW, LEARNED_ML_PRUNE) == ({"stochastic": 1, "static": 3}, {"stochastic": 1, "static": 2})
    static = risloc.simulate(risloc.Scenario(signal="static"), 3, seed=6)
    for these, grow, prune in ((scenes, 1, 1), (static, 3, 2)):
        f, c, _ = _learned(these, ckpt, None, True, music, candidates=True, stage="detections")
        default = get("learned+ml")(these, checkpoint=ckpt, music_options=music, ml_options={"iterations": 2})
        ref = get("ml")(these, init=over_init(c, f.K, 1), **{**LEARNED_ML_DEFAULTS, "iterations": 2}, init_grow=grow, init_relax=1,
                        init_prune=1 + prune)
        assert torch.equal(default.K, ref.K) and torch.allclose(default.phi, ref.phi, equal_nan=True), these.scenario.signal
    with pytest.raises(ValueError, match="grow"):
        get("learned+ml")(scenes, checkpoint=ckpt, grow=-1)
    assert "learned+ml" in risloc.estimators.available()
    for bad in (-1, 1.5, "one", True):
        with pytest.raises(ValueError, match="learned: relax"):
            get("learned")(scenes, checkpoint=ckpt, relax=bad)
    with pytest.raises(ValueError, match="refine"):
        get("learned")(scenes, checkpoint=ckpt, refine="none")


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
    with pytest.raises(ValueError, match="model.kind = 'subspacenet'"):
        get("learned")(scenes, checkpoint=tmp_path / "run" / "best.pt")


def test_over_init_takes_the_strongest_detections():
    from risloc.nn.inference import over_init

    cand = risloc.Estimates(torch.tensor([3, 3, 3]), torch.tensor([[0.11, 0.5, 0.6], [0.1, 0.2, 0.3], [0.7, 0.8, 0.9]]),
                            torch.full((3, 3), 0.05), torch.full((3, 3), 4.0))
    g = over_init(cand, torch.tensor([1, 3, 0]), 1)
    assert g.K.tolist() == [2, 3, 1]  # capped at the number of detections
    assert torch.equal(g.phi[0, :2], torch.tensor([0.11, 0.5])) and torch.isnan(g.phi[0, 2]) and torch.isnan(g.r[0, 2])
    assert torch.equal(g.phi[1], cand.phi[1])
    assert g.phi[2, 0] == cand.phi[2, 0] and torch.isnan(g.phi[2, 1:]).all()
