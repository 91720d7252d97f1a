"""`risloc simulate` through risloc.cli.main."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import risloc.simulate  # noqa: F401  (the module, for monkeypatching)
from risloc import Scenario, io, simulate
from risloc.cli import main

SIM = sys.modules["risloc.simulate"]


def test_k1_static_fixed_snr(tmp_path, capsys):
    out = tmp_path / "k1.h5"
    assert main(["simulate", "--out", str(out), "--scenes", "30", "--seed", "4", "--k", "1", "--snr-db", "30", "--signal", "static"]) == 0
    captured = capsys.readouterr()
    assert "wrote 30 scenes" in captured.out and "simulate" in captured.err  # summary and progress bar
    scenes = io.load_scenes(out)
    sc = scenes.scenario
    assert (sc.k_fixed, sc.k_max, sc.signal, sc.snr_db_min, sc.snr_db_max) == (1, 5, "static", 30.0, 30.0)
    assert scenes.truth.phi.shape == (30, 5) and (scenes.truth.K == 1).all() and torch.allclose(scenes.snr_db, torch.tensor(30.0))
    ref = simulate(sc, 30, seed=4)
    assert torch.equal(scenes.y, ref.y) and torch.equal(scenes.H, ref.H)
    assert sorted(os.listdir(tmp_path)) == ["k1.h5"]


def test_chunking_start_and_range(tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    common = ["--scenes", "40", "--seed", "2", "--snr-db", "-5", "5", "--codes", "dft", "--quiet"]
    assert main(["simulate", "--out", str(a), "--chunk", "7", *common]) == 0
    assert main(["simulate", "--out", str(b), "--chunk", "1000", *common]) == 0
    sa, sb = io.load_scenes(a), io.load_scenes(b)
    assert torch.equal(sa.y, sb.y) and torch.equal(sa.H, sb.H) and torch.equal(sa.truth.r.nan_to_num(), sb.truth.r.nan_to_num())
    assert sa.scenario.codebook == "dft" and sa.snr_db.min() >= -5 and sa.snr_db.max() <= 5 and sa.snr_db.std() > 1
    # --start continues the same stream
    assert main(["simulate", "--out", str(c), "--start", "25", *common[:1], "15", *common[2:]]) == 0
    assert torch.equal(io.load_scenes(c).y, sa.y[25:])


def test_config_then_flags_then_set(tmp_path):
    cfg = tmp_path / "sc.toml"
    Scenario(k_max=3, r_max=4.0, signal="static").save(cfg)
    out = tmp_path / "s.h5"
    args = ["simulate", "--out", str(out), "--scenes", "12", "--config", str(cfg), "--signal", "stochastic", "--set", "r_max=6", "--quiet"]
    assert main(args) == 0
    sc = io.load_scenes(out).scenario
    assert (sc.k_max, sc.r_max, sc.signal) == (3, 6.0, "stochastic")
    assert io.load_scenes(out).truth.phi.shape == (12, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "kmax=3"], "unknown Scenario field 'kmax'"),
        (["--k", "9"], "Scenario.k_fixed"),
        (["--snr-db", "1", "2", "3"], "--snr-db takes one value or two"),
        (["--scenes", "0"], "--scenes must be >= 1"),
        (["--chunk", "0"], "--chunk must be >= 1"),
        (["--config", "absent.toml"], "absent.toml"),
    ],
)
def test_bad_input_is_refused(tmp_path, capsys, extra, message):
    out = tmp_path / "x.h5"
    argv = ["simulate", "--out", str(out), "--scenes", "5", "--quiet", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt, 130), (RuntimeError, None)])
def test_interrupted_run_leaves_no_file(tmp_path, monkeypatch, exc, code):
    real = SIM.simulate_chunks

    def crashing(*args, **kwargs):
        for i, chunk in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise exc("stop")
            yield chunk

    monkeypatch.setattr(SIM, "simulate_chunks", crashing)
    out = tmp_path / "big.h5"
    argv = ["simulate", "--out", str(out), "--scenes", "50", "--chunk", "10", "--quiet"]
    if code is None:
        with pytest.raises(exc):
            main(argv)
    else:
        assert main(argv) == code
    assert os.listdir(tmp_path) == []


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--scenes", "--seed", "--k", "--snr-db", "--signal", "--codes", "--config", "--set", "--device", "--chunk"):
        assert flag in text
