"""The overfit probe (``risloc overfit``): small versions of it per network kind that must reach
the probe's own target (validation covariance NMSE <= 0.1 on the training scenes), and the
probe failing where nothing is learned."""

from __future__ import annotations

import re

import pytest

from risloc.cli import main
from risloc.cli.overfit import PROBE_LOSS, PROBE_MODEL, check_guards, guarded_config
from risloc.nn.config import TrainConfig, apply_overrides

SMALL_SPECTRUM = ["--train-scenes", "8", "--val-scenes", "8", "--batch", "8", "--steps-per-epoch", "4", "--epochs", "40",
                  "--budget", "600", "--model.width", "8", "--model.depth", "1", "--model.k_hidden", "8"]
"""The spectrum probe on 8 scenes with its grid, pursuit and loss, at width 8 and one bottleneck
block (measured: NMSE 0.076 after 15 epochs, 60 steps, 73 s on the loaded 2-core CPU)."""


def _best(out: str) -> float:
    m = re.search(r"\[OVERFIT\] (PASS|FAIL): best val NMSE ([0-9.]+|inf)", out)
    assert m, out[-2000:]
    return float(m.group(2))


def test_spectrum_probe_reaches_the_target(capsys):
    """The shipped kind's probe (its main term with the covariance NMSE, beta = 0, no EMA) on 8
    memorised scenes reaches the probe's target 0.1 on the validation NMSE."""
    rc = main(["overfit", *SMALL_SPECTRUM])
    out = capsys.readouterr().out
    assert "kind=spectrum" in out and "[SELFTEST] nmse(R,R)=0 nmse(0,R)=1" in out
    for tag in ("[LR]", "[GRAD]", "[STEP] step", "dparam=", "[VAL]"):
        assert tag in out
    assert _best(out) <= 0.1, out[-2000:]
    assert rc == 0 and "[OVERFIT] PASS" in out, out[-2000:]


def test_spectrum_probe_fails_when_nothing_is_learned(capsys):
    """The same probe with the learning rate 0: the NMSE stays at the untrained network's (> 1),
    the probe reports FAIL and exits 1."""
    args = [a for a in SMALL_SPECTRUM]
    args[args.index("--epochs") + 1] = "3"
    rc = main(["overfit", *args, "--lr", "0", "--min-lr", "0"])
    out = capsys.readouterr().out
    assert rc == 1 and "[OVERFIT] FAIL" in out, out[-2000:]
    assert _best(out) > 1.0


def test_small_covariance_probe(capsys):
    rc = main(["overfit", "--model.kind", "covariance", "--train-scenes", "32", "--val-scenes", "32", "--batch", "32", "--steps-per-epoch", "4",
               "--target", "0.6", "--epochs", "40", "--budget", "600", "--model.width", "32", "--threads", "1"])
    out = capsys.readouterr().out
    assert "[SELFTEST] nmse(R,R)=0 nmse(0,R)=1" in out
    for tag in ("[LR]", "[GRAD]", "[STEP] step", "dparam=", "[VAL]"):
        assert tag in out
    assert rc == 0, out[-2000:]


def test_probe_settings_and_guards():
    """Each kind gets its probe network and main term; aux terms, beta and EMA are refused."""
    cfg = guarded_config(TrainConfig())
    assert cfg.model.kind == "spectrum" and cfg.loss.main == "detect" and cfg.ema == 0 and cfg.loss.beta == 0
    assert cfg.model.width == PROBE_MODEL["spectrum"]["model.width"]
    assert cfg.loss.detect_cov_weight == PROBE_LOSS["spectrum"]["loss.detect_cov_weight"] > 0
    check_guards(cfg)
    cov = guarded_config(apply_overrides(TrainConfig(), {"model.kind": "covariance"}))
    assert cov.loss.main == "cov" and cov.model.patch == 3
    for bad in ({"loss.k_weight": 0.2}, {"loss.beta": 0.25}, {"ema": 0.99}, {"val_scenes": 256}):
        with pytest.raises(ValueError, match="overfit probe"):
            check_guards(apply_overrides(cfg, bad))


def test_detect_cov_weight_adds_the_covariance_nmse():
    """``loss.detect_cov_weight`` c: the spectrum main term is detection + c x the covariance NMSE
    of the prediction (the probe's stop criterion); c = 0 (the shipped run) leaves it unchanged."""
    import torch

    import risloc
    from risloc.nn.inputs import prepare_inputs
    from risloc.nn.loss import Objective, covariance_main_loss
    from risloc.nn.networks import build_model, get_network

    sc = risloc.Scenario()
    cfg = apply_overrides(TrainConfig(), {"model.width": 4, "model.depth": 1, "model.k_hidden": 8, "model.grid_phi": 8,
                                          "model.grid_theta": 4, "model.grid_rho": 4, "model.pursuit": 1, "loss.k_weight": 0.0})
    torch.manual_seed(0)
    model = build_model(sc, cfg.model)
    s = risloc.simulate(sc, 4, seed=5)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=cfg.loss.regularisation)
    options = cfg.covariance_options(0.0)
    pred = model(inputs, options)
    F = risloc.source_factor(s.truth, sc)
    terms = {}
    for c in (0.0, 2.5):
        obj = Objective(apply_overrides(cfg, {"loss.detect_cov_weight": c}).loss, sc, get_network("spectrum"))
        terms[c] = obj(pred, inputs, options, s.truth, F, 0.0)[0].detach()
    nmse = covariance_main_loss(pred, inputs, options, F).mean().double().detach()
    assert 0.1 < float(nmse) < 10
    assert torch.allclose(terms[2.5] - terms[0.0], 2.5 * nmse, rtol=1e-5)


def test_probe_names_the_time_budget_when_it_stops_on_it(tmp_path, capsys):
    """A budget that one epoch exhausts ends the probe after epoch 0 with FAIL, and both the stop
    line and the verdict say it was the time budget, not the target."""
    rc = main(["overfit", "--model.kind", "covariance", "--train-scenes", "8", "--val-scenes", "8", "--batch", "8",
               "--steps-per-epoch", "1", "--epochs", "5", "--budget", "0.01", "--model.width", "8", "--model.depth", "1",
               "--threads", "1", "--out", str(tmp_path / "of")])
    out = capsys.readouterr().out
    assert rc == 1 and "target reached" not in out, out[-2000:]
    assert "[STOP] time budget of 0.01 s would run out during the next epoch after epoch 0" in out, out[-2000:]
    assert re.search(r"\[OVERFIT\] FAIL: best val NMSE [0-9.]+ \(target 0.1\) in \d+ s \(time budget of 0.01 s would run out "
                     r"during the next epoch\)", out), out[-2000:]
