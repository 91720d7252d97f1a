"""K-head calibration of a checkpoint (``risloc calibrate``, ``train(stop_after_epoch=...)``,
risloc.nn.train.calibrate_checkpoint): fitted on the trainer's validation scenes of the
checkpoint's own configuration, stored in the file, kept by the export, read by load_model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from risloc.cli import main
from risloc.nn import calibrate
from risloc.nn.checkpoint import export_weights, load_checkpoint
from risloc.nn.inference import DEFAULT_WEIGHTS, Calibration, load_model
from risloc.nn.train import CALIBRATION_METRICS, train, validate, validation_scenes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nn_spectrum import _tiny  # noqa: E402


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny spectrum run with calibration on, stopped after its first of two epochs."""
    out = tmp_path_factory.mktemp("cal") / "run"
    cfg = _tiny(epochs=2, calibrate=True, val_scenes=12, val_batch=8)
    summary = train(cfg, out, log=lambda s: None, stop_after_epoch=0)
    return out, cfg, summary


def _raw_logits(path, n: int):
    """K logits of checkpoint ``path`` on the first ``n`` trainer validation scenes of its config."""
    loaded = load_model(path)
    scenes = validation_scenes(loaded.config, n)
    _, logits, _ = validate(loaded.model, scenes, loaded.config, loaded.options, Calibration(), with_locations=False)
    return logits, scenes.truth.K


def test_stop_after_epoch_calibrates_best_and_the_export_keeps_it(stopped_run):
    out, cfg, summary = stopped_run
    best, weights = load_checkpoint(out / "best.pt"), load_checkpoint(out / "weights.pt")
    assert best["progress"]["epoch"] == 1  # stopped after epoch 0 of 2
    m = best["metrics"]
    assert m["calibration_scenes"] == cfg.val_scenes
    for k in CALIBRATION_METRICS:
        assert f"calibrated_{k}" in m and f"uncalibrated_{k}" in m
    assert summary["calibration"]["temperature"] == best["calibration"]["temperature"]
    # the fitted T is the NLL minimiser on exactly the trainer's validation scenes
    logits, K = _raw_logits(out / "best.pt", cfg.val_scenes)
    assert best["calibration"]["temperature"] == pytest.approx(calibrate.fit_temperature(logits, K), rel=1e-6)
    assert m["calibrated_val_k_nll"] <= m["uncalibrated_val_k_nll"] + 1e-9
    # weights.pt is exported after the calibration: same (T, tau), read back by load_model
    assert weights["calibration"] == best["calibration"]
    assert load_model(out / "weights.pt").calibration == Calibration(**best["calibration"])


def test_calibrate_command_fits_stores_and_is_read_back(stopped_run, tmp_path, capsys):
    out, cfg, _ = stopped_run
    ckpt = tmp_path / "weights.pt"
    export_weights(out / "best.pt", ckpt)
    before = load_checkpoint(ckpt)
    rc = main(["calibrate", str(ckpt), "--scenes", "20", "--no-progress"])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and len(line.splitlines()) == 1, line
    for what in ("T=", "tau=", "k_nll", "K_acc", "20 validation scenes", f"val_seed {cfg.val_seed}"):
        assert what in line, line
    after = load_checkpoint(ckpt)
    assert after["metrics"]["calibration_scenes"] == 20
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())  # only the calibration changes
    logits, K = _raw_logits(ckpt, 20)  # the first 20 scenes of the checkpoint's validation stream
    T = calibrate.fit_temperature(logits, K)
    assert after["calibration"]["temperature"] == pytest.approx(T, rel=1e-6)
    assert f"T={T:.4f}" in line
    assert load_model(ckpt).calibration.temperature == after["calibration"]["temperature"]
    assert calibrate.nll(logits, K, T) <= calibrate.nll(logits, K, 1.0) + 1e-9
    # the fit starts from the raw logits: calibrating again on the same scenes changes nothing
    assert main(["calibrate", str(ckpt), "--scenes", "20", "--no-progress", "--batch", "7"]) == 0
    capsys.readouterr()
    again = load_checkpoint(ckpt)
    assert again["calibration"]["temperature"] == pytest.approx(after["calibration"]["temperature"], rel=1e-5)
    assert again["calibration"]["threshold"] == pytest.approx(after["calibration"]["threshold"], abs=1e-6)


@pytest.mark.parametrize("argv, names", [
    (["{missing}"], "does not exist"),
    (["{text}"], "not a torch checkpoint"),
    (["{foreign}"], "not a risloc learned-model checkpoint"),
    (["{good}", "--scenes", "0"], "--scenes"),
    (["{good}", "--scenes", "-4"], "--scenes"),
    (["{good}", "--batch", "0"], "--batch"),
    (["{good}", "--device", "no-such-device"], "--device"),
])
def test_calibrate_refuses_bad_input(stopped_run, tmp_path, capsys, argv, names):
    out, _, _ = stopped_run
    files = {"missing": tmp_path / "no-such.pt", "text": tmp_path / "text.pt", "foreign": tmp_path / "foreign.pt",
             "good": tmp_path / "good.pt"}
    files["text"].write_text("not a checkpoint\n")
    torch.save({"epoch": 3, "weights": torch.ones(2)}, files["foreign"])
    files["good"].write_bytes((out / "weights.pt").read_bytes())
    listing = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["calibrate"] + [a.format(**files) for a in argv] + ["--no-progress"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("risloc calibrate: error: "), err
    assert names in err and "Traceback" not in err, err
    if "--scenes" not in argv and "--batch" not in argv and "--device" not in argv:
        assert argv[1] in err  # names the file
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == listing, "a file was written or changed"


def test_the_shipped_model_carries_its_fitted_calibration():
    """The packaged default (mixed.pt) was calibrated on the trainer's validation scenes of its own configuration
    (all of them): the recorded k NLL and K accuracy did not get worse, and on the first
    validation scenes, recomputed here, its T gives no higher K-head NLL than T = 1."""
    state = load_checkpoint(DEFAULT_WEIGHTS)
    loaded = load_model(DEFAULT_WEIGHTS)
    m, cal = state["metrics"], loaded.calibration
    assert m["calibration_scenes"] == loaded.config.val_scenes
    assert cal.order_rule == loaded.config.order_rule and cal.temperature > 0 and 0 <= cal.threshold < 1
    assert m["calibrated_val_k_nll"] <= m["uncalibrated_val_k_nll"]
    assert m["calibrated_K_acc"] >= m["uncalibrated_K_acc"] - 1e-9
    logits, K = _raw_logits(DEFAULT_WEIGHTS, 96)
    assert calibrate.nll(logits, K, cal.temperature) <= calibrate.nll(logits, K, 1.0) + 0.01
