"""The design note's training features on the network that ships (``spectrum``): the covariance-NMSE
self-test, structure terms and their ramps, the curriculum, metric-driven checkpoint selection,
K temperature calibration (the overfit probe: tests/test_overfit.py), and exact resumption across commands with a
wall-clock budget."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

import risloc
from risloc.nn.checkpoint import load_checkpoint
from risloc.nn.inputs import prepare_inputs
from risloc.nn.loss import AUX_TERMS, Objective
from risloc.nn.networks import build_model, get_network
from risloc.nn.train import train

sys.path.insert(0, os.path.dirname(__file__))
from test_nn_spectrum import _tiny  # noqa: E402

SC = risloc.Scenario()


def test_structure_terms_train_the_spectrum_network():
    """Every auxiliary term applies to the spectrum network's factor and gives finite gradients."""
    cfg = _tiny(**{f"loss.{t}_weight": 0.1 for t in AUX_TERMS}, **{f"loss.{t}_start": 0.0 for t in AUX_TERMS})
    torch.manual_seed(0)
    model = build_model(SC, cfg.model)
    s = risloc.simulate(SC, 4, seed=41)
    inputs = prepare_inputs(s.y, s.H, s.codes, s.snr_db, regularisation=1e-2)
    opts = cfg.covariance_options(0.25)
    objective = Objective(cfg.loss, SC, get_network("spectrum"))
    loss, parts = objective(model(inputs, opts), inputs, opts, s.truth, risloc.source_factor(s.truth, SC), 1.0)
    assert set(parts) == {"detect", *AUX_TERMS} and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="supports"):
        Objective(cfg.loss, SC, get_network("covariance"))  # 'detect' is the spectrum network's own term


def test_spectrum_run_curriculum_selection_and_calibration(tmp_path):
    cfg = _tiny(epochs=3, steps_per_epoch=3, batch=4, train_scenes=0, val_scenes=24, val_batch=24, val_locate=True,
                val_primary="k_loc", calibrate=True, **{"loss.k_start": 1.0, "loss.k_ramp": 0.0, "loss.gap_weight": 0.1,
                                                         "loss.gap_start": 2.0, "loss.gap_ramp": 0.5, "loss.beta": 0.25,
                                                         "loss.beta_start": 1.0, "loss.beta_ramp": 1.0})
    lines: list[str] = []
    summary = train(cfg, tmp_path / "run", log=lines.append)
    text = "\n".join(lines)
    assert "[SELFTEST] nmse(R,R)=0 nmse(0,R)=1 " in text  # the aligned NMSE's self-test, at beta 0 and 0.25
    assert text.count("[SELFTEST]") == 2
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rec] == [0, 1, 2]
    # the curriculum: the K term from epoch 1, the eigengap term from epoch 2, beta rising from epoch 1
    assert "train_k" not in rec[0] and "train_k" in rec[1] and "train_gap" not in rec[1] and "train_gap" in rec[2]
    assert [r["beta"] for r in rec] == [0.0, 0.25, 0.25]
    for r in rec:  # scores of the 24 validation scenes, and the documented k_loc = (2 success + K_acc) / 3
        assert math.isfinite(r["val_nmse"]) and r["val_nmse"] >= 0
        for q in ("success", "K_acc"):
            assert 0 <= r[q] <= 1 and r[q] * 24 == pytest.approx(round(r[q] * 24), abs=1e-6), (q, r[q])  # a share of 24 scenes
        assert r["k_loc"] == pytest.approx((2 * r["success"] + r["K_acc"]) / 3, abs=1e-9)
    # metric-driven selection: best.pt holds the epoch with the highest k_loc (the first on ties)
    best = max(rec, key=lambda r: (r["k_loc"], -r["epoch"]))
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["progress"]["step"] == best["step"] and state["metrics"]["k_loc"] == best["k_loc"]
    # K temperature calibration on the validation scenes, stored in best.pt and used at inference
    cal = summary["calibration"]
    assert state["calibration"]["temperature"] == cal["temperature"] != 1.0
    assert cal["k_nll_after"] <= cal["k_nll_before"] + 1e-9


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_time_budget_segments_resume_exactly(tmp_path, capsys):
    """``risloc train --time-budget`` stops with a resumable checkpoint (here after every step, inside
    epochs too); resuming segment after segment gives bitwise the weights of one uninterrupted run."""
    from risloc.cli import main

    cfg = _tiny(epochs=2, steps_per_epoch=3, batch=4, train_scenes=0, val_scenes=8, **{"model.channels_last": False})
    train(cfg, tmp_path / "one", log=lambda s: None)
    toml = tmp_path / "cfg.toml"
    toml.write_text(cfg.to_toml())
    args = ["train", "--config", str(toml), "--out", str(tmp_path / "cut"), "--no-progress", "--time-budget", "0.001"]
    assert main(args) == 0
    steps = [load_checkpoint(tmp_path / "cut" / "last.pt")["progress"]["step"]]
    while not (tmp_path / "cut" / "summary.json").exists():
        assert main(args + ["--resume"]) == 0
        steps.append(load_checkpoint(tmp_path / "cut" / "last.pt")["progress"]["step"])
        assert len(steps) < 20
    assert steps[0] == 1 and 2 in steps  # stopped inside the first epoch, and again
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for key in ("model", "ema", "objective", "optimizer", "scheduler", "rng", "metrics", "calibration"):
        assert _equal(a[key], b[key]), key
    assert a["progress"] == b["progress"]
    ra = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == [0, 1]
    for x, y in zip(ra, rb):
        assert x["val_nmse"] == y["val_nmse"] and x["train_detect"] == y["train_detect"]
    assert main(["train", "--out", str(tmp_path / "x"), "--time-budget", "0"]) == 2  # one error line, exit 2
    assert "--time-budget" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a folder that holds a run is neither continued nor replaced without being asked to
    before = (tmp_path / "cut" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "holds a run" in capsys.readouterr().err and (tmp_path / "cut" / "last.pt").read_bytes() == before
    assert main(args + ["--resume", "--overwrite"]) == 2
    assert main(args + ["--overwrite"]) == 0  # a new run: stopped after its first step again, nothing of the old one left
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["progress"]["step"] == 1
    assert not any((tmp_path / "cut" / name).exists() for name in ("best.pt", "weights.pt", "summary.json"))


def test_train_scaling_benchmark_writes_its_record(tmp_path):
    """benchmarks/bench_train_scaling.py (one process on the CPU, a tiny network): the JSON record."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train_scaling.py"
    spec = importlib.util.spec_from_file_location("bench_train_scaling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "w1.json"
    tiny = ["model.width=4", "model.depth=1", "model.k_hidden=8", "model.grid_phi=8", "model.grid_theta=4", "model.grid_rho=4",
            "model.pursuit=1", "threads=1"]
    assert bench.main(["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-per-rank", "4", "--out", str(out),
                       *[a for kv in tiny for a in ("--set", kv)]]) == 0
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 1 and rec["batch_per_rank"] == 4 and rec["timed_steps"] == 2 and rec["kind"] == "spectrum"
    assert rec["scenes_per_s"] > 0 and rec["devices"] == ["cpu"] and rec["commit"]


def test_checkpoint_of_the_earlier_trainer_resumes(tmp_path):
    """A last.pt in the earlier layout (non-fused AdamW groups, progress without 'step', no scaler
    or mid-epoch fields) resumes at its epoch and ends where an uninterrupted run ends."""
    from risloc.nn.checkpoint import save_checkpoint

    cfg = _tiny(epochs=2, steps_per_epoch=2, **{"model.channels_last": False})
    train(cfg, tmp_path / "one", log=lambda s: None)
    train(cfg, tmp_path / "old", log=lambda s: None, stop_after_epoch=0)
    state = load_checkpoint(tmp_path / "old" / "last.pt")
    for g in state["optimizer"]["param_groups"]:
        g["fused"], g["foreach"] = None, None
    state["progress"] = {k: state["progress"][k] for k in ("epoch", "best", "bad_epochs")}
    state.pop("scaler")
    save_checkpoint(tmp_path / "old" / "last.pt", state)
    train(cfg, tmp_path / "old", log=lambda s: None, resume=True)
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "old" / "last.pt")
    assert b["progress"]["step"] == 4
    assert _equal(a["model"], b["model"]) and _equal(a["ema"], b["ema"])
